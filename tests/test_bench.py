"""The benchmark harness's file output (the timing itself needs a GPU)."""
import json

from llama_triton import bench, registry


def test_write_results_writes_json_markdown_and_plot(tmp_path):
    row = {"op": "rms_norm", "mode": "fwd", "shape": {"rows": 8, "hidden": 64}, "dtype": "bfloat16",
           "ms": {"ours": 1.0, "eager": 2.0, "compile": 1.5}, "gbps": 10.0, "tflops": 0.0, "pct_roofline": 50.0,
           "speedup_vs_eager": 2.0, "speedup_vs_compile": 1.5, "config": "BLOCK_N=64"}
    result = {"gpu": "Test GPU", "torch": "x", "triton": "y", "date": "2026-11-25", "copy_gbps": 20.0,
              "mm_tflops": 1.0, "rows": [row]}
    out = bench.write_results(result, "ops", bench.to_markdown(result), tmp_path, bench.plot)
    assert json.loads((out / "ops.json").read_text()) == result
    md = (out / "ops.md").read_text()
    assert "| rms_norm | fwd | rows=8 hidden=64 | bfloat16 | 1.0000 | 2.0000 | 1.5000 |" in md and "2.00x" in md
    assert (out / "ops.png").stat().st_size > 0


def test_every_registry_op_has_a_positive_byte_or_flop_model():
    import torch

    for spec in registry.REGISTRY:
        for shape in spec.bench_shapes:
            assert spec.bytes(shape, torch.bfloat16, "fwd") > 0 or spec.flops(shape) > 0, (spec.name, shape)
