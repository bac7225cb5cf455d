"""Search over recipes under a budget. Constraints are plain data."""

from keiryo.budget import Constraint, check_constraints, select_best

__all__ = ["Constraint", "check_constraints", "select_best"]
