"""Meshes, logical axis rules, named presets, activation constraints, expert parallelism.

The low floor only: nothing here imports the model, training or analysis (the model imports
`constraints` and `expert_parallel`). Built on top of it: the training plan and its sharded steps
(`sparse_lm.train.plan`) and the ahead-of-time comparison on TPU topologies (`sparse_lm.aot`).
"""
from sparse_lm.sharding.constraints import active, constrain, use_rules  # noqa: F401
from sparse_lm.sharding.mesh import AXES, ShardingError, make_mesh, resolve_axis_sizes  # noqa: F401
from sparse_lm.sharding.presets import PRESETS, ShardingPreset, load_preset  # noqa: F401
