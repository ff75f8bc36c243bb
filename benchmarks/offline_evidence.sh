#!/usr/bin/env bash
# Issue 5 and 7 evidence on one GPU: the method comparison on the two real digit sets and the depth and
# activation studies on the demo data, runs spread as parallel processes over the GPU(s).
#   bash benchmarks/offline_evidence.sh [SLOTS] [OUT]     (SLOTS: parallel runs, default 12)
# Reports land in runs/compare/ and runs/studies/; a copy of the small files goes to OUT if given.
set -uo pipefail
slots=${1:-12}
out=${2:-}
gpus=$(for _ in $(seq "$slots"); do printf '0 '; done)
start=$(date +%s)
python3 -m neat_vision.studies.compare --config configs/offline_compare/digits.yaml configs/offline_compare/mnist5k.yaml \
  --gpus $gpus --output runs/compare
echo "[evidence] compare done after $(( $(date +%s) - start )) s"
for study in demo_depth demo_activation; do
  python3 -m neat_vision.studies.study --config configs/studies/$study.yaml --gpus $gpus
done
echo "[evidence] studies done after $(( $(date +%s) - start )) s"
if [ -n "$out" ]; then
  cp runs/compare/compare.md runs/compare/compare.png runs/compare/compare.csv "$out"/ 2>/dev/null
  tar czf "$out/evidence.tgz" --exclude='*.pth' --exclude='*.safetensors' --exclude='tb' --exclude='tb_hparams' \
    runs/compare runs/studies 2>/dev/null
fi
