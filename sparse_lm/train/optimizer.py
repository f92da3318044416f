"""The DeepSeek-V4 optimizer (spec §11): Muon for matrices, AdamW for the rest.

Muon, per logically independent matrix W [n, m] (every expert's matrices, every layer of a
stacked cycle and every output-projection group are separate matrices: all axes before the last
two are batch axes):

    M <- mu M + G                                  (plain momentum, no bias correction)
    O <- HybridNS(mu M + G)                        (Nesterov)
    O <- O * sqrt(max(n, m)) * rms_scale           (RMS rescale: AdamW's lr / wd carry over)
    W <- W (1 - lr wd) - lr O

HybridNS: X0 = X / ||X||_F, then X <- a X + b (X X^T) X + c (X X^T)^2 X, 8 steps with
(3.4445, -4.7750, 2.0315) and 2 steps with (2, -1.5, 0.5), on the wide orientation.

What differs from `optax.contrib.muon`: its momentum is a bias-corrected moving average, its
non-matrix branch is NAdam with b2 0.999, and it sends every 2-D parameter (embedding and head
included) to Muon. We reuse only its Newton-Schulz iteration (with per-step coefficients) and its
RMS rescale; the momentum step and the parameter split are ours.

AdamW (b1 0.9, b2 0.95, eps 1e-20, weight decay 0.1) takes the embedding, the output head, every
RMSNorm weight, the mHC static terms (`base`, `scale`), attention sinks and compressor `ape`.
Router biases and hash tables are not parameters (`nnx.Param`) and never reach the optimizer.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
# Newton-Schulz with per-step coefficients and the consistent-RMS rescale of optax's Muon.
from optax.contrib._muon import (MuonDimensionNumbers, _scale_update_for_consistent_rms,
                                 orthogonalize_via_newton_schulz)

from sparse_lm.sharding.constraints import map_over_devices

NS_COEFFS = ((3.4445, -4.7750, 2.0315),) * 8 + ((2.0, -1.5, 0.5),) * 2
MUON, ADAMW = "muon", "adamw"

# Parameter names (the last key of a parameter's path) that AdamW takes. `weight` is the
# RMSNorm weight (the only parameter of that name), `base` / `scale` the mHC static terms.
ADAMW_NAMES = {
    "embed": "embedding",
    "lm_head": "output head",
    "weight": "RMSNorm weight",
    "base": "mHC static bias",
    "scale": "mHC gating factor",
    "sink": "attention sink",
    "ape": "compressor position bias",
    "pair_bias": "mlp_router selector hidden bias",
    "pair_out": "mlp_router selector output weights",
    "pair_offset": "mlp_router selector output offset",
}
_TRAILING = MuonDimensionNumbers(reduction_axis=-2, output_axis=-1)


class OptimizerConfigError(ValueError):
    pass


def _path_names(path) -> tuple[str, ...]:
    out = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                out.append(str(getattr(k, attr)))
                break
        else:
            out.append(str(k))
    while len(out) > 1 and out[-1] == "value":   # nnx.Variable leaves add a trailing "value"
        out.pop()
    return tuple(out)


def label_params(params) -> Any:
    """Same-structure tree of "muon" / "adamw" labels (explicit rules, no shape guessing).

    Raises for a parameter that no rule covers (a 1-D or scalar parameter whose name is not in
    ADAMW_NAMES): a new parameter kind must be given a rule, not silently sent somewhere.
    """
    def label(path, x):
        name = _path_names(path)[-1]
        if name in ADAMW_NAMES:
            return ADAMW
        if x.ndim >= 2:
            return MUON
        raise OptimizerConfigError(
            f"parameter {'/'.join(_path_names(path))} (shape {x.shape}) has no optimizer rule: "
            f"it is not a matrix (Muon) and its name is not one of the AdamW names "
            f"{sorted(ADAMW_NAMES)}")
    return jax.tree_util.tree_map_with_path(label, params)


def split_summary(params) -> dict[str, dict]:
    """{label: {"tensors", "params", "names": {pattern: count}}} for the start-up printout.

    Patterns drop numeric path parts, so every layer's wq_a shows as one line.
    """
    labels = label_params(params)
    out = {MUON: {"tensors": 0, "params": 0, "names": {}}, ADAMW: {"tensors": 0, "params": 0, "names": {}}}
    for (path, x), lab in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(labels)):
        pattern = "/".join(p for p in _path_names(path) if not p.isdigit())
        g = out[lab]
        g["tensors"] += 1
        g["params"] += int(x.size)
        g["names"][pattern] = g["names"].get(pattern, 0) + 1
    return out


def format_split(summary: dict[str, dict]) -> str:
    lines = []
    for lab in (MUON, ADAMW):
        g = summary[lab]
        lines.append(f"{lab:5s}: {g['tensors']} tensors, {g['params']:,} parameters")
        for pattern, n in sorted(g["names"].items()):
            lines.append(f"         {n:3d} x {pattern}")
    return "\n".join(lines)


class MomentumState(NamedTuple):
    momentum: Any


def scale_by_report_muon(*, momentum: float = 0.95, ns_coeffs=NS_COEFFS, rms_scale: float = 0.18,
                         eps: float = 1e-8) -> optax.GradientTransformation:
    """Muon direction of spec §11 (momentum, Nesterov, hybrid NS, RMS rescale), no lr / wd.

    Every leaf must have rank >= 2; its last two axes are the matrix, the others batch axes.
    """
    coeffs = jnp.asarray(ns_coeffs, jnp.float32)
    if coeffs.ndim != 2 or coeffs.shape[1] != 3:
        raise OptimizerConfigError(f"ns_coeffs must be a sequence of (a, b, c) triples, got {ns_coeffs}")

    def init(params):
        return MomentumState(jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params))

    def update(updates, state, params=None):
        del params
        m = jax.tree.map(lambda mm, g: momentum * mm + g.astype(jnp.float32), state.momentum, updates)
        nesterov = jax.tree.map(lambda mm, g: momentum * mm + g.astype(jnp.float32), m, updates)

        def direction(x):
            if x.ndim < 2:
                raise OptimizerConfigError(f"Muon got a parameter of shape {x.shape}: needs rank >= 2")
            if x.ndim > 3:
                # Stacked layers of batched matrices (e.g. [L, E, d, I]): one layer after the
                # other. Merging the batch axes into one loses E's mesh sharding (under SPMD the
                # whole stack was iterated unsharded on every device), and a vmap holds the
                # iteration's temporaries for all L layers at once (V4-Flash on v6e-256: five
                # [19, 2048, 4096] fp32 stacks per expert matrix). Same values.
                return jax.lax.map(direction, x)
            if x.ndim == 3:   # a stack of matrices: whole matrices per device under SPMD
                return map_over_devices(orthogonalize, x)
            return orthogonalize(x)

        def orthogonalize(x):
            o = orthogonalize_via_newton_schulz(x, coeffs, preconditioning="frobenius", eps=eps,
                                                dimension_numbers=_TRAILING)
            return _scale_update_for_consistent_rms(o, _TRAILING, rms_scale)
        out = jax.tree.map(direction, nesterov)
        return jax.tree.map(lambda o, g: o.astype(g.dtype), out, updates), MomentumState(m)

    return optax.GradientTransformation(init, update)


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """`config.optimizer` fields (configs/train_base.py)."""
    muon_momentum: float = 0.95
    muon_rms_scale: float = 0.18
    muon_weight_decay: float = 0.1
    adam_b1: float = 0.9
    adam_b2: float = 0.95
    adam_eps: float = 1e-20
    adam_weight_decay: float = 0.1
    grad_clip: float = 1.0           # global-norm clipping before both branches; 0 = off
    muon_lr_scale: float = 1.0       # multiplies the schedule for the Muon branch

    @classmethod
    def from_dict(cls, d) -> "OptimizerConfig":
        d = dict(d.to_dict() if hasattr(d, "to_dict") else d)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise OptimizerConfigError(f"unknown optimizer field(s) {unknown}; known: {sorted(known)}")
        return cls(**d)


def make_optimizer(opt_cfg: OptimizerConfig,
                   learning_rate: Callable[[jax.Array], jax.Array]) -> optax.GradientTransformation:
    """clip -> partition {muon: Muon + decoupled wd, adamw: AdamW} with one lr schedule.

    The partition labels come from `label_params` applied to the parameter tree at `init`.
    """
    muon_lr = (learning_rate if opt_cfg.muon_lr_scale == 1.0
               else (lambda step: learning_rate(step) * opt_cfg.muon_lr_scale))
    muon = optax.chain(
        scale_by_report_muon(momentum=opt_cfg.muon_momentum, rms_scale=opt_cfg.muon_rms_scale),
        optax.add_decayed_weights(opt_cfg.muon_weight_decay),
        optax.scale_by_learning_rate(muon_lr))
    adamw = optax.adamw(learning_rate, b1=opt_cfg.adam_b1, b2=opt_cfg.adam_b2, eps=opt_cfg.adam_eps,
                        weight_decay=opt_cfg.adam_weight_decay)
    parts = optax.partition({MUON: muon, ADAMW: adamw}, label_params)
    if opt_cfg.grad_clip > 0:
        return optax.chain(optax.clip_by_global_norm(opt_cfg.grad_clip), parts)
    return parts
