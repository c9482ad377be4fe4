"""Collapsed activations: which nonlinearities act as a linear map on the data.

An activation *site* is one call of an activation: an ``nn.ReLU`` / ``ReLU6`` /
``LeakyReLU`` / ``GELU`` / ``SiLU`` module (and the GELU / SiLU modules of
Hugging Face ``transformers.activations``), or, when ``torch.fx`` can trace the
model, a functional ``F.relu`` / ``torch.relu`` / ``x.relu()`` / ``F.gelu`` /
``F.silu`` / ``F.relu6`` / ``F.leaky_relu`` call.  With fx, a module called
twice (torchvision's ``BasicBlock.relu``) gives two sites; without fx, the calls
of one module are pooled into one site.

Two scores per site, both low when the site is (nearly) linear:

* **EASIER entropy** (Quétu et al. 2024): per channel ``c``, ``p_c`` is the
  fraction of the activation's *inputs* that are positive (the neuron is
  "on"), pooled over every calibration sample and every spatial / token
  position; the site's entropy is the mean over channels of the binary entropy
  ``H(p_c)`` in bits, so ``0 <= entropy <= 1``.  For ``ReLU6`` "on" means the
  identity region ``0 < x < 6``.
* **TLC** (from BatchNorm statistics, no data): where a BatchNorm directly feeds
  the site, the mean over channels of ``Phi(-|beta_c| / |gamma_c|)``, the
  probability that a Gaussian pre-activation with mean ``beta_c`` and standard
  deviation ``|gamma_c|`` changes sign; ``0 <= tlc <= 0.5``.

The channel axis is 1 when the input comes from a Conv / BatchNorm, the last
axis when it comes from a Linear, else 1 for tensors of rank >= 4 and the last
axis otherwise (``[N, C]`` and ``[B, T, C]``).

The state of a site says which linear map it acts as, judged over all elements
with tolerance ``tol``: ``"identity"`` (at least ``1 - tol`` of the inputs are in
the identity region), ``"zero"`` (at least ``1 - tol`` are ``<= 0``: ReLU gives
0, LeakyReLU scales by its negative slope, GELU / SiLU are only approximately 0),
``"saturated"`` (ReLU6 inputs ``>= 6``), ``"masked"`` (each channel on its own is
identity or zero, both occur: the site acts as a fixed 0/1 diagonal, entropy
near 0), ``"mixed"``, ``"unreached"`` (data given, the site never ran) or
``"unmeasured"`` (no data).  The model is never modified (every module's
train/eval flag is restored).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..calibration import Calibration, run_checked
from ..errors import InvalidArgumentError
from .plan import RankedEntries

_MODULE_KINDS = ((nn.ReLU6, "relu6"), (nn.ReLU, "relu"), (nn.LeakyReLU, "leaky_relu"), (nn.GELU, "gelu"),
                 (nn.SiLU, "silu"))
_FUNCTION_KINDS = {F.relu: "relu", torch.relu: "relu", torch.relu_: "relu", F.relu_: "relu", F.gelu: "gelu",
                   F.silu: "silu", F.relu6: "relu6", F.leaky_relu: "leaky_relu"}
_METHOD_KINDS = {"relu": "relu", "relu_": "relu"}
_LINEAR = (nn.Linear, nn.modules.conv._ConvNd)
_PASS_THROUGH = (nn.Dropout, nn.Identity)
SCORES = ("entropy", "tlc")
STATES = ("identity", "zero", "saturated", "masked", "mixed", "unreached", "unmeasured")


@dataclass(frozen=True)
class ActivationStat:
    """One activation site.  ``name`` is unique in a report: the module path for a
    module called once, else the fx node name (``node``) of that call."""

    name: str
    kind: str  # "relu" | "relu6" | "leaky_relu" | "gelu" | "silu"
    module: str | None  # module path; None for a functional call
    node: str | None  # fx node name; None when the model could not be traced
    entropy: float | None  # EASIER entropy in bits (None without data / never reached)
    positive_fraction: float | None  # fraction of all inputs > 0
    state: str  # "identity" | "zero" | "saturated" | "masked" | "mixed" | "unreached" | "unmeasured"
    slope: float | None  # slope of the linear map the site acts as (None unless identity/zero/saturated)
    channels: int | None  # channels seen (None when their count varied between calls)
    identity_channels: int | None  # channels whose inputs are >= 1 - tol in the identity region
    zero_channels: int | None  # channels whose inputs are >= 1 - tol at most 0
    tlc: float | None  # mean Phi(-|beta|/|gamma|) of the BatchNorm feeding the site
    tlc_positive_fraction: float | None  # mean Phi(beta/|gamma|): predicted fraction > 0
    bn: str | None  # BatchNorm directly feeding the site
    before: str | None  # Conv/Linear whose output reaches the site through nothing but ``bn``
    after: str | None  # the only consumer, a Conv/Linear (through Dropout/Identity)
    calls: int  # calls recorded over the calibration data


@dataclass(frozen=True)
class ActivationReport(RankedEntries):
    """Activation sites ranked by ``score`` (lowest, most linear, first; unscored last)."""

    what = "activation site"

    score: str
    entries: tuple[ActivationStat, ...]

    def to_dict(self) -> dict:
        return {"score": self.score, "entries": [asdict(e) for e in self.entries]}

    @classmethod
    def from_dict(cls, data: dict) -> ActivationReport:
        return cls(score=data["score"], entries=tuple(ActivationStat(**e) for e in data["entries"]))


@dataclass
class _Site:
    """Mutable collector for one site (internal)."""

    name: str
    kind: str
    module: str | None = None
    node: str | None = None
    bn: str | None = None
    before: str | None = None
    before_kind: str | None = None  # "conv" | "linear" | "bn"
    after: str | None = None
    negative_slope: float = 0.0
    upper: float = math.inf
    calls: int = 0
    pooled: bool = False  # the channel count varied: counts were pooled to one "channel"
    counts: dict = field(default_factory=dict)  # "pos", "neg", "sat", "n": per-channel float64 tensors

    def record(self, x) -> None:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.numel() == 0:
            return
        x = x.detach()
        axis = _channel_axis(x, self.before_kind)
        dims = [d for d in range(x.dim()) if d != axis]
        per = {"pos": (x > 0) & (x < self.upper), "neg": x <= 0, "sat": x >= self.upper}
        new = {k: v.double().sum(dims) if dims else v.double() for k, v in per.items()}
        new["n"] = torch.full_like(new["pos"], x.numel() / max(new["pos"].numel(), 1))
        if self.pooled or (self.counts and self.counts["n"].shape != new["n"].shape):
            self.pooled = True
            self.counts = {k: v.sum().reshape(1) for k, v in self.counts.items()}
            new = {k: v.sum().reshape(1) for k, v in new.items()}
        self.counts = {k: self.counts.get(k, 0) + v for k, v in new.items()}
        self.calls += 1


def _channel_axis(x: torch.Tensor, before_kind: str | None) -> int:
    if x.dim() < 2:
        return 0
    if before_kind in ("conv", "bn"):
        return 1
    if before_kind == "linear":
        return x.dim() - 1
    return 1 if x.dim() >= 4 else x.dim() - 1


def _binary_entropy(p: torch.Tensor) -> torch.Tensor:
    q = p.clamp(1e-12, 1 - 1e-12)
    h = -(q * q.log2() + (1 - q) * (1 - q).log2())
    return torch.where((p <= 0) | (p >= 1), torch.zeros_like(h), h)


def _module_kind(mod: nn.Module) -> str | None:
    for cls, kind in _MODULE_KINDS:
        if isinstance(mod, cls):
            return kind
    if type(mod).__module__.startswith("transformers.activations"):
        name = type(mod).__name__.lower()
        return "gelu" if "gelu" in name else "silu" if ("silu" in name or "swish" in name) else None
    return None


def _phi(z: float) -> float:
    return 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))


def tlc_score(bn: nn.Module) -> tuple[float, float]:
    """``(mean_c Phi(-|beta_c|/|gamma_c|), mean_c Phi(beta_c/|gamma_c|))`` of a BatchNorm.

    A channel with ``gamma == 0`` is constant (``beta``): it never changes sign
    (score 0) and is positive iff ``beta > 0``.  Without affine parameters every
    channel scores 0.5.
    """
    n = bn.num_features
    gamma = bn.weight.detach().double().tolist() if bn.weight is not None else [1.0] * n
    beta = bn.bias.detach().double().tolist() if bn.bias is not None else [0.0] * n
    flips, positive = [], []
    for g, b in zip(gamma, beta):
        if g == 0:
            flips.append(0.0)
            positive.append(1.0 if b > 0 else 0.0)
        else:
            flips.append(_phi(-abs(b) / abs(g)))
            positive.append(_phi(b / abs(g)))
    return sum(flips) / n, sum(positive) / n


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Run ``model`` in eval mode without gradients; every module's own train/eval
    flag is restored on exit (mixed modes survive)."""
    flags = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        for m, flag in flags.items():
            m.training = flag


# -- finding sites --------------------------------------------------------------------------------------

def _trace(model: nn.Module):
    """An fx GraphModule of ``model`` or None when fx cannot trace it."""
    try:
        return torch.fx.symbolic_trace(model)
    except Exception:  # any tracing failure means "use module hooks"
        return None


def _node_kind(node, modules: dict) -> str | None:
    if node.op == "call_module":
        return _module_kind(modules[node.target])
    if node.op == "call_function":
        return _FUNCTION_KINDS.get(node.target)
    if node.op == "call_method":
        return _METHOD_KINDS.get(node.target)
    return None


def _module_of(node, modules: dict, types) -> str | None:
    if node is not None and node.op == "call_module" and isinstance(modules[node.target], types):
        return node.target
    return None


def _linear_kind(mod: nn.Module) -> str:
    return "linear" if isinstance(mod, nn.Linear) else "conv"


def _neighbours(site: _Site, node, modules: dict) -> None:
    """Fill ``bn`` / ``before`` / ``after`` of a traced site (only where the chain is unbranched)."""
    src = node.args[0] if node.args else node.kwargs.get("input")
    if not isinstance(src, torch.fx.Node):
        return
    site.bn = _module_of(src, modules, nn.modules.batchnorm._BatchNorm)
    if site.bn is not None:
        site.before_kind = "bn"
        inner = src.args[0] if src.args and isinstance(src.args[0], torch.fx.Node) else None
        if len(src.users) == 1 and inner is not None and len(inner.users) == 1:
            site.before = _module_of(inner, modules, _LINEAR)
    elif len(src.users) == 1:
        site.before = _module_of(src, modules, _LINEAR)
        if site.before is not None:
            site.before_kind = _linear_kind(modules[site.before])
    user = node
    while len(user.users) == 1:
        user = next(iter(user.users))
        if _module_of(user, modules, _PASS_THROUGH) is None:
            site.after = _module_of(user, modules, _LINEAR)
            return


def _slope_and_upper(site: _Site, node=None, mod: nn.Module | None = None) -> None:
    if site.kind == "leaky_relu":
        if mod is not None:
            site.negative_slope = float(mod.negative_slope)
        else:
            site.negative_slope = float(node.kwargs.get("negative_slope", node.args[1] if len(node.args) > 1
                                                        else 0.01))
    if site.kind == "relu6":
        site.upper = 6.0


def _fx_sites(gm: torch.fx.GraphModule) -> dict[str, _Site]:
    """Sites of a traced model, keyed by fx node name."""
    modules = dict(gm.named_modules())
    found = [(n, k) for n in gm.graph.nodes if (k := _node_kind(n, modules)) is not None]
    module_calls: dict[str, int] = {}
    for n, _ in found:
        if n.op == "call_module":
            module_calls[n.target] = module_calls.get(n.target, 0) + 1
    sites = {}
    for n, kind in found:
        module = n.target if n.op == "call_module" else None
        name = module if module is not None and module_calls[module] == 1 else n.name
        site = _Site(name=name, kind=kind, module=module, node=n.name)
        _slope_and_upper(site, node=n, mod=modules[module] if module else None)
        _neighbours(site, n, modules)
        sites[n.name] = site
    return sites


def _module_sites(model: nn.Module) -> dict[str, _Site]:
    """Sites of an untraced model, keyed by module path (calls of one module pooled)."""
    sites = {}
    for path, mod in model.named_modules():
        kind = _module_kind(mod)
        if kind is not None and path:
            site = _Site(name=path, kind=kind, module=path)
            _slope_and_upper(site, mod=mod)
            sites[path] = site
    return sites


# -- running ----------------------------------------------------------------------------------------

class _Recorder(torch.fx.Interpreter):
    """Runs a GraphModule and hands the first input of every site node to the site."""

    def __init__(self, gm: torch.fx.GraphModule, sites: dict[str, _Site]):
        super().__init__(gm)
        self.sites = sites

    def run_node(self, n):
        site = self.sites.get(n.name)
        if site is not None:
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            site.record(args[0] if args else kwargs.get("input"))
        return super().run_node(n)


def _placeholder_values(gm: torch.fx.GraphModule, batch, index: int) -> list:
    from ..capture.torch_fx import as_args

    args, kwargs = as_args(batch)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    unknown = set(kwargs) - {n.target for n in placeholders}
    if unknown:
        raise InvalidArgumentError(f"calibration batch {index} has keys the model does not take: {sorted(unknown)}")
    values = list(args)
    for n in placeholders[len(args):]:
        if n.target in kwargs:
            values.append(kwargs[n.target])
        elif n.args:
            values.append(n.args[0])
        else:
            raise InvalidArgumentError(f"calibration batch {index} gives no value for model input {n.target!r}")
    return values


def _run_hooked(model: nn.Module, sites: dict[str, _Site], batch, index: int) -> None:
    def pre_hook(site):
        return lambda mod, args, kwargs: site.record(args[0] if args else kwargs.get("input"))

    modules = dict(model.named_modules())
    handles = [modules[path].register_forward_pre_hook(pre_hook(site), with_kwargs=True)
               for path, site in sites.items()]
    try:
        run_checked(model, batch, index)
    finally:
        for h in handles:
            h.remove()


def _collect(model: nn.Module, calibration: Calibration) -> dict[str, _Site]:
    """Sites with statistics.  fx sites when tracing works and the traced graph runs the
    first batch; otherwise module sites with forward pre-hooks."""
    gm = _trace(model)
    sites = _fx_sites(gm) if gm is not None else _module_sites(model)
    for i, batch in enumerate(calibration):
        if gm is None:
            _run_hooked(model, sites, batch, i)
            continue
        values = _placeholder_values(gm, batch, i)
        try:
            _Recorder(gm, sites).run(*values)
        except Exception as err:
            if i > 0:
                raise InvalidArgumentError(f"calibration batch {i} does not fit the traced model: "
                                           f"{type(err).__name__}: {str(err).strip()[:150]}") from err
            gm, sites = None, _module_sites(model)  # the trace does not run the data: fall back
            _run_hooked(model, sites, batch, i)
    return sites


# -- report ---------------------------------------------------------------------------------------

def _state(site: _Site, tol: float) -> dict:
    """State, slope, entropy, positive fraction and channel counts from the collected counts."""
    if not site.counts:
        return {"state": "unreached", "slope": None, "entropy": None, "positive_fraction": None,
                "channels": None, "identity_channels": None, "zero_channels": None}
    c = site.counts
    n_c = c["n"].clamp_min(1)
    n = float(c["n"].sum())
    frac = {k: float(c[k].sum()) / n for k in ("pos", "neg", "sat")}
    on, off = int((c["pos"] / n_c >= 1 - tol).sum()), int((c["neg"] / n_c >= 1 - tol).sum())
    out = {"entropy": float(_binary_entropy(c["pos"] / n_c).mean()), "positive_fraction": frac["pos"] + frac["sat"],
           "channels": None if site.pooled else c["n"].numel(), "identity_channels": None if site.pooled else on,
           "zero_channels": None if site.pooled else off, "slope": None}
    if frac["pos"] >= 1 - tol:
        out.update(state="identity", slope=1.0)
    elif frac["neg"] >= 1 - tol:
        out.update(state="zero", slope=site.negative_slope)
    elif frac["sat"] >= 1 - tol:
        out.update(state="saturated", slope=0.0)
    else:
        out["state"] = "masked" if not site.pooled and on + off == c["n"].numel() else "mixed"
    return out


def _stat(site: _Site, modules: dict, tol: float, measured: bool) -> ActivationStat:
    fields = _state(site, tol)
    if not measured:
        fields["state"] = "unmeasured"
    tlc = tlc_pos = None
    if site.bn is not None:
        tlc, tlc_pos = tlc_score(modules[site.bn])
    return ActivationStat(name=site.name, kind=site.kind, module=site.module, node=site.node, tlc=tlc,
                          tlc_positive_fraction=tlc_pos, bn=site.bn, before=site.before, after=site.after,
                          calls=site.calls, **fields)


def _ranked(entries, score: str) -> tuple[ActivationStat, ...]:
    """Stable sort: scored entries by ascending ``score``, then unscored ones in model order."""
    scored = [e for e in entries if getattr(e, score) is not None]
    return tuple(sorted(scored, key=lambda e: getattr(e, score))) + tuple(
        e for e in entries if getattr(e, score) is None)


def activation_report(model: nn.Module, calibration=None, max_batches: int | None = None,
                      tol: float = 0.01) -> ActivationReport:
    """Score every activation site of ``model`` (see the module docstring).

    ``calibration``: a tensor, tuple/dict batch, list of batches or DataLoader
    (see :class:`graphprune.calibration.Calibration`); ``None`` gives TLC scores
    only (no forward pass, sites found by tracing when possible).  The report is
    ranked by entropy when data is given, else by TLC.  ``model`` is untouched.
    """
    if not isinstance(model, nn.Module):
        raise InvalidArgumentError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0 <= tol < 0.5:
        raise InvalidArgumentError(f"tol must be a number in [0, 0.5), got {tol!r}")
    cal = Calibration(calibration, max_batches, desc="activation report") if calibration is not None else None
    with eval_mode(model):
        if cal is None:
            gm = _trace(model)
            sites = _fx_sites(gm) if gm is not None else _module_sites(model)
        else:
            sites = _collect(model, cal)
    modules = dict(model.named_modules())
    entries = [_stat(s, modules, tol, cal is not None) for s in sites.values()]
    score = "entropy" if cal is not None else "tlc"
    return ActivationReport(score=score, entries=_ranked(entries, score))


def choose_linearise(report: ActivationReport, k: int | None = None, threshold: float | None = None,
                     score: str = "entropy", states=None) -> list[str]:
    """Names of the sites to linearise: those with ``score`` below ``threshold``
    (strictly), then the ``k`` lowest of them; at least one of ``k`` / ``threshold``
    is required.  Sites without that score are never chosen.

    A low score means "acts linearly", not "acts as identity": a ``"zero"`` site
    is a low-entropy site too.  Replacing every chosen site by the identity is
    the EASIER recipe (followed by fine-tuning); ``states=("identity",)`` keeps
    only sites that already act as identity on the data.  Names are module paths
    (every call of that module) or fx node names (that call only).
    """
    _check_choice(report, k, threshold, score, states)
    ranked = [e for e in _ranked(report.entries, score)
              if getattr(e, score) is not None and (states is None or e.state in states)]
    if k is not None and k > len(ranked):
        where = f" in states {tuple(states)}" if states is not None else ""
        raise InvalidArgumentError(f"k={k} but the report has only {len(ranked)} activation sites with a "
                                   f"{score!r} score{where}")
    if threshold is not None:
        ranked = [e for e in ranked if getattr(e, score) < threshold]
    return [e.name for e in (ranked if k is None else ranked[:k])]


def _check_choice(report, k, threshold, score, states) -> None:
    if not isinstance(report, ActivationReport):
        raise InvalidArgumentError(f"report must be an ActivationReport, got {type(report).__name__}")
    if score not in SCORES:
        raise InvalidArgumentError(f"score must be one of {SCORES}, got {score!r}")
    if k is None and threshold is None:
        raise InvalidArgumentError("choose_linearise needs k or threshold (or both)")
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 0):
        raise InvalidArgumentError(f"k must be a non-negative integer, got {k!r}")
    if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, (int, float))):
        raise InvalidArgumentError(f"threshold must be a number, got {threshold!r}")
    if states is not None and (isinstance(states, str) or not set(states) <= set(STATES)):
        raise InvalidArgumentError(f"states must be a list drawn from {STATES}, got {states!r}")
