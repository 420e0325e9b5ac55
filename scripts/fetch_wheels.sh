#!/usr/bin/env bash
# Prepares what the GPU job carries to the device (all git-ignored):
#   bash scripts/fetch_wheels.sh            # SHARED=../shared by default
# .whl/   wheels the GPU image lacks, for scripts/gpu_job.py to install there
#         without network access. The image (Python 3.12, x86-64) has
#         everything else, these wheels' own requirements included (absl-py,
#         PyYAML, numpy, packaging, protobuf): the Requires-Dist lines printed
#         at the end say what to add if that changes.
# .data/  multi30k/ and wmt14_ende_eval/ from $SHARED/data (Table 1).
# .peers/ the Flax WMT example and its timing script from $SHARED/peers.
# `python3 scripts/gpu_job.py --check_carry` then prints their sizes.
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED="${SHARED:-../shared}"
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
mkdir -p .data .peers
for d in multi30k wmt14_ende_eval; do
  rm -rf ".data/$d" && cp -r "$SHARED/data/$d" .data/
done
rm -rf .peers/flax_wmt && cp -r "$SHARED/peers/flax_wmt" "$SHARED/peers/flax_wmt_bench.py" .peers/
chmod -R u+w .data .peers
du -sh .whl .data .peers
