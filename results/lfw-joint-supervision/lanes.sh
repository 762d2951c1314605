#!/usr/bin/env bash
# Two queues for the LFW study (20 epochs, lr step at 15).
# Launch record: ran in a worktree of 2104c39 (the commit its logs name); run now (bash lanes.sh A, and B
# beside it) it uses this checkout's code, whose run.sh lines still parse.
cd "$(dirname "$0")/../.." || exit 2
S="bash results/lfw-joint-supervision/run.sh"
if [ "$1" = A ]; then
  $S sweep joint 0.01 0.1 1
  $S final ce - 0
  $S final joint $($S select joint 0.01 0.1 1) 0 1 2
  while [ ! -e results/lfw-joint-supervision/.center-sweep-done ]; do sleep 10; done
  $S final center $($S select center 0.001 0.01 0.1) 2
else
  $S sweep center 0.001 0.01 0.1
  touch results/lfw-joint-supervision/.center-sweep-done
  $S final ce - 1 2
  $S final center $($S select center 0.001 0.01 0.1) 0 1
fi
