"""Hyperparameter search: Optuna studies whose trials are loft training runs (issue 15).

Imports train, evaluate, registry, tracking, planner and core only (DESIGN.md); importing this
package is cheap (Optuna and torch load inside the functions that need them).
"""

from loft.hpo.space import Objective, Param, Space, config_key_problem, load_space

__all__ = ["Objective", "Param", "Space", "config_key_problem", "load_space"]
