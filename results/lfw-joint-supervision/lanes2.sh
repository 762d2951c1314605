#!/usr/bin/env bash
# The LFW study's queues after the first sweeps (lanes.sh): the center-loss sweep extended
# down to lambda 1e-4, because its best value sat at the lower edge (1e-3) of 1e-3..1e-1.
cd /work/lfw-wt
S="bash results/lfw-joint-supervision/run.sh"
CENTER="0.0001 0.001 0.01 0.1"
if [ "$1" = A ]; then
  while kill -0 16495 2>/dev/null; do sleep 5; done   # sweep joint lambda 1
  $S final ce - 0
  $S final joint $($S select joint 0.01 0.1 1) 0 1 2
  while [ ! -e results/lfw-joint-supervision/.center-sweep-done ]; do sleep 10; done
  $S final center $($S select center $CENTER) 2
else
  while kill -0 16453 2>/dev/null; do sleep 5; done   # sweep center lambda 0.1
  $S sweep center 0.0001
  touch results/lfw-joint-supervision/.center-sweep-done
  $S final ce - 1 2
  $S final center $($S select center $CENTER) 0 1
fi
