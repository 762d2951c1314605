#!/usr/bin/env bash
# The LFW study's queues after the first sweeps (lanes.sh): the center-loss sweep extended
# down to lambda 1e-4, because its best value sat at the lower edge (1e-3) of 1e-3..1e-1.
# Launch record: ran in a worktree of 6835c3c (the commit its logs name); run now (bash lanes2.sh A, and B
# beside it) it uses this checkout's code, whose run.sh lines still parse.
cd "$(dirname "$0")/../.." || exit 2
S="bash results/lfw-joint-supervision/run.sh"
CENTER="0.0001 0.001 0.01 0.1"
if [ "$1" = A ]; then
  # (launched while lanes.sh's queue A ran its sweep joint lambda 1, and waited for it)
  $S final ce - 0
  $S final joint $($S select joint 0.01 0.1 1) 0 1 2
  while [ ! -e results/lfw-joint-supervision/.center-sweep-done ]; do sleep 10; done
  $S final center $($S select center $CENTER) 2
else
  # (launched while lanes.sh's queue B ran its sweep center lambda 0.1, and waited for it)
  $S sweep center 0.0001
  touch results/lfw-joint-supervision/.center-sweep-done
  $S final ce - 1 2
  $S final center $($S select center $CENTER) 0 1
fi
