#!/usr/bin/env bash
# The order the deep-supervision study runs were launched in (two queues side by side, one torch thread
# each; laneA*.out / laneB*.out hold their output and the commit). Stages 1-3 were each
# started when the earlier one's results were in: the Xavier sweep (1) left every depth at
# chance, so the Kaiming sweep (2) was added; its best lr for plain20/32/44 sat at the
# lower edge 0.01, so 0.003 and 0.001 were added (3). A first stage-4 queue (Kaiming
# plain44 / plain32 finals) was cancelled before any of its runs started, once the finished
# sweep showed that Kaiming plain44 trains at lr 0.003 and plain20 (Xavier) starts to move.
cd "$(dirname "$0")/../.." || exit 2
S=results/deep-supervision-cifar10subset/run.sh O=results/deep-supervision-cifar10subset
# 1: Xavier (models.py's default plain init)
( bash $S sweep plain56 0.1 0.03 0.01; bash $S sweep plain20 0.1 0.03 0.01 ) > $O/laneA.out &
( bash $S sweep plain44 0.1 0.03 0.01; bash $S sweep plain32 0.1 0.03 0.01 ) > $O/laneB.out
wait
# 2: Kaiming init
( bash $S sweep plain56-kaiming 0.1 0.03 0.01; bash $S sweep plain20-kaiming 0.1 0.03 0.01 ) > $O/laneA2.out &
( bash $S sweep plain44-kaiming 0.1 0.03 0.01; bash $S sweep plain32-kaiming 0.1 0.03 0.01 ) > $O/laneB2.out
wait
# 3: lower lrs (Kaiming); gradient probes (seconds each, run alongside)
( bash $S sweep plain20-kaiming 0.003 0.001; bash $S sweep plain56-kaiming 0.003 0.001 ) > $O/laneA3.out &
( bash $S sweep plain32-kaiming 0.003 0.001; bash $S sweep plain44-kaiming 0.003 0.001 ) > $O/laneB3.out &
bash $S probe plain56 0.1 none 1 0; bash $S probe plain20 0.03 none 1; bash $S probe plain32 0.1 none 1 0
bash $S probe plain44-kaiming 0.01 none 1; bash $S probe plain32-kaiming 0.01 none 1   # at 0.01, before the 0.003 sweep was in
bash $S probe plain56-kaiming 0.001 none 1   # at the lr its sweep chose, after stage 3
wait
# 4: finals, 10 epochs on the full training set (queued while stage 3's last two runs were
# finishing). Xavier is the vanishing-gradient regime: plain32 stays at chance at every lr while
# plain20 starts to move by epoch 5, so plain32 is "the depth where it stops training" and
# plain20 the shallower one. plain32: no head / the probe's head (after stage 1) / the
# alternative (after stage 0); plain20: no head / head after stage 1 (its probe finds no layer
# under 1e-7, so it gives no advice). Xavier plain32's lrs tie at chance (10.00): the select
# rule takes the first listed, 0.1.
( bash $S final plain32 0.1 none 0 1 2; bash $S final plain32 0.1 1 0 1 2 ) > $O/laneB4.out &
( bash $S final plain32 0.1 0 0 1 2; bash $S final plain20 0.03 none 0 1 2; bash $S final plain20 0.03 1 0 1 2 ) > $O/laneA4.out
wait
# The stage-4 queues also held resnet56 finals at He et al.'s lr 0.1 (not swept). The first,
# final-resnet56-dsnone-seed0, blew up (train loss 6.0 at iteration 20, then stuck near
# ln 10, test 12.6% after 4 epochs): it was stopped (SIGTERM) and kept as
# aborted-final-resnet56-lr0.1-dsnone-seed0, and resnet56 got the same lr sweep as the
# plain nets (5): a control trained at a broken lr would say nothing.
# 5: resnet56 lr on the validation split, then its finals. (The queues also held Kaiming
# plain56 finals at its chosen lr 0.001; they were taken off before starting, for lack of
# machine time. Not run: bash $S final plain56-kaiming 0.001 none 0 1 2; ... 1 0 1 2.)
( bash $S sweep resnet56 0.03 0.01; lr=$(bash $S select resnet56 0.1 0.03 0.01)   # after the 0.1 sweep is in
  bash $S final resnet56 $lr none 0 1 2 ) > $O/laneB5.out &
( bash $S sweep resnet56 0.1; lr=$(bash $S select resnet56 0.1 0.03 0.01)         # after the 0.03 / 0.01 sweeps are in
  bash $S final resnet56 $lr 1 0 1 2 ) > $O/laneA5.out
wait
