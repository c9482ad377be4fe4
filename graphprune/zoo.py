"""Build models from short specs, offline (no weights are downloaded).

``torchvision:resnet50`` builds ``torchvision.models.get_model("resnet50",
weights=None)``.  :func:`lively_init` gives randomly initialised models
non-degenerate norm statistics, so pruned channels really matter in tests.
"""

from __future__ import annotations

import torch

from .errors import InvalidArgumentError

DEFAULT_MODEL = "torchvision:resnet50"


def input_size(name: str, small: bool = False) -> int:
    """Input side for the torchvision classifier ``name``.

    ``small=True`` gives the smallest side that the architecture accepts
    comfortably (ViT and MaxViT are tied to 224), for fast tests.
    """
    if name.startswith(("vit_", "maxvit")):
        return 224
    if name.startswith("inception"):
        return 128 if small else 299
    return 64 if small else 224


def classifier(model: torch.nn.Module, num_classes: int = 1000) -> torch.nn.Module | None:
    """The last Linear/Conv layer producing ``num_classes`` outputs."""
    found = None
    for m in model.modules():
        if isinstance(m, torch.nn.Linear) and m.out_features == num_classes:
            found = m
        elif isinstance(m, torch.nn.Conv2d) and m.out_channels == num_classes:
            found = m
    return found


def build(spec: str, small: bool = False) -> tuple[torch.nn.Module, torch.Tensor]:
    """Return ``(model, example_input)`` for a ``family:name`` spec, in eval mode."""
    family, _, name = spec.partition(":")
    if family != "torchvision" or not name:
        raise InvalidArgumentError(f"model spec must look like 'torchvision:resnet50', got '{spec}'")
    try:
        import torchvision
    except ImportError as err:
        raise InvalidArgumentError("torchvision is not installed: pip install 'graphprune[vision]'") from err
    names = torchvision.models.list_models(module=torchvision.models)
    if name not in names:
        raise InvalidArgumentError(f"unknown torchvision classification model '{name}' (try e.g. resnet50)")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = torchvision.models.get_model(name, weights=None).eval()
    size = input_size(name, small)
    return model, torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def lively_init(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Randomise norm affine parameters and running statistics in place."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            if m.weight is not None:
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.1)
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
    for p in model.parameters():
        if p.dim() >= 2 and not p.any():  # zero-initialised heads (ViT) hide every error
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return model
