#!/usr/bin/env bash
# Launch record: both studies (the hybrid study and the MKSMT study) ran from one job
# queue, popped in this order by two lanes (one torch thread each) on the 2-core CPU machine,
# from a worktree pinned at the commit each log's first line names.
#   bash results/hybrid-cifar10lt-subset/lanes.sh          # starts both lanes in the background
#   bash results/hybrid-cifar10lt-subset/lanes.sh "hybrid sc 100 0" ...   # after a kill: keep queue.txt, put
#                                     # the jobs that were in flight (one quoted string each) back in front (--resume auto)
set -u
cd "$(dirname "$0")/../.."
queue=results/hybrid-cifar10lt-subset/queue.txt
if [ $# -gt 0 ]; then
  touch "$queue"   # a fresh checkout has none: the jobs named are then the whole queue
  { for job in "$@"; do echo "$job"; done; cat "$queue"; } > "$queue.new" && mv "$queue.new" "$queue"
else {
  for m in sc psc ce ce-balanced; do for s in 0 1 2; do echo "hybrid $m 100 $s"; done; done
  for s in 0 1 2; do for c in plain plain2x nokd t1 t4 onestep; do echo "mksmt $c $s"; done; done
  for s in 0 1 2; do for m in sc psc ce ce-balanced; do echo "hybrid $m 10 $s"; done; done
} > "$queue"
fi
pop() { (flock 9; head -n 1 "$queue"; sed -i 1d "$queue") 9> "$queue.lock"; }
lane() {
  while job=$(pop); [ -n "$job" ]; do
    set -- $job
    echo "$(date -u +%H:%M:%S) start $job"
    if [ "$1" = hybrid ]; then bash results/hybrid-cifar10lt-subset/run.sh "$2" "$3" "$4"; else bash results/mksmt-cifar10subset/run.sh "$2" "$3"; fi
    echo "$(date -u +%H:%M:%S) done $job"
  done
}
for name in a b; do nohup bash -c "$(declare -f pop lane); queue=$queue; lane" >> "results/hybrid-cifar10lt-subset/lane-$name.out" 2>&1 & sleep 2; done
