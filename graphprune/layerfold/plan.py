"""The frozen, JSON-serialisable result of fold planning (framework-free).

A :class:`FoldPlan` is an ordered list of :class:`FoldStep`\\ s.  Steps whose
``status`` is ``"exact"`` or ``"forced"`` are replayed in order by the apply
pass; ``"refused"`` steps only document why a candidate was left alone.
Order matters: a pair fold stores the composite in its *first* module, so a
later step naming that module reads the composite.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from ..errors import InvalidArgumentError, PlanError

KINDS = ("bn", "linear_pair", "conv_pair", "residual")
STATUSES = ("exact", "forced", "refused")


@dataclass(frozen=True)
class FoldStep:
    """One fold (or a refused candidate).

    ``modules``: ``("layer", "bn")`` for ``kind="bn"`` (``where`` says whether
    the norm comes after or before the layer), ``("first", "second")`` for a
    pair (the composite replaces ``first``; ``second`` becomes identity),
    ``("layer",)`` for a residual (``nodes`` holds the fx name of the removed
    add).  MACs are those of the layers involved, before and after.
    """

    kind: str
    modules: tuple[str, ...]
    status: str
    reason: str = ""
    where: str = ""
    nodes: tuple[str, ...] = ()
    macs_before: int = 0
    macs_after: int = 0

    def __post_init__(self):
        if self.kind not in KINDS or self.status not in STATUSES:
            raise PlanError(f"fold step has kind '{self.kind}' / status '{self.status}' "
                            f"(expected one of {KINDS} / {STATUSES})")

    @property
    def applied(self) -> bool:
        return self.status != "refused"

    def __str__(self) -> str:
        what = f"{self.kind}{'/' + self.where if self.where else ''} {' + '.join(self.modules)}"
        return f"{what}: {self.status}{' (' + self.reason + ')' if self.reason else ''}"


@dataclass(frozen=True)
class FoldPlan:
    """What to fold.  Apply it with :func:`graphprune.layerfold.apply_fold`.

    ``linearised_modules`` become identity (every call); the fx nodes in
    ``linearised_nodes`` are removed.  ``graph_module`` is true when the
    rewrite needs graph surgery (a removed functional call or residual add),
    so the folded model is a ``torch.fx.GraphModule``.
    """

    steps: tuple[FoldStep, ...]
    linearised_modules: tuple[str, ...] = ()
    linearised_nodes: tuple[str, ...] = ()
    graph_module: bool = False
    depth_before: int = 0
    meta: dict = field(default_factory=dict, hash=False, compare=False)

    @property
    def folds(self) -> tuple[FoldStep, ...]:
        return tuple(s for s in self.steps if s.applied)

    @property
    def refused(self) -> tuple[FoldStep, ...]:
        return tuple(s for s in self.steps if not s.applied)

    @property
    def forced(self) -> tuple[FoldStep, ...]:
        return tuple(s for s in self.steps if s.status == "forced")

    @property
    def depth_after(self) -> int:
        """Conv/linear calls left: every applied pair fold removes one."""
        return self.depth_before - sum(1 for s in self.folds if s.kind.endswith("_pair"))

    def summary(self) -> str:
        counts = {k: sum(1 for s in self.folds if s.kind == k) for k in KINDS}
        done = ", ".join(f"{n} {k}" for k, n in counts.items() if n) or "nothing"
        return (f"FoldPlan(folds {done}; {len(self.refused)} refused; {len(self.forced)} forced; "
                f"depth {self.depth_before} -> {self.depth_after})")

    def to_json(self, indent: int | None = None) -> str:
        data = asdict(self)
        return json.dumps({"version": 1, **data}, indent=indent)

    @classmethod
    def from_json(cls, text: str) -> FoldPlan:
        try:
            data = json.loads(text)
            steps = tuple(FoldStep(s["kind"], tuple(s["modules"]), s["status"], s.get("reason", ""),
                                   s.get("where", ""), tuple(s.get("nodes", ())), int(s.get("macs_before", 0)),
                                   int(s.get("macs_after", 0))) for s in data["steps"])
            return cls(steps, tuple(data.get("linearised_modules", ())), tuple(data.get("linearised_nodes", ())),
                       bool(data.get("graph_module", False)), int(data.get("depth_before", 0)),
                       dict(data.get("meta", {})))
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise PlanError(f"not a graphprune fold plan: {type(err).__name__}: {err}") from err


@dataclass(frozen=True)
class FoldReport:
    """What :func:`graphprune.layerfold.fold` did and how the result was checked.

    ``max_abs_diff``/``tolerance``: the exactly folded model against the
    unfolded (but linearised) one.  ``forced_max_abs_diff`` is set when the
    plan has forced steps: the measured deviation of the returned model.
    """

    plan: FoldPlan
    macs_before: int
    macs_after: int
    max_abs_diff: float
    tolerance: float
    forced_max_abs_diff: float | None = None

    @property
    def depth_before(self) -> int:
        return self.plan.depth_before

    @property
    def depth_after(self) -> int:
        return self.plan.depth_after

    @property
    def refused(self) -> tuple[FoldStep, ...]:
        return self.plan.refused

    def details(self) -> str:
        """The one-line summary, then one line per fold and per refused candidate."""
        return "\n".join([str(self), *(f"  {step}" for step in self.plan.steps)])

    def __str__(self) -> str:
        s = (f"fold: depth {self.depth_before} -> {self.depth_after}, MACs {self.macs_before:,} -> "
             f"{self.macs_after:,}, {len(self.plan.folds)} folds, {len(self.refused)} refused; "
             f"max |diff| {self.max_abs_diff:.3g} (tolerance {self.tolerance:.3g})")
        if self.plan.graph_module:
            s += "; returned a torch.fx.GraphModule"
        if self.forced_max_abs_diff is not None:
            s += f"; forced folds change outputs by up to {self.forced_max_abs_diff:.3g}"
        return s


def pair_step(kind: str, names: tuple[str, ...], first, second, first_bias_zero: bool, first_out, second_out,
              force: bool, only_if_cheaper: bool) -> FoldStep:
    """Decide one linear-pair fold from the two layers' configs (no weights read).

    ``first``/``second`` are :class:`~graphprune.layerfold.compose.ConvConfig`;
    ``*_out`` the output shapes (for MACs).  Returns a ``refused`` step with
    its reason, or the ``exact`` / ``forced`` step the caller then commits.
    Shared by the PyTorch and the ONNX pass so both refuse the same pairs.
    """
    from .compose import FoldError, composite_config, config_refusal, layer_macs

    try:
        reason = config_refusal(first, second, first_bias_zero, force=True)
        if reason:
            return FoldStep(kind, names, "refused", reason)
        soft = config_refusal(first, second, first_bias_zero)
        cfg = composite_config(first, second)
        before = layer_macs(first, first_out) + layer_macs(second, second_out)
        after = layer_macs(cfg, second_out)
    except FoldError as err:
        return FoldStep(kind, names, "refused", str(err))
    macs = {"macs_before": before, "macs_after": after}
    if soft and not force:
        return FoldStep(kind, names, "refused", soft, **macs)
    if only_if_cheaper and after > before:
        return FoldStep(kind, names, "refused", f"the folded {cfg.describe()} costs more: "
                                                f"{after:,} > {before:,} MACs", **macs)
    return FoldStep(kind, names, "forced" if soft else "exact", soft or "", **macs)


class RankedEntries:
    """Shared behaviour of ranked reports (blocks, activation sites): a frozen
    dataclass with an ``entries`` tuple of dataclasses, each with a ``name``.

    Iterating, ``len``, indexing by position or by name (an unknown name is an
    :class:`InvalidArgumentError` naming it), ``names()`` and ``to_json``;
    subclasses give ``to_dict`` and ``what`` (the noun in the error).
    """

    what = "entry"

    def __iter__(self):
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, key):
        if isinstance(key, str):
            for e in self.entries:
                if e.name == key:
                    return e
            raise InvalidArgumentError(f"no {self.what} named {key!r} in the report")
        return self.entries[key]

    def names(self) -> list[str]:
        return [e.name for e in self.entries]

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), **kwargs)

