"""Compare two golden records, naming the differences that later changes intended.

    python results/refactor-golden/compare.py results/refactor-golden/golden-5909c2f.json NEW.json

golden.py --compare reports any difference; this prints, per run, whether it is equal apart
from (1) metrics.jsonl's aux_weight (null since c4f0408 in a run without a head) and (2)
momentum buffers (since 1443ed6 built after the weights turn channels-last, so they hold the
logical values in the weights' layout) and (3) fields that evaluate.py --json added (dataset,
data_path since the --dataset flag) and (4) metrics columns and progress-line top1 added later
(MKSMT's train_top1), and names anything else. Temporary paths are ignored.
"""
import json
import re
import sys

TMP = re.compile(r"/tmp/tmp[a-z0-9_]+/")
TOP1 = re.compile(r"(epoch \d+ iter [^\"]*?) top1 [\d.]+")   # a progress line's training top-1 (not eval lines)


def compare(old, new):
    notes = []
    for key in old:
        if key == "metrics":
            added = sorted({k for r_old, r_new in zip(old[key], new[key]) for k in r_new if k not in r_old})
            strip = lambda rows: [{k: v for k, v in r.items() if k != "aux_weight" and k not in added} for r in rows]
            if strip(old[key]) != strip(new[key]):
                notes.append("metrics beyond aux_weight and added columns")
            if added:
                notes.append(f"metrics add {', '.join(added)}")
            if [r.get("aux_weight") for r in old[key]] != [r.get("aux_weight") for r in new[key]]:
                notes.append(f"aux_weight now {sorted({str(r.get('aux_weight')) for r in new[key]})}")
        elif key == "state":
            differ = [k for k in old[key] if old[key][k] != new[key].get(k)]
            if differ:
                buffers = all("momentum_buffer" in k for k in differ)
                notes.append(f"{len(differ)} tensors differ" + (", all momentum buffers" if buffers else ": " + ", ".join(differ[:3])))
        elif key == "evaluate":  # evaluate.py --json lines; fields added later are named, not counted
            rows = [[json.loads(TMP.sub("", line)) for line in side[key]] for side in (old, new)]
            added = sorted({k for r_old, r_new in zip(*rows) for k in r_new if k not in r_old})
            if [{k: v for k, v in r.items() if k not in added} for r in rows[1]] != rows[0]:
                notes.append("evaluate beyond added fields")
            if added:
                notes.append(f"evaluate adds {', '.join(added)}")
        elif TMP.sub("", json.dumps(old[key])) != TMP.sub("", json.dumps(new[key])):
            top1_only = key == "stdout" and TOP1.sub(r"\1", TMP.sub("", json.dumps(old[key]))) == \
                TOP1.sub(r"\1", TMP.sub("", json.dumps(new[key])))   # MKSMT logs it since 2026-12-05
            notes.append("stdout equal but for top1 in progress lines" if top1_only else key)
    return notes


if __name__ == "__main__":
    a, b = (json.load(open(p)) for p in sys.argv[1:3])
    for run in a:
        print(run, "; ".join(compare(a[run], b[run])) or "equal")
