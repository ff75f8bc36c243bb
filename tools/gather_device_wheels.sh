#!/usr/bin/env bash
# Gather the wheels the GPU machine lacks (it has torch, timm, peft, transformers, tensorboard, numpy, scipy,
# opencv, pyyaml, but no albumentations) into .whl/ for the device tool to carry (Python 3.12, x86-64).
# On the device: python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl; export PYTHONPATH=/tmp/site:.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || { mkdir -p .git/info; echo '/.whl/' >> .git/info/exclude; }
mkdir -p .whl
platforms=()
for n in 17 24 27 28 31 34 35; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" --platform manylinux2014_x86_64 -d .whl \
  albumentations==2.0.8 albucore==0.0.24 pydantic==2.14.3 pydantic-core==2.50.4 annotated-types==0.8.0 \
  typing-inspection==0.4.5 stringzilla==5.3.2 simsimd==6.5.16 mlxtend==0.25.0
ls -la .whl
