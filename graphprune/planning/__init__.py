"""Planning: choose what to remove (framework-free)."""

from .plan import PlanGroup, PlanMember, PruningPlan
from .planner import uniform_plan

__all__ = ["PlanGroup", "PlanMember", "PruningPlan", "uniform_plan"]
