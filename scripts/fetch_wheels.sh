#!/usr/bin/env bash
# Downloads into .whl/ (git-ignored) the wheels that the GPU image lacks, for
# scripts/gpu_job.py to install there without network access:
#   bash scripts/fetch_wheels.sh
# The image (Python 3.12, x86-64) has everything else, these wheels' own
# requirements included (absl-py, PyYAML, numpy, packaging, protobuf): the
# Requires-Dist lines printed at the end say what to add if that changes.
set -euo pipefail
cd "$(dirname "$0")/.."
# Pure-python wheels match only `--platform any`; the manylinux tags cover
# compiled ones, should a future requirement need them.
python3 -m pip download -q --no-deps --only-binary=:all: -d .whl \
  --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any \
  ml-collections tensorboardX
for whl in .whl/*.whl; do
  echo "$whl"
  unzip -p "$whl" '*/METADATA' | grep '^Requires-Dist' | grep -v 'extra ==' | sed 's/^/  /' || true
done
