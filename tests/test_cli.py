"""The command-line tools run end to end (in-process, on this machine's device)."""
from llama_triton import cli


def test_verify_passes_and_prints_a_table(capsys):
    assert cli.main(["verify", "--op", "rms_norm", "--dtype", "float32"]) == 0
    out = capsys.readouterr().out
    assert "max abs err" in out and "PASS" in out and "FAIL" not in out


def test_bench_on_this_machine(capsys, tmp_path):
    import torch

    if torch.cuda.is_available():  # a real (short) benchmark writes its files
        assert cli.main(["bench", "--op", "rms_norm", "--out", str(tmp_path)]) == 0
        assert (tmp_path / "ops-rms_norm.json").exists()
    else:
        assert cli.main(["bench", "--op", "rms_norm"]) == 0
        assert "not performance figures" in capsys.readouterr().out
