#!/usr/bin/env bash
# The downstream half at CPU scale: x4 SR and semantic image synthesis fine-tuned from each
# arm's seed-0 backbone (results/reproduce_cpu.sh) and from scratch, with identical budgets.
# Resumable: rerun the same command (finished runs are skipped, unfinished ones resume).
#   bash results/downstream_cpu.sh
#   INITS="scratch" STEPS=5 SR_TEST=4 RUNS=/tmp/r RESULTS=/tmp/r/results bash results/downstream_cpu.sh  # smoke
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-$HOME/runs/repro}
INITS=${INITS:-"scratch full rsprune random"}   # scratch or an arm whose <arm>-s0 training run exists
STEPS=${STEPS:-1000}                             # fine-tuning steps, the same for every start
BACKBONE_STEP=${BACKBONE_STEP:-10000}            # the backbones' final step (reproduce_cpu.sh's STEPS)
SR_TEST=${SR_TEST:-128}                          # nwpu12/test images scored (evenly spaced)
JOBS=${JOBS:-2}
RESULTS=${RESULTS:-results}
export RSPRUNE_CACHE=${RSPRUNE_CACHE:-$HOME/rsprune-cache}

one() {  # task init: one fine-tuning run, its log in its folder, its compact record in results
  local task=$1 init=$2 dir="$RUNS/downstream/$1/$2"
  local backbone=none extra=""
  [ "$task" = sr ] && extra="sr.max_test=$SR_TEST"
  if [ "$init" != scratch ]; then
    backbone="$RUNS/train/$init-s0" extra="$extra backbone_step=$BACKBONE_STEP"
    local snap; snap="$backbone/snapshots/$(printf 'step_%07d' "$BACKBONE_STEP")"
    until [ -d "$snap" ]; do sleep 30; done  # the backbone may still be training (reproduce_cpu.sh)
  fi
  mkdir -p "$dir"
  OMP_NUM_THREADS=1 python "downstream/$task.py" backbone="$backbone" train.max_steps="$STEPS" \
    train.cpu_threads=1 run_dir="$dir" $extra >> "$dir/run.log" 2>&1
  local rec="$RESULTS/downstream/$task/$init"
  mkdir -p "$rec"
  cp "$dir/metrics.json" "$dir/config.yaml" "$dir/samples.png" "$rec/"
}
export -f one
export RUNS STEPS SR_TEST RESULTS BACKBONE_STEP
for init in $INITS; do for task in sr semantic_synthesis; do echo "$task $init"; done; done \
  | xargs -P "$JOBS" -L 1 bash -c 'one "$0" "$1"'
python eval/tables.py sr "sections.sr.set.report.runs=[$RESULTS/downstream/sr/*]" \
  "sections.sr.set.report.results_dir=$RESULTS"
python eval/tables.py semantic_synthesis \
  "sections.semantic_synthesis.set.report.runs=[$RESULTS/downstream/semantic_synthesis/*]" \
  "sections.semantic_synthesis.set.report.results_dir=$RESULTS"
echo "done: $RESULTS/sr.md, $RESULTS/semantic_synthesis.md, $RESULTS/downstream/"
