"""Meshes, logical axis rules, named presets, activation constraints, expert parallelism.

Light imports only (the model imports `constraints` and `expert_parallel`); the plan / step
builders live in `sparse_lm.sharding.plan` (it imports the model and the training steps).
"""
from sparse_lm.sharding.constraints import active, constrain, use_rules  # noqa: F401
from sparse_lm.sharding.mesh import AXES, ShardingError, make_mesh, resolve_axis_sizes  # noqa: F401
from sparse_lm.sharding.presets import PRESETS, ShardingPreset, load_preset  # noqa: F401
