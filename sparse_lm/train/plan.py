"""A sharding plan: preset + mesh + the shardings of the train state and batch, and the sharded
(jit with explicit in/out shardings) train and eval steps. It sits above the model and the train
steps (it builds both); the presets, meshes and rules it reads are in sparse_lm/sharding.

    plan = make_plan("fsdp_tp", model_cfg, tx)              # over jax.devices()
    state = plan.init_state(seed=0)                         # created directly sharded
    step = plan.train_step(tx, schedule, loss_cfg, sparse=True)
    state, metrics = step(state, plan.global_batch(local_rows))

`plan.metadata()` is the resolved preset (mesh sizes, rules, per-parameter specs) for the run's
metadata. The same plan works with abstract devices (a TPU topology on a CPU host): then use
`plan.abstract_state()` and `step.lower(...)`.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from sparse_lm.config import ModelConfig
from sparse_lm.model import build_model
from sparse_lm.sharding import partition
from sparse_lm.sharding.constraints import use_rules
from sparse_lm.sharding.mesh import ShardingError, axis_sizes, describe
from sparse_lm.sharding.presets import ShardingPreset, load_preset
from sparse_lm.sharding.rules import spec_for
from sparse_lm.train import steps as steps_lib


@dataclasses.dataclass
class ShardingPlan:
    preset: ShardingPreset
    mesh: Mesh
    model_cfg: ModelConfig          # with the preset's moe_dispatch applied
    graphdef: Any
    abstract: Any                   # TrainState of ShapeDtypeStructs (no shardings)
    shardings: Any                  # TrainState of NamedShardings
    batch_sharding: NamedSharding   # [B, S+1] token / segment rows
    replicated: NamedSharding
    notes: dict                     # {param path: divisibility notes}
    tx: Any = None

    # ------------------------------------------------------------------ context
    def rules_context(self):
        return use_rules(self.mesh, self.preset.rules, preset=self.preset.name)

    @property
    def sizes(self) -> dict[str, int]:
        return axis_sizes(self.mesh)

    def metadata(self) -> dict:
        """The resolved preset for the run's metadata (config.json / checkpoint meta)."""
        meta = self.preset.metadata(self.mesh)
        meta["devices"] = int(self.mesh.devices.size)
        meta["mesh_str"] = describe(self.mesh)
        meta["model_moe_dispatch"] = self.model_cfg.moe_dispatch
        meta["batch_spec"] = str(self.batch_sharding.spec)
        meta["param_specs"] = partition.spec_dump(self.abstract.params, self.sizes, self.preset.rules)
        meta["divisibility_notes"] = self.notes
        rep = partition.replication_report(self.abstract.params, self.sizes, self.preset.rules)
        meta["replication"] = {k: v for k, v in rep.items() if k != "replicated"}
        return meta

    # ------------------------------------------------------------------ state
    def abstract_state(self) -> Any:
        """TrainState of ShapeDtypeStructs carrying this plan's shardings (for AOT / restore)."""
        return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            self.abstract, self.shardings)

    def init_state(self, seed: int = 0) -> Any:
        """Initialise the model and optimizer directly into the sharded layout (jit with
        out_shardings: no device ever holds the whole model)."""
        cfg, tx = self.model_cfg, self.tx

        def init():
            model = build_model(cfg, seed=seed)
            _, state = steps_lib.init_train_state(model, tx)
            return state
        with self.rules_context():
            return jax.jit(init, out_shardings=self.shardings)()

    def shard_state(self, state) -> Any:
        return jax.device_put(state, self.shardings)

    # ------------------------------------------------------------------ batches
    def check_batch(self, global_batch: int) -> None:
        """Raise if the global batch does not split over the preset's batch axes."""
        n = 1
        spec = self.batch_sharding.spec
        if spec and spec[0] is not None:
            axes = (spec[0],) if isinstance(spec[0], str) else spec[0]
            n = int(np.prod([self.sizes[a] for a in axes]))
        if global_batch % n:
            raise ShardingError(f"batch size {global_batch} does not split over the batch axes "
                                f"{spec[0]} of preset {self.preset.name!r} ({n} shards): use a "
                                f"multiple of {n}")

    def global_batch(self, local: dict) -> dict:
        """Per-process rows {name: [local B, ...]} -> global arrays sharded like the batch."""
        rows = next(iter(local.values())).shape[0]
        self.check_batch(rows * jax.process_count())
        return {k: jax.make_array_from_process_local_data(self.batch_sharding, np.asarray(v))
                for k, v in local.items()}

    def batch_spec_struct(self, global_batch: int, seq_len: int) -> dict:
        """ShapeDtypeStructs of a global batch {tokens, segment_ids} [B, S+1] (for AOT)."""
        self.check_batch(global_batch)
        s = jax.ShapeDtypeStruct((global_batch, seq_len + 1), jnp.int32, sharding=self.batch_sharding)
        return {"tokens": s, "segment_ids": s}

    # ------------------------------------------------------------------ steps
    def shard_step(self, fn, in_shardings, out_shardings, donate_argnums=()):
        """jit(fn) with explicit shardings; fn is traced inside this plan's rules context."""
        mesh, rules, name = self.mesh, self.preset.rules, self.preset.name

        @functools.wraps(fn)
        def traced(*args):
            with use_rules(mesh, rules, preset=name):
                return fn(*args)
        return jax.jit(traced, in_shardings=in_shardings, out_shardings=out_shardings,
                       donate_argnums=donate_argnums)

    def train_step(self, schedule, loss_cfg, *, sparse: bool = True, implementation=None,
                   donate: bool = True, **step_kwargs):
        """The training engineer's `train_step` (forward, backward, optimizer, router-bias
        update) as jit with in_shardings=(state, batch), out_shardings=(state, replicated)."""
        fn = functools.partial(steps_lib.train_step, graphdef=self.graphdef, tx=self.tx,
                               schedule=schedule, loss_cfg=loss_cfg, sparse=sparse,
                               implementation=implementation, **step_kwargs)
        return self.shard_step(fn, (self.shardings, self.batch_sharding),
                               (self.shardings, self.replicated),
                               donate_argnums=(0,) if donate else ())

    def eval_step(self, *, sparse: bool = True, implementation=None):
        fn = functools.partial(steps_lib.eval_step, graphdef=self.graphdef, sparse=sparse,
                               implementation=implementation)
        return self.shard_step(fn, (self.shardings.params, self.shardings.buffers,
                                    self.batch_sharding), self.replicated)


def make_plan(preset: str | ShardingPreset, model_cfg: ModelConfig, tx,
              devices: Sequence | None = None, *, slices: int | None = None) -> ShardingPlan:
    """Resolve a preset on `devices` (default all) for a model config and optimizer."""
    preset = load_preset(preset)
    mesh = preset.make_mesh(devices, slices=slices)
    cfg = preset.with_moe_dispatch(model_cfg)
    graphdef, abstract = steps_lib.abstract_train_state(lambda: build_model(cfg), tx)
    sizes = axis_sizes(mesh)
    replicated = NamedSharding(mesh, P())
    notes: dict = {}
    p_specs = partition.state_specs(abstract.params, sizes, preset.rules, notes)
    b_specs = partition.state_specs(abstract.buffers, sizes, preset.rules, notes)
    p_sh = partition.to_named(p_specs, mesh)
    b_sh = partition.to_named(b_specs, mesh)
    opt_sh = partition.match_param_shardings(abstract.opt_state, abstract.params, p_sh, replicated)
    shardings = steps_lib.TrainState(p_sh, b_sh, opt_sh, replicated)
    batch_spec = spec_for(("activation_batch", None), None, sizes, preset.rules)
    return ShardingPlan(preset=preset, mesh=mesh, model_cfg=cfg, graphdef=graphdef,
                        abstract=abstract, shardings=shardings,
                        batch_sharding=NamedSharding(mesh, batch_spec), replicated=replicated,
                        notes=notes, tx=tx)
