#!/bin/sh
# Installs torch into the virtual environment whose pip is $1, choosing the right build:
# - a machine with an NVIDIA driver gets the default (CUDA) build from pip's configured index;
# - a CPU-only machine gets torch $TORCH_VERSION CPU, never the multi-GB CUDA build:
#   1. from a wheel this machine already has (pip's find-links / wheel cache, as on CI);
#   2. else from the index in $TORCH_INDEX_URL (PyTorch's CPU wheel index, or a mirror of it);
#   3. else through uv, whose --torch-backend=cpu knows PyTorch's CPU index by itself.
# No index host is named here: where packages come from is the user's (or pip's, or uv's) choice.
set -eu
PIP="$1"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
TORCH_INDEX_URL="${TORCH_INDEX_URL:-}"
if "$PIP" show torch >/dev/null 2>&1; then
    echo "torch already installed: $("$PIP" show torch | sed -n 's/^Version: //p')"
    exit 0
fi
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "NVIDIA driver found: installing the CUDA build of torch from pip's index"
    exec "$PIP" install "torch>=2.4"
fi
if "$PIP" install --dry-run --no-index --no-deps -q "torch==$TORCH_VERSION" >/dev/null 2>&1; then
    echo "no NVIDIA driver: installing torch $TORCH_VERSION (CPU) from this machine's wheels"
    exec "$PIP" install "torch==$TORCH_VERSION"
fi
if [ -n "$TORCH_INDEX_URL" ]; then
    # The CPU index carries torch's own dependencies too, so it can be the only index.
    echo "no NVIDIA driver: installing torch $TORCH_VERSION (CPU) from \$TORCH_INDEX_URL"
    exec "$PIP" install "torch==$TORCH_VERSION" --index-url "$TORCH_INDEX_URL"
fi
if command -v uv >/dev/null 2>&1; then
    echo "no NVIDIA driver: installing torch $TORCH_VERSION (CPU) with uv --torch-backend=cpu"
    exec uv pip install --python "$(dirname "$PIP")/python" --torch-backend=cpu "torch==$TORCH_VERSION"
fi
cat >&2 <<EOF
no NVIDIA driver, and no CPU wheel of torch $TORCH_VERSION on this machine: a plain 'pip install torch'
would download the multi-GB CUDA build. Either set TORCH_INDEX_URL to PyTorch's CPU wheel index (the
--index-url that PyTorch's "Get started" page shows for Linux, pip, CPU) and run make again, or
install uv (it finds that index itself), or put a torch $TORCH_VERSION CPU wheel where pip finds it
(PIP_FIND_LINKS=/path/to/wheels).
EOF
exit 1
