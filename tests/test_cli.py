"""The demo command runs end to end and every step matches the oracle."""

from mmassembler.__main__ import main
from mmassembler.demo import DemoConfig, TinyVisionEncoder, run_demo


def test_demo_command_succeeds(capsys):
    assert main(["demo", "--requests", "3", "--hidden", "64"]) == 0
    out = capsys.readouterr().out
    assert "all steps match" in out and "enc calls" in out


def test_demo_chunks_cut_items_and_reuse_the_cache():
    rows = run_demo(DemoConfig(requests=4, hidden=32, chunk=24))
    assert len(rows) > 1 and all(r["match"] for r in rows)
    assert all(r["encoder_calls"] <= 1 for r in rows)  # one batched call per step at most
    assert sum(r["mm_rows"] for r in rows) > 0


def test_encoder_rows_follow_image_size():
    import torch

    enc = TinyVisionEncoder(hidden=16)
    assert enc(torch.randn(3, 64, 32)).shape == (TinyVisionEncoder.rows_for(64, 32), 16) == (8, 16)


def test_version_and_info(capsys):
    import pytest

    from mmassembler import __version__

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"mmassembler {__version__}"
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "torch " in out and "backend auto: " in out and "device: " in out


def test_demo_on_a_missing_device_says_so(capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["demo", "--device", "cuda"]) == 2
    assert "no CUDA device" in capsys.readouterr().out


import pytest  # noqa: E402


@pytest.mark.parametrize("args,says", [(["--requests", "0"], "--requests takes a number from 1"),
                                       (["--requests", "x"], "--requests takes a whole number"),
                                       (["--hidden", "-4"], "--hidden takes a number from 1"),
                                       (["--device", "mps"], "--device takes cpu, cuda or cuda:N")])
def test_bad_demo_arguments_get_one_line_naming_the_option(capsys, args, says):
    with pytest.raises(SystemExit) as exit_:
        main(["demo", *args])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and says in err and "Traceback" not in err
