"""Shared test helpers (imported by test modules; not a conftest)."""

import torch

from graphprune.zoo import lively_init


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_untouched(model, snap):
    state = model.state_dict()
    assert state.keys() == snap.keys()
    for k, v in snap.items():
        assert torch.equal(state[k], v), f"{k} changed"


def lively(model, seed=0):
    torch.manual_seed(seed)
    return lively_init(model.eval(), seed)
