#!/usr/bin/env bash
# The README's test command: set up .venv (first run only) and run the test suite.
# Without a GPU the kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1) and the
# tests marked `gpu` are skipped. Extra arguments go to pytest (e.g. `-m gpu`, `-k rms_norm`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh test,hf,plot
exec "${LLAMA_TRITON_VENV:-.venv}/bin/python" -m pytest -q "$@"
