#!/usr/bin/env bash
# Create (or reuse) the project's virtualenv and install llama-triton into it, editable.
#   usage: scripts/setup_env.sh EXTRAS        e.g. scripts/setup_env.sh test,hf,plot
# Needs only python3. On a CPU machine torch comes from `torch==2.13.0` (the local CPU wheel; an unpinned
# torch would pull a multi-GB CUDA build). A torch that is already importable is kept (GPU images bring
# their own). A second run with the same setup.py and extras does nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${LLAMA_TRITON_VENV:-.venv}
EXTRAS=${1:-hf}
if [ ! -x "$VENV/bin/python" ]; then
    echo "setup: creating the virtualenv $VENV" >&2
    python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
stamp="$VENV/.setup-stamp-${EXTRAS//,/-}"
want=$(sha1sum setup.py scripts/setup_env.sh | sha1sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    exit 0
fi
if ! "$PY" -c "import torch" 2>/dev/null; then
    echo "setup: installing torch==2.13.0 (CPU wheel; a few minutes the first time)" >&2
    "$PY" -m pip install -q torch==2.13.0
fi
echo "setup: installing llama-triton and its dependencies ($EXTRAS), editable" >&2
"$PY" -m pip install -q -e ".[$EXTRAS]"
echo "setup: done" >&2
echo "$want" > "$stamp"
