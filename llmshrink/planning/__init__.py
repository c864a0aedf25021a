"""Planning for `target:` recipes: choose the decisions that meet a size budget at the least measured loss."""

from llmshrink.planning.solver import Option, Plan, solve

__all__ = ["Option", "Plan", "solve"]
