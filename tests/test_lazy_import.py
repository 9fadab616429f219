"""``import llama_triton; llama_triton.layers`` works (PEP 562 lazy submodules) without importing triton at
``import llama_triton`` (issue 11). In a fresh interpreter: what was imported before cannot hide it."""
import subprocess
import sys

_CODE = """
import sys
import llama_triton
assert "triton" not in sys.modules and "llama_triton.layers" not in sys.modules
assert {"layers", "model", "quant", "hf", "ops"} <= set(dir(llama_triton))
for name in ("layers", "model", "quant", "checkpoint"):
    assert getattr(llama_triton, name).__name__ == "llama_triton." + name
assert llama_triton.layers.RMSNorm and llama_triton.model.LlamaForCausalLM
try:
    llama_triton.no_such_module
except AttributeError as e:
    assert "no_such_module" in str(e)
else:
    raise SystemExit("no AttributeError")
print("ok")
"""


def test_submodules_reachable_lazily_in_a_fresh_interpreter():
    r = subprocess.run([sys.executable, "-c", _CODE], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]
