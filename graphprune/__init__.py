"""graphprune: structural pruning that makes trained networks physically smaller.

    import graphprune as gp
    plan = gp.plan(model, x, ratio=0.5, ignore=[model.fc])
    slim = gp.apply(model, plan)
    gp.verify(model, slim, plan, x)
"""

from .api import analyze, apply, compensate, plan, prune, verify
from .apply.hf_config import load_pretrained
from .apply.onnx_export import export_onnx, fold_batchnorm
from .coupling import list_rules
from .errors import (
                     CaptureError,
                     FoldError,
                     GraphPruneError,
                     InvalidArgumentError,
                     PlanError,
                     UnsupportedOpError,
                     VerificationError,
)
from .layerfold import (
                     FoldPlan,
                     FoldReport,
                     FoldStep,
                     apply_fold,
                     apply_fold_onnx,
    block_report_onnx,
                     fold,
                     fold_onnx,
                     plan_fold,
                     plan_fold_onnx,
    remove_blocks_onnx,
)
from .layerfold.blocks import BlockReport, BlockScore, block_report, remove_blocks
from .layerfold.collapse import ActivationReport, ActivationStat, activation_report, choose_linearise
from .metrics import count_macs, count_params
from .onnx_api import (
                     analyze_onnx,
                     apply_onnx,
                     count_macs_onnx,
                     count_params_onnx,
                     latency_onnx,
                     plan_onnx,
                     prune_onnx,
                     save_onnx,
                     verify_onnx,
)
from .planning.plan import PlanGroup, PlanMember, PruningPlan
from .regularize import BNL1, GroupLasso
from .scoring import Importance, list_importance, register_importance

__version__ = "0.1.0"

__all__ = [
    "load_pretrained",
    "analyze", "apply", "compensate", "plan", "prune", "verify", "count_macs", "count_params", "list_rules",
    "PruningPlan", "PlanGroup", "PlanMember", "Importance", "list_importance", "register_importance",
    "GraphPruneError", "CaptureError", "InvalidArgumentError", "PlanError", "UnsupportedOpError",
    "VerificationError", "analyze_onnx", "plan_onnx", "apply_onnx", "prune_onnx", "verify_onnx",
    "count_params_onnx", "count_macs_onnx", "latency_onnx", "save_onnx", "export_onnx", "fold_batchnorm",
    "GroupLasso", "BNL1",
    "fold", "plan_fold", "apply_fold", "fold_onnx", "plan_fold_onnx", "apply_fold_onnx",
    "FoldPlan", "FoldStep", "FoldReport", "FoldError",
    "block_report", "remove_blocks", "block_report_onnx", "remove_blocks_onnx", "BlockReport", "BlockScore",
    "activation_report", "choose_linearise", "ActivationReport", "ActivationStat",
]
