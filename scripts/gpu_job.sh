#!/usr/bin/env bash
# The whole GPU job: train the Multi30k variants x seeds, score BLEU, time the
# paper's Table 2, write the report, and pack the small results into OUT_DIR.
#
#   bash scripts/gpu_job.sh OUT_DIR [--tiny]
#
# Run from anywhere; it works in the repository root. Needs .data/ (a copy of
# ../shared/data/{multi30k,wmt14_ende_eval}) and, on an image without
# ml_collections/tensorboardX, .whl/ (scripts/fetch_wheels.sh); both are
# git-ignored, so carry them to the GPU machine. Environment knobs:
#   VARIANTS  configs/multi30k.py variants (default: mha mqa gqa2 mha_local
#             mqa_local mha_h1 mha_h4)      SEEDS  (default: 0 1 2)
#   STEPS     training steps (default: the config's)
#   PARALLEL  trainings sharing the GPU at once (default 4)
#   TRAIN_TIMEOUT  seconds after which a training is stopped (SIGTERM: it
#             checkpoints) and scored as it is; default 0, no limit
#   BENCH_ARGS  decode.py benchmark flags (default: the paper's shapes, and
#             greedy also at batch 128 and 8)
#   RUNS      workdirs, checkpoints included (default /tmp/runs; stay there)
# --tiny checks the plumbing on a CPU in minutes: `,tiny` models on the same
# data, 2 variants x 1 seed, tiny benchmark shapes. Outputs (at most 8 files,
# the device tool's limit): runs.tar.gz (every run's config, metrics, BLEU,
# logs, hypotheses, TensorBoard events; the benchmark; the full report),
# report/report.md and its PNGs, job.log, environment.txt.
set -euo pipefail

OUT=${1:?usage: scripts/gpu_job.sh OUT_DIR [--tiny]}
TINY=${2:-}
mkdir -p "$OUT/report"
OUT=$(cd "$OUT" && pwd)
# Everything also goes to job.log: the script reruns itself under tee (a pipe;
# with exec > >(tee ...) instead, bash's `wait` below would wait for tee).
if [ -z "${GPU_JOB_LOGGING:-}" ]; then
  GPU_JOB_LOGGING=1 bash "$(realpath "$0")" "$OUT" "$TINY" 2>&1 | tee -a "$OUT/job.log"
  exit
fi
cd "$(dirname "$(realpath "$0")")/.."
log() { echo "$(date -u +%H:%M:%S) $*"; }

# 1. Missing wheels, installed beside the image's packages.
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade \
    --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi

# 2. Data: the configs read MQA_FLAX_DATA.
export MQA_FLAX_DATA=$PWD/.data
for d in multi30k wmt14_ende_eval; do
  [ -d ".data/$d" ] || { echo "missing .data/$d: cp -r ../shared/data/$d .data/"; exit 1; }
done

SUFFIX=''
TRAIN_ARGS=()
if [ "$TINY" = --tiny ]; then
  # Tiny models on the real data (vocab 256: the text has 103 characters).
  SUFFIX=,tiny VARIANTS=${VARIANTS:-mha mqa} SEEDS=${SEEDS:-0} PARALLEL=${PARALLEL:-2}
  RUNS=${RUNS:-/tmp/runs-tiny}
  BENCH_ARGS=${BENCH_ARGS:---bench_batch=4 --bench_beam_batch=2 --bench_src_len=8 --bench_tgt_len=8 --bench_train_shape=4,16 --bench_reps=1}
  export JAX_PLATFORMS=cpu
  TRAIN_ARGS=(--config.data.source=text --config.data.data_dir="$MQA_FLAX_DATA"
    --config.data.train_split=multi30k/train --config.data.dev_split=multi30k/val
    --config.data.test_split=multi30k/test_2016_flickr --config.data.vocab_size=256
    --config.data.eval_batch_size=64)
elif [ -n "$TINY" ]; then
  echo "unknown option $TINY (only --tiny)"; exit 2
fi
VARIANTS=${VARIANTS:-mha mqa gqa2 mha_local mqa_local mha_h1 mha_h4}
SEEDS=${SEEDS:-0 1 2} PARALLEL=${PARALLEL:-4} RUNS=${RUNS:-/tmp/runs}
BENCH_ARGS=${BENCH_ARGS:---bench_batch=1024,128,8}
if [ -n "${STEPS:-}" ]; then TRAIN_ARGS+=(--config.num_train_steps="$STEPS"); fi
mkdir -p "$RUNS"
FAILED=$RUNS/failed.txt
: > "$FAILED"

{ echo "commit: ${GIT_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}"
  git status --short 2>/dev/null | sed 's/^/  dirty: /' || true  # No .git: nothing.
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "host: $(hostname)"
  nvidia-smi -L 2>/dev/null || echo 'nvidia-smi: none'
  python3 -c 'import sys, jax, flax; print("python", sys.version.split()[0], "jax", jax.__version__, "flax", flax.__version__, jax.devices())'
  echo "VARIANTS=$VARIANTS SEEDS=$SEEDS STEPS=${STEPS:-config} PARALLEL=$PARALLEL"
  echo "BENCH_ARGS=$BENCH_ARGS tiny=${SUFFIX:+yes}"
} > "$OUT/environment.txt"
cat "$OUT/environment.txt"

# 3-4. One run: train (resumes if its workdir has checkpoints), then score.
# Errors are recorded in $FAILED and the job goes on with the other runs.
run() {
  local wd=$RUNS/m30k-$1-s$2 split
  mkdir -p "$wd"
  log "train $wd"
  if ! timeout --preserve-status -s TERM "${TRAIN_TIMEOUT:-0}" python3 train.py \
      --config="configs/multi30k.py:$1$SUFFIX" --workdir="$wd" \
      --config.seed="$2" "${TRAIN_ARGS[@]}" > "$wd/train.log" 2>&1; then
    echo "train $wd (see train.log)" >> "$FAILED"; log "FAILED train $wd"; return
  fi
  : > "$wd/decode.log"
  for split in "dev --beam_size=1" "test --beam_size=1" "test --beam_size=4" \
      "wmt14_ende_eval/newstest2014 --name=newstest2014 --beam_size=4"; do
    # shellcheck disable=SC2086  # $split holds flags.
    python3 decode.py --workdir="$wd" --mode=bleu --split=$split >> "$wd/decode.log" 2>&1 \
      || echo "decode $wd --split=$split (see decode.log)" >> "$FAILED"
  done
  log "done $wd: $(sed -n 's/: BLEU \([0-9.]*\) (.*/ \1/p' "$wd/decode.log" | paste -sd, -)"
}

# Small runs share the GPU: each process takes its part of the memory.
export XLA_PYTHON_CLIENT_MEM_FRACTION
XLA_PYTHON_CLIENT_MEM_FRACTION=$(awk -v p="$PARALLEL" 'BEGIN { printf "%.2f", 0.9 / p }')
for v in $VARIANTS; do
  for s in $SEEDS; do
    while [ "$(jobs -rp | wc -l)" -ge "$PARALLEL" ]; do wait -n || true; done
    run "$v" "$s" &
  done
done
wait
unset XLA_PYTHON_CLIENT_MEM_FRACTION

# 5. Table 2 timings, alone on the device (a rerun replaces the old rows).
log "benchmark"
rm -rf "$RUNS/table2"
# shellcheck disable=SC2086  # BENCH_ARGS holds flags.
python3 decode.py --mode=benchmark --config="configs/paper.py:mha$SUFFIX" \
  --variants=mha,mqa,gqa2,mha_local,mqa_local --out="$RUNS/table2" $BENCH_ARGS \
  > "$RUNS/benchmark.log" 2>&1 || echo "benchmark (see benchmark.log)" >> "$FAILED"
tail -n 20 "$RUNS/benchmark.log"

# 6. Report over every run that got as far as config.json, then the outputs.
log "report"
reportable=()
for d in "$RUNS"/m30k-*/config.json "$RUNS"/table2/benchmark.jsonl; do
  if [ -f "$d" ]; then reportable+=("$(dirname "$d")"); fi
done
python3 -m mqa_flax.report "${reportable[@]}" --out "$RUNS/report" \
  || echo "report" >> "$FAILED"
cp "$RUNS"/report/report.md "$RUNS"/report/*.png "$OUT/report/" 2>/dev/null || true
tar -czf "$OUT/runs.tar.gz" -C "$(dirname "$RUNS")" --exclude=checkpoints \
  --exclude=data --exclude=spm.model "$(basename "$RUNS")"
ls -l "$OUT" "$OUT/report"
if [ "$(stat -c %s "$OUT/runs.tar.gz")" -gt 16000000 ]; then
  echo "runs.tar.gz is over 16 MB, the device tool's limit: it will not come back" >> "$FAILED"
fi
if [ -s "$FAILED" ]; then
  log "FAILED:"; cat "$FAILED"; exit 1
fi
log "all done"
