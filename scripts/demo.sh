#!/usr/bin/env bash
# The README's main command: set up .venv (first run only) and run the demo on the embedded tiny model.
# Extra arguments go to `llama-triton demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh hf
exec "${LLAMA_TRITON_VENV:-.venv}/bin/llama-triton" demo "$@"
