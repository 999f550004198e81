#!/usr/bin/env bash
# One time-boxed meta-training job at the paper's scale (a cluster's short queue, or one `device` command):
# meta-train with --time-limit, evaluate, and leave only small files in OUT_DIR.
#
#   bash benchmarks/paper_job.sh BUDGET_SECONDS OUT_DIR [more train_lopt.py flags]
#   bash benchmarks/paper_job.sh 570 /tmp/job                 # --preset paper, 570 s for everything
#   WORK_DIR=/scratch/run bash benchmarks/paper_job.sh 3600 out   # a second job with the same WORK_DIR resumes
#
# OUT_DIR gets optimizer.msgpack (the last meta-step), optimizer_best.msgpack (the best validated one),
# eval.json, metrics.csv, meta_training.png, args.json and job.log; each a few KB. The train state, which --resume
# needs and which is 12 GB at the paper's scale, stays in WORK_DIR (default: a folder under /tmp).
# Flags after OUT_DIR override the preset, e.g. --agents-per-chunk 128.
set -euo pipefail
if [[ $# -lt 2 || ! $1 =~ ^[0-9]+([.][0-9]+)?$ ]]; then
    echo "usage: bash benchmarks/paper_job.sh BUDGET_SECONDS OUT_DIR [train_lopt.py flags]" >&2
    exit 2
fi
budget=$1 out=$2
shift 2
cd "$(dirname "$0")/.."
work=${WORK_DIR:-/tmp/optim4rl_paper_job}
mkdir -p "$out" "$work"
resume=()
[[ -f $work/run/train_state.npy ]] && resume=(--resume)
export XLA_PYTHON_CLIENT_PREALLOCATE=${XLA_PYTHON_CLIENT_PREALLOCATE:-false}  # report real peak memory
echo "# $(date -u +%FT%TZ) paper_job.sh $budget $out $*" > "$out/job.log"
status=0
${PYTHON:-python} train_lopt.py --preset paper --time-limit "$budget" --out-dir "$work" --run-name run \
    "${resume[@]}" "$@" 2>&1 | tee -a "$out/job.log" || status=$?
for name in optimizer.msgpack optimizer_best.msgpack eval.json metrics.csv meta_training.png args.json; do
    [[ -f $work/run/$name ]] && cp "$work/run/$name" "$out/"
done
exit $status
