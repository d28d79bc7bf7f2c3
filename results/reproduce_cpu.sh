#!/usr/bin/env bash
# At CPU scale: does an 85%-pruned RS-Prune subset train a better diffusion backbone?
# Every step is resumable: rerun this script after an interruption and it continues where it
# stopped (prune runs are cached, training resumes from its newest checkpoint, convergence
# scoring skips steps already scored). Runs live in $RUNS (outside the checkout); each finished
# training run's compact record (config, metrics log, split record, last sample grid) is copied
# to results/runs/<arm>-s<seed>/ for committing.
#   bash results/reproduce_cpu.sh                     # the full design: ~3-4 h on 2 cores
#   STEPS=20 SEEDS=0 ARMS="rsprune random" N_SAMPLES=16 RUNS=/tmp/r RESULTS=/tmp/r/results \
#     bash results/reproduce_cpu.sh                   # a smoke run of the pipeline
#   STAGES=score bash results/reproduce_cpu.sh        # (re)score finished runs only
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-$HOME/runs/repro}
STEPS=${STEPS:-10000}
SEEDS=${SEEDS:-"0 1 2"}
ARMS=${ARMS:-"full rsprune random"}      # add kmeans_uniform_filtered for the fourth arm
N_SAMPLES=${N_SAMPLES:-1000}
JOBS=${JOBS:-2}                          # training runs at once (one thread each)
RESULTS=${RESULTS:-results}              # where the tables, figures and run records go
SCORE_STEPS=${SCORE_STEPS:-null}         # steps FD/KID are scored at (null: every snapshot), e.g. [1000,4000]
SAMPLER_STEPS=${SAMPLER_STEPS:-50}
export RSPRUNE_CACHE=${RSPRUNE_CACHE:-$HOME/rsprune-cache}  # content-keyed caches, outside the checkout
STAGES=${STAGES:-"prune train score"}
DATA_OVERRIDES=${DATA_OVERRIDES:-}       # e.g. data=raw: the corpus every arm is pruned from and trained on
mkdir -p "$RUNS"
has() { [[ " $STAGES " == *" $1 "* ]]; }

subset() {  # the kept list an arm trains on (full: the split's whole corpus)
  if [ "$1" = full ]; then echo full; else echo "$RUNS/prune/$1-r0.85-s0/kept.txt"; fi
}

# The committed runs were pruned before the `selection.mass=auto` default (CHANGELOG.md): pinned
# to `count` so a rerun trains on the same kept lists (PRUNE_OVERRIDES= to use today's default).
PRUNE_OVERRIDES=${PRUNE_OVERRIDES-selection.mass=count}
has prune && for arm in $ARMS; do  # 1. prune at 0.85 with seed 0 (the split's corpus and reference)
  [ "$arm" = full ] && continue
  python prune/run.py +experiment=ratio85 method="$arm" seed=0 run_dir="$RUNS/prune/$arm-r0.85-s0" \
    $DATA_OVERRIDES $PRUNE_OVERRIDES > "$RUNS/prune-$arm.log" 2>&1
done

train_one() {  # 2. one training run; its log in its run folder
  local arm=$1 seed=$2 dir="$RUNS/train/$1-s$2"
  mkdir -p "$dir"
  python train/main.py +experiment=repro_cpu $DATA_OVERRIDES data.subset="$(subset "$arm")" seed="$seed" \
    train.max_steps="$STEPS" run_dir="$dir" >> "$dir/train.log" 2>&1
  local rec="$RESULTS/runs/$arm-s$seed"
  mkdir -p "$rec"
  cp "$dir/config.yaml" "$dir/metrics.jsonl" "$dir/split.json" "$rec/"
  [ -d "$dir/heldout" ] && rm -rf "$rec/heldout" && cp -r "$dir/heldout" "$rec/heldout"  # per-image held-out losses
  last=$(ls "$dir/samples/" | sort | tail -1) && cp "$dir/samples/$last" "$rec/samples_last.png"
}
export -f train_one subset
export RUNS STEPS RESULTS DATA_OVERRIDES
# seed-major order: an interrupted batch leaves every arm with the same seeds done
has train && for seed in $SEEDS; do for arm in $ARMS; do echo "$arm $seed"; done; done \
  | xargs -P "$JOBS" -L 1 bash -c 'train_one "$0" "$1"'

# 3. FD/KID (whole and class-balanced test split), memorisation and held-out loss per arm and step:
# each run scored on its own (JOBS at once, one thread each; scores land in <run>/convergence.csv),
# then one report over all arms, which only reads those files.
score_one() {
  local dir=$1 name; name=$(basename "$1")
  OMP_NUM_THREADS=1 python eval/convergence.py "runs=[$dir]" n_samples="$N_SAMPLES" \
    results_dir="$RUNS/scoring/$name" score_steps="$SCORE_STEPS" steps="$SAMPLER_STEPS" sheet_n=0 \
    >> "$dir/convergence.log" 2>&1
  cp "$dir/convergence.csv" "$dir/yardstick.json" "$RESULTS/runs/$name/"
}
export -f score_one
export N_SAMPLES SCORE_STEPS SAMPLER_STEPS
if has score; then
  for seed in $SEEDS; do for arm in $ARMS; do echo "$RUNS/train/$arm-s$seed"; done; done \
    | xargs -P "$JOBS" -L 1 bash -c 'score_one "$0"'
  spec=""
  for arm in $ARMS; do
    dirs=$(for seed in $SEEDS; do printf '%s,' "$RUNS/train/$arm-s$seed"; done)
    spec="$spec$arm:[${dirs%,}],"
  done
  python eval/convergence.py "runs={${spec%,}}" n_samples="$N_SAMPLES" results_dir="$RESULTS" \
    score_steps="$SCORE_STEPS" steps="$SAMPLER_STEPS" > "$RUNS/convergence.log" 2>&1
  echo "done: $RESULTS/convergence.md, $RESULTS/convergence.png, $RESULTS/runs/"
fi
