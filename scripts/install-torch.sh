#!/bin/sh
# Installs torch into the virtual environment whose pip is $1, choosing the right build:
# - a machine with an NVIDIA driver gets PyPI's default (CUDA) build;
# - a CPU-only machine gets torch 2.13.0 CPU: from a wheel this machine already has (find-links,
#   as on CI), else from PyTorch's CPU index. Never the multi-GB CUDA build on a CPU-only machine.
set -eu
PIP="$1"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
if "$PIP" show torch >/dev/null 2>&1; then
    echo "torch already installed: $("$PIP" show torch | sed -n 's/^Version: //p')"
    exit 0
fi
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "NVIDIA driver found: installing the CUDA build of torch from PyPI"
    exec "$PIP" install "torch>=2.4"
fi
if "$PIP" install --dry-run --no-index --no-deps -q "torch==$TORCH_VERSION" >/dev/null 2>&1; then
    echo "no NVIDIA driver: installing torch $TORCH_VERSION (CPU) from this machine's wheels"
    exec "$PIP" install "torch==$TORCH_VERSION"
fi
echo "no NVIDIA driver: installing torch $TORCH_VERSION (CPU) from download.pytorch.org"
exec "$PIP" install "torch==$TORCH_VERSION" --index-url https://download.pytorch.org/whl/cpu \
    --extra-index-url https://pypi.org/simple
