"""Prune a torchvision model, prove the rewrite with the oracle, save it.

    python examples/prune_and_verify.py [model-name] [ratio]
"""

import sys

import torch
import torchvision

import graphprune as gp


def main(name: str = "mobilenet_v2", ratio: float = 0.5) -> None:
    model = torchvision.models.get_model(name, weights=None).eval()
    x = torch.randn(1, 3, 224, 224)
    head = model.classifier[-1] if hasattr(model, "classifier") else None
    plan = gp.plan(model, x, ratio=ratio, ignore=[head] if head is not None else None)
    slim = gp.apply(model, plan)
    report = gp.verify(model, slim, plan, x)
    print(plan.summary())
    print(f"params {gp.count_params(model):,} -> {gp.count_params(slim):,}")
    print(f"MACs   {gp.count_macs(model, x):,} -> {gp.count_macs(slim, x):,}")
    print(report)
    torch.save(slim, f"{name}-slim.pt")
    with open(f"{name}-slim.plan.json", "w") as f:
        f.write(plan.to_json())


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "mobilenet_v2", float(sys.argv[2]) if len(sys.argv) > 2 else 0.5)
