#!/usr/bin/env bash
# Bench-only: a separate virtual environment with anomalib's WinCLIP, the peer that
# benchmarks/winclip.py measures linewatch against.
#
# anomalib's WinCLIP permutes tokens to sequence-first before calling open_clip's
# transformer, which open_clip >= 2.26 runs batch-first (the permute then mixes tokens
# across windows and the maps go flat). open_clip 2.24.0 is the last release it works
# with, which cannot share an environment with linewatch's open_clip 3.3.0 - hence its
# own venv. torch/torchvision are pinned to linewatch's so both sides run the same kernels.
set -euo pipefail
cd "$(dirname "$0")"
VENV=.venv-anomalib
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
"$VENV/bin/pip" install --quiet --upgrade pip
"$VENV/bin/pip" install --quiet "anomalib==2.7.0" "open_clip_torch==2.24.0" \
  "torch==2.13.0" "torchvision==0.28.0"
echo "anomalib peer ready: benchmarks/$VENV"
