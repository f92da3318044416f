"""Inference under a sharding preset: where the Decoder's parameters, caches and token rows live.

    dec = Decoder(model, sharding="fsdp_tp")            # mesh over jax.devices()
    dec = Decoder(model, sharding="fsdp_ep", mesh=mesh)  # or a given mesh

The preset's logical rules decide every placement, as in training (`sparse_lm.train.plan`):
parameters by their `out_sharding` metadata (experts over `expert`, query heads / MLP / vocab
over `tensor`, FSDP axes as storage), the caches by `cache_logical_axes` (batch over the batch
axes, the compressed entries' length over the sequence axes of `cp` / `ep_as_cp`, the channel
dim whole), token rows [B, T] by batch. An axis that does not divide a dimension leaves it
unsplit (batch 1 on a data axis of 8: the rows are replicated), exactly as `rules.spec_for`
resolves it for training.

Every step is traced inside `use_rules(mesh, rules)`, so the model's activation constraints and
its MoE dispatcher (the preset's `moe_dispatch`) apply, and the new cache is pinned to the
cache layout, so a donated cache keeps its buffers step after step. Attention in a decode step
is the jnp `cached_attention` partitioned by XLA (GSPMD): the Pallas kernels run under
`shard_map` only in the full-sequence forward.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from sparse_lm.config import ModelConfig
from sparse_lm.inference.cache import cache_logical_axes
from sparse_lm.model import build_model
from sparse_lm.sharding import partition
from sparse_lm.sharding.constraints import use_rules
from sparse_lm.sharding.mesh import axis_sizes
from sparse_lm.sharding.presets import ShardingPreset, load_preset
from sparse_lm.sharding.rules import spec_for


def _is_names(x) -> bool:
    return isinstance(x, tuple) and all(n is None or isinstance(n, str) for n in x)


@dataclasses.dataclass(frozen=True)
class InferenceLayout:
    """A preset resolved on a mesh for one model config (the preset's dispatcher applied)."""
    preset: ShardingPreset
    mesh: Mesh
    model_cfg: ModelConfig

    @property
    def sizes(self) -> dict[str, int]:
        return axis_sizes(self.mesh)

    def rules_context(self):
        return use_rules(self.mesh, self.preset.rules, self.preset.moe_dispatch, self.preset.name)

    def named(self, names: Sequence[str | None], shape) -> NamedSharding:
        return NamedSharding(self.mesh, spec_for(names, shape, self.sizes, self.preset.rules))

    def state(self, state) -> Any:
        """NamedShardings of an nnx.State (the model's, or one layer's sliced parameters)."""
        specs = partition.state_specs(state, self.sizes, self.preset.rules)
        return partition.to_named(specs, self.mesh)

    def cache(self, cache) -> Any:
        """NamedShardings of a cache pytree (arrays or ShapeDtypeStructs)."""
        names = cache_logical_axes(cache)
        return jax.tree.map(lambda n, x: self.named(n, x.shape), names, cache, is_leaf=_is_names)

    def rows(self, shape) -> NamedSharding:
        """Per-row arrays: n_new [B], tokens [B, T]."""
        return self.named(("activation_batch",) + (None,) * (len(shape) - 1), shape)

    def constrain_cache(self, cache) -> Any:
        return jax.lax.with_sharding_constraint(cache, self.cache(cache))



def inference_layout(sharding: str | ShardingPreset, model_cfg: ModelConfig,
                     mesh: Mesh | None = None, devices: Sequence | None = None) -> InferenceLayout:
    """Resolve a preset (name with overrides, file or ShardingPreset) on `mesh`, or on a mesh
    the preset builds over `devices` (default all)."""
    preset = load_preset(sharding)
    if mesh is None:
        mesh = preset.make_mesh(devices)
    return InferenceLayout(preset=preset, mesh=mesh, model_cfg=preset.with_moe_dispatch(model_cfg))


def with_config(model, cfg: ModelConfig):
    """`model` with config `cfg`, which may differ from the model's only in settings that make
    no parameters (the preset's MoE dispatcher and capacity): the same state, merged into the
    graph of `build_model(cfg)` (built abstractly)."""
    if cfg == model.cfg:
        return model
    graphdef, state = nnx.split(model)
    new_def, new_state = nnx.split(nnx.eval_shape(lambda: build_model(cfg)))
    same = jax.tree.structure(new_state) == jax.tree.structure(state) and all(
        a.shape == b.shape for a, b in zip(jax.tree.leaves(new_state), jax.tree.leaves(state)))
    if not same:
        raise ValueError("the sharding preset's model settings change the parameters; build "
                         "the model with the preset's config (preset.with_moe_dispatch(cfg))")
    return nnx.merge(new_def, state)
