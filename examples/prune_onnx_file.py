"""Prune an ONNX file directly, prove it in onnxruntime, and write the slim file.

    python examples/prune_onnx_file.py model.onnx [macs-to-keep]

Without a path, a ResNet-18 is exported first (torchvision, no weights downloaded).
"""

import sys

import graphprune as gp


def main(path: str | None = None, macs: float = 0.5, out: str = "slim.onnx") -> None:
    if path is None:
        import torch
        import torchvision

        path = "resnet18.onnx"
        model = torchvision.models.resnet18(weights=None).eval()
        gp.export_onnx(model, torch.randn(1, 3, 224, 224), path)  # BN folded, dynamic batch, parity-checked
    plan = gp.plan_onnx(path, macs=macs)        # the file is never modified
    slim = gp.apply_onnx(path, plan)            # passes onnx.checker (full_check)
    report = gp.verify_onnx(path, slim, plan)   # zeroed original vs slim, in onnxruntime
    print(plan.summary())
    print(f"params {gp.count_params_onnx(path):,} -> {gp.count_params_onnx(slim):,}")
    print(f"MACs   {gp.count_macs_onnx(path):,} -> {gp.count_macs_onnx(slim):,}")
    print(f"latency {gp.latency_onnx(path) * 1e3:.1f} ms -> {gp.latency_onnx(slim) * 1e3:.1f} ms")
    print(report)
    gp.save_onnx(slim, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None, float(sys.argv[2]) if len(sys.argv) > 2 else 0.5)
