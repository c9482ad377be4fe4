"""The LLaMA benchmark (benchmarks/llama.py): its graphprune worker on a tiny config and its
markdown writer."""

import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "llama.py")


def load_benchmark():
    """Import the script as a module (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location("llama_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TINY = ["--layers", "2", "--hidden", "64", "--num-heads", "8", "--kv-heads", "4", "--intermediate", "128",
        "--vocab", "100", "--seq", "8", "--skip-7b"]


def test_graphprune_worker_row_and_markdown():
    bench = load_benchmark()
    args = bench.parse_args(TINY)
    row = bench.worker_graphprune(args, 2)
    assert row["ok"] is True, row["error"]
    assert row["verified"] is True and row["verify_note"].startswith("exact")
    assert 0 < row["params_kept"] < 1 and row["runs"] and row["shape_ok"]
    assert row["groups"] == {"channel": 2, "head": 2} and row["config_gp"] is True
    md = bench.render([row], args)
    assert md.startswith("# graphprune vs Torch-Pruning on LLaMA configs")
    assert "Command: `python benchmarks/llama.py --layers 2" in md and "torch-pruning" in md
    assert "| llama-2L | graphprune | MLP+heads | yes |" in md
