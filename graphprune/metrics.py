"""Size and cost of a PyTorch model: parameters and MACs.

MACs come from torch's ``FlopCounterMode`` (matmul, conv, attention), halved.
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from .capture.torch_fx import as_args


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_macs(model: torch.nn.Module, inputs) -> int:
    """Multiply-accumulates of one forward pass on ``inputs`` (eval mode)."""
    args, kwargs = as_args(inputs)
    was = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(*args, **kwargs)
    finally:
        model.train(was)
    return counter.get_total_flops() // 2
