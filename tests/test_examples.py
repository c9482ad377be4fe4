"""The example scripts run end to end (small settings), so they cannot rot."""

import sys
from pathlib import Path

import onnx
from onnx_graphs import conv_net

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))


def test_prune_onnx_file_example(tmp_path, capsys):
    from prune_onnx_file import main

    src = tmp_path / "net.onnx"
    onnx.save(conv_net(), str(src))
    out = tmp_path / "slim.onnx"
    main(str(src), macs=0.5, out=str(out))
    assert "oracle" in capsys.readouterr().out
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)


def test_prune_and_verify_example(tmp_path, monkeypatch, capsys):
    from prune_and_verify import main

    monkeypatch.chdir(tmp_path)
    main("squeezenet1_1", 0.3)
    assert "oracle" in capsys.readouterr().out
    assert (tmp_path / "squeezenet1_1-slim.pt").exists()
