"""Expert-parallel MoE dispatch under `shard_map` over the mesh's `expert` axis.

Layout (both dispatchers): the routed rows u [T, d] (and their expert ids / combine weights
[T, k]) are split over every device of the mesh; the expert weights [E, d, I] / [E, I, d] are
split over `expert` (E_loc = E / n_ep experts per device, gathered over the other axes). Each
device sends every (token, expert) assignment to the device that owns the expert, that device
runs its experts on what it received, and the results travel back, are weighted and summed per
token. The expert-axis groups are independent: devices that differ only in other axes hold
different tokens and the same experts.

  "a2a_padded"  one `all_to_all` of a fixed [n_ep, C, d] buffer per direction (C rows per
                destination, capacity C = a = t*k for no drop, or ceil(cf * a / n_ep)); runs on
                every backend (XLA:CPU included) and is the correctness reference.
  "ragged_a2a"  `lax.ragged_all_to_all`: only the rows that exist travel, into a receive
                buffer of M rows (M = a * n_ep for no drop, or ceil(cf * a)); rows arrive
                grouped by source, are regrouped by local expert and run through
                `lax.ragged_dot`. XLA:CPU has no ragged_all_to_all (TPU/GPU only); the
                `emulate` switch replaces it by an all-gather with the same semantics, so its
                bookkeeping is testable on CPU.

Capacity (cf > 0): assignments beyond a destination's capacity are dropped (contribute 0).
a2a_padded keeps, per destination, the first C assignments in token order; ragged_a2a's receiver
accepts sources in axis order until its buffer is full. cf = 0 (model.moe_capacity_factor)
never drops.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from sparse_lm.ops import moe as moe_ops
from sparse_lm.sharding import constraints

DISPATCHERS = ("a2a_padded", "ragged_a2a")
EXPERT_AXIS = "expert"


class DispatchError(ValueError):
    """The expert-parallel dispatch cannot run as configured; the message says how to fix it."""


# ----------------------------------------------------------------------------- entry point
def buffer_rows(kind: str, routed_rows: int, n_ep: int, capacity_factor: float) -> int:
    """Rows of a device's receive buffer, which its expert matmuls run on, when it routes
    `routed_rows` (= tokens x k) assignments: a2a_padded n_ep x C with C = ceil(cf * a / n_ep)
    (a for no drop), ragged_a2a ceil(cf * a) (n_ep * a for no drop)."""
    a = routed_rows
    if kind == "a2a_padded":
        return n_ep * (a if capacity_factor <= 0 else max(1, math.ceil(capacity_factor * a / n_ep)))
    if kind == "ragged_a2a":
        return a * n_ep if capacity_factor <= 0 else max(1, math.ceil(capacity_factor * a))
    raise ValueError(f"kind={kind!r} is invalid: allowed values ('a2a_padded', 'ragged_a2a')")


def dispatch(kind: str, u, idx, weights, w_gate, w_up, w_down, *, limit: float,
             moe_impl: str = "reference", capacity_factor: float = 0.0, mesh=None,
             emulate: bool = False):
    """Routed-expert output [T, d] (u's dtype) computed with expert parallelism.

    u [T, d]; idx, weights [T, k] (global expert ids, combine weights); w_gate/w_up [E, d, I];
    w_down [E, I, d]. mesh: default the active `constraints.use_rules` mesh.
    """
    if kind not in DISPATCHERS:
        raise DispatchError(f"moe_dispatch={kind!r} is invalid: expert-parallel dispatchers are "
                            f"{DISPATCHERS} ('local' runs without this module)")
    if mesh is None:
        ctx = constraints.active()
        if ctx is None:
            raise DispatchError(
                f"model.moe_dispatch={kind!r} needs a device mesh: run the model inside a sharded "
                f"step (sparse_lm.train.plan) or `sparse_lm.sharding.use_rules(mesh, rules)`, "
                f"or set model.moe_dispatch='local'")
        mesh = ctx.mesh
    if kind == "ragged_a2a" and not emulate and mesh.devices.flat[0].platform == "cpu":
        raise DispatchError("model.moe_dispatch='ragged_a2a' uses lax.ragged_all_to_all, which "
                            "XLA:CPU does not implement; use 'a2a_padded' on CPU")
    sizes = dict(zip(mesh.axis_names, mesh.devices.shape))
    n_ep = sizes.get(EXPERT_AXIS, 1)
    t, k = idx.shape
    e = w_gate.shape[0]
    if e % n_ep:
        raise DispatchError(f"n_routed_experts={e} is not divisible by the mesh's expert axis "
                            f"size {n_ep}; use an expert size from "
                            f"{[x for x in range(1, e + 1) if e % x == 0]}")
    token_axes = tuple(a for a in mesh.axis_names if sizes[a] > 1)
    n_dev = math.prod(sizes.values())
    pad = -t % n_dev
    if pad and capacity_factor > 0:
        raise DispatchError(f"expert-parallel dispatch splits the {t} routed rows (batch x "
                            f"sequence) over all {n_dev} devices: make batch*seq_len a multiple "
                            f"of {n_dev}, set model.moe_capacity_factor=0 (no drop: rows are "
                            f"then padded) or use model.moe_dispatch='local'")
    if pad:   # e.g. decode steps (batch x 1 rows): zero-weight rows that no-drop buffers absorb
        u = jnp.pad(u, ((0, pad), (0, 0)))
        idx = jnp.pad(idx, ((0, pad), (0, 0)))
        weights = jnp.pad(weights, ((0, pad), (0, 0)))
        t += pad
    dt = u.dtype
    tok = P(token_axes if token_axes else None)
    wspec = P(EXPERT_AXIS if n_ep > 1 else None)
    t_loc = t // n_dev
    a = t_loc * k
    if kind == "a2a_padded":
        cap = buffer_rows(kind, a, n_ep, capacity_factor) // n_ep
        body = functools.partial(_padded_body, n_ep=n_ep, cap=cap, limit=limit, moe_impl=moe_impl)
    else:
        m = buffer_rows(kind, a, n_ep, capacity_factor)
        body = functools.partial(_ragged_body, n_ep=n_ep, buf=m, limit=limit,
                                 a2a=_emulated_ragged_all_to_all if emulate else jax.lax.ragged_all_to_all)
    fn = jax.shard_map(body, mesh=mesh, in_specs=(tok, tok, tok, wspec, wspec, wspec),
                       out_specs=tok, check_vma=False)
    y = fn(u, idx.astype(jnp.int32), weights.astype(jnp.float32), w_gate.astype(dt),
           w_up.astype(dt), w_down.astype(dt))
    return y[:t - pad] if pad else y


def local_experts(experts, u, idx, weights, w_gate, w_up, w_down, *, limit: float):
    """`experts(u, idx, weights, w_gate, w_up, w_down, limit)` (an `ops.moe` implementation) for
    model.moe_dispatch='local' under the active sharding rules: every device routes its own
    tokens through all experts, the expert weights being gathered (FSDP: per layer, inside the
    scan) instead of the tokens travelling.

    Without this, GSPMD sees one global argsort over all (token, expert) assignments of the
    global batch and the gather of their rows: it cannot split either, so every device sorts and
    runs the whole batch's MoE (for V4-Flash on 64 chips: 1.6M rows x 4096 per layer per device,
    ~1 TB of temporaries). Here the sort, the grouped matmuls and the scatter-add are per
    device, under `shard_map` with the rows split over every mesh axis of size > 1 in mesh order
    (the order in which the batch and sequence axes flatten into rows for every preset).
    Outside a sharding context, on one device, or when the rows do not split evenly over the
    devices, it is `experts(...)` unchanged.
    """
    ctx = constraints.active()
    if ctx is None:
        return experts(u, idx, weights, w_gate, w_up, w_down, limit)
    mesh = ctx.mesh
    sizes = dict(zip(mesh.axis_names, mesh.devices.shape))
    token_axes = tuple(a for a in mesh.axis_names if sizes[a] > 1)
    n_dev = math.prod(sizes.values())
    if not token_axes or u.shape[0] % n_dev:
        return experts(u, idx, weights, w_gate, w_up, w_down, limit)
    tok = P(token_axes)
    dt = u.dtype

    def body(u, idx, weights, w_gate, w_up, w_down):
        return experts(u, idx, weights, w_gate, w_up, w_down, limit)
    fn = jax.shard_map(body, mesh=mesh, in_specs=(tok, tok, tok, P(), P(), P()), out_specs=tok,
                       check_vma=False)
    return fn(u, idx.astype(jnp.int32), weights.astype(jnp.float32), w_gate.astype(dt),
              w_up.astype(dt), w_down.astype(dt))


def _combine(y_sorted, order, weights, t, k):
    """Rows y_sorted [a, d] in `order` of the flattened assignments -> [t, d] fp32 weighted sum."""
    w = weights.reshape(-1)[order][:, None]
    return jnp.zeros((t, y_sorted.shape[-1]), jnp.float32).at[order // k].add(
        y_sorted.astype(jnp.float32) * w)


# ----------------------------------------------------------------------------- a2a_padded
def _padded_body(u, idx, weights, w_gate, w_up, w_down, *, n_ep, cap, limit, moe_impl):
    """Per device: u [t, d], idx/weights [t, k]; local experts [E_loc, ...] -> [t, d]."""
    t, k = idx.shape
    d = u.shape[-1]
    e_loc = w_gate.shape[0]
    flat = idx.reshape(-1)
    a = flat.shape[0]
    dest = flat // e_loc
    order = jnp.argsort(dest, stable=True)              # group assignments by destination
    dest_sorted = dest[order]
    counts = jnp.bincount(dest, length=n_ep)
    pos = jnp.arange(a) - (jnp.cumsum(counts) - counts)[dest_sorted]
    keep = pos < cap
    slot = jnp.where(keep, dest_sorted * cap + pos, n_ep * cap)   # out of range = dropped
    send_x = jnp.zeros((n_ep * cap, d), u.dtype).at[slot].set(u[order // k], mode="drop")
    send_e = jnp.full((n_ep * cap,), -1, jnp.int32).at[slot].set(flat[order] % e_loc, mode="drop")
    recv_x = _a2a(send_x.reshape(n_ep, cap, d))
    recv_e = _a2a(send_e.reshape(n_ep, cap)).reshape(-1)
    valid = recv_e >= 0
    experts = moe_ops.EXPERT_IMPLEMENTATIONS[moe_impl]
    y = experts(recv_x.reshape(-1, d), jnp.where(valid, recv_e, 0)[:, None],
                valid[:, None].astype(jnp.float32), w_gate, w_up, w_down, limit)
    back = _a2a(y.reshape(n_ep, cap, d)).reshape(-1, d)
    y_sorted = jnp.where(keep[:, None], back[jnp.minimum(slot, n_ep * cap - 1)], 0)
    return _combine(y_sorted, order, weights, t, k).astype(u.dtype)


def _a2a(x):
    """[n_ep, ...] per destination -> [n_ep, ...] per source, over the expert axis."""
    return jax.lax.all_to_all(x, EXPERT_AXIS, 0, 0, tiled=False)


# ----------------------------------------------------------------------------- ragged_a2a
def _ragged_body(u, idx, weights, w_gate, w_up, w_down, *, n_ep, buf, limit, a2a):
    t, k = idx.shape
    d = u.shape[-1]
    e_loc = w_gate.shape[0]
    flat = idx.reshape(-1)
    a = flat.shape[0]
    order = jnp.argsort(flat, stable=True)              # by global expert = by destination
    x = u[order // k]
    counts = jnp.bincount(flat, length=n_ep * e_loc).astype(jnp.int32).reshape(n_ep, e_loc)
    send_full = counts.sum(1)                            # rows for each destination
    in_off = jnp.cumsum(send_full) - send_full
    # Receiver side: rows per (source, local expert), and where each source's chunk lands.
    recv_counts = _a2a(counts)                           # [n_ep src, e_loc]
    recv_full = recv_counts.sum(1)
    recv_start = jnp.cumsum(recv_full) - recv_full
    accepted = jnp.clip(buf - recv_start, 0, recv_full).astype(jnp.int32)
    recv_off = jnp.minimum(recv_start, buf).astype(jnp.int32)
    # Tell every source how many of its rows are accepted and where they go.
    send_sizes = _a2a(accepted)
    out_off = _a2a(recv_off)
    received = a2a(x, jnp.zeros((buf, d), x.dtype), in_off, send_sizes, out_off, accepted,
                   axis_name=EXPERT_AXIS)
    # Local expert of each received row: chunks are source-major, expert-sorted inside.
    before = jnp.cumsum(recv_counts, axis=1) - recv_counts
    acc_counts = jnp.clip(accepted[:, None] - before, 0, recv_counts)       # [src, e_loc]
    seg_ends = (recv_off[:, None] + jnp.cumsum(acc_counts, axis=1)).reshape(-1)   # monotone
    seg = jnp.searchsorted(seg_ends, jnp.arange(buf), side="right")
    row_expert = jnp.where(jnp.arange(buf) < accepted.sum(), seg % e_loc, e_loc)
    perm = jnp.argsort(row_expert, stable=True)
    group_sizes = acc_counts.sum(0).astype(jnp.int32)
    rows = received[perm]
    h = moe_ops.swiglu(jax.lax.ragged_dot(rows, w_gate, group_sizes),
                       jax.lax.ragged_dot(rows, w_up, group_sizes), limit)
    y_rows = jax.lax.ragged_dot(h.astype(rows.dtype), w_down, group_sizes)
    y_buf = jnp.zeros_like(y_rows).at[perm].set(y_rows)
    # Return trip: chunk of source j goes back to where j's rows came from.
    src_off = _a2a(in_off)
    y_sorted = a2a(y_buf, jnp.zeros((a, d), y_buf.dtype), recv_off, accepted, src_off, send_sizes,
                   axis_name=EXPERT_AXIS)
    return _combine(y_sorted, order, weights, t, k).astype(u.dtype)


def _emulated_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets,
                                recv_sizes, *, axis_name):
    """`lax.ragged_all_to_all` (one slice per peer) written with all_gather + scatter: the same
    result, O(n_ep) more traffic. For testing the ragged bookkeeping where XLA lacks the op."""
    del recv_sizes
    me = jax.lax.axis_index(axis_name)
    ops = jax.lax.all_gather(operand, axis_name)                 # [n, N, ...]
    start = jax.lax.all_gather(input_offsets, axis_name)[:, me]  # source j's offset for me
    size = jax.lax.all_gather(send_sizes, axis_name)[:, me]
    dst0 = jax.lax.all_gather(output_offsets, axis_name)[:, me]
    n, rows = ops.shape[:2]
    r = jnp.arange(rows)[None, :]
    ok = (r >= start[:, None]) & (r < (start + size)[:, None])
    dst = jnp.where(ok, dst0[:, None] + r - start[:, None], output.shape[0])
    return output.at[dst.reshape(-1)].set(ops.reshape((n * rows,) + ops.shape[2:]), mode="drop")
