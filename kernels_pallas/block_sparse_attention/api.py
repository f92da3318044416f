"""Entry point: block-sparse attention over `[window keys | compressed entries]` (HCA and SWA).

    out, lse = block_sparse_attention(q, kv, sink, window=W, scale=D**-0.5,
                                      compressed=c, compressed_valid=v, ratio=m,
                                      segment_ids=seg)

equals `sparse_lm.ops.attention.sparse_attention(..., topk_idx=None, implementation="reference",
return_lse=True)`: query t attends raw keys t-W+1..t of its own document and every visible
compressed entry (e < (t+1)//m, valid, same document), plus a per-head sink logit; one shared
K = V head (MQA). The dense causal baseline is the same call with window >= S and no entries.

implementation (`OP`, a `kernels_pallas.registry.Op`): "pallas_tpu" (Mosaic TPU kernel),
"pallas_gpu" (Pallas Triton kernel), "reference" (pure jnp); the old names "tpu" / "gpu" are
aliases (one deprecation note each). None = the target platform's preference: "pallas_gpu" on
GPU, "pallas_tpu" on TPU and on CPU (interpreted there), "reference" where the kernel's tiles
cannot take the shapes (logged once). interpret: None = interpret iff the target platform is
CPU.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from kernels_pallas import registry
from kernels_pallas.block_sparse_attention import mask as mask_lib
from kernels_pallas.block_sparse_attention import reference, vjp
from kernels_pallas.block_sparse_attention.config import BlockSizes, default_block_sizes
from kernels_pallas.block_sparse_attention.plan import Plan
from sparse_lm.ops import masks


def _family(implementation: str) -> str:
    return "tpu" if implementation == "pallas_tpu" else "gpu"


def tile_problem(implementation: str, q, *, interpret: bool,
                 config: BlockSizes | None = None) -> str | None:
    """Why the compiled kernel cannot tile these heads / head dim / blocks (None if it can, or
    when interpreted)."""
    if interpret:
        return None
    h, d = q.shape[2], q.shape[3]
    family = _family(implementation)
    cfg = config or default_block_sizes(family, num_heads=h, compiled=True)
    return registry.problem_of(cfg.check_tiling, family, num_heads=h, head_dim=d,
                               itemsize=jnp.dtype(q.dtype).itemsize)


def _pallas(implementation: str):
    family = _family(implementation)

    def run(q, kv, sink, *, window, scale, compressed, compressed_valid, ratio, segment_ids,
            query_offset, offset_range, compressed_segments, config, interpret):
        b, s, h, d = q.shape
        if config is None:
            config = default_block_sizes(family, num_heads=h, compiled=not interpret)
        n = 0 if compressed is None else compressed.shape[1]
        geom = mask_lib.make_geometry(s, int(window), n, int(ratio) if n else 0,
                                      q_multiple=config.q_multiple,
                                      kv_multiple=config.kv_multiple,
                                      entry_shift=offset_range or (0, 0))
        plan = Plan(geom=geom, num_heads=h, head_dim=d, scale=float(scale), blocks=config,
                    platform=family, interpret=interpret,
                    has_segments=segment_ids is not None,
                    # (a query offset needs no mask on full blocks: the map calls full only
                    # blocks full at every offset of its range)
                    always_mask=segment_ids is not None or (n > 0 and compressed_valid is not None))
        # Build the maps now so that a geometry the packed form cannot hold fails before any
        # launch.
        for bq, bk in (config.fwd, config.dq):
            plan.query_map(bq, bk)
        plan.key_map(*config.dkv)

        q2, keys, kpos, kseg, qseg = _operands(plan, q, kv, compressed, compressed_valid,
                                               segment_ids, query_offset, compressed_segments)
        out2, lse2 = vjp.attention_core(plan, q2, keys, sink.astype(jnp.float32), kpos, kseg, qseg)
        out = out2.reshape(b, geom.q_pad, h, d)[:, :s]
        lse = lse2.reshape(b, geom.q_pad, h)[:, :s]
        return out, lse

    def check(q, kv, sink, *, config, interpret, **_):
        return tile_problem(implementation, q, interpret=interpret, config=config)

    return registry.Implementation(implementation, run, platforms=(family,), check=check,
                                   interpretable=True)


def _reference(q, kv, sink, *, window, scale, compressed, compressed_valid, ratio, segment_ids,
               query_offset, offset_range, compressed_segments, config):
    if query_offset is not None:
        return reference.attention_at_offset(
            q, kv, sink, window=window, scale=scale, compressed=compressed,
            compressed_valid=compressed_valid, ratio=ratio, segment_ids=segment_ids,
            query_offset=query_offset, compressed_segments=compressed_segments)
    return reference.attention(q, kv, sink, window=window, scale=scale, compressed=compressed,
                               compressed_valid=compressed_valid, ratio=ratio,
                               segment_ids=segment_ids)


OP = registry.Op(
    "block_sparse_attention",
    [_pallas("pallas_tpu"), _pallas("pallas_gpu"),
     registry.Implementation("reference", _reference)],
    # CPU: the TPU kernel interpreted (what tests exercise), the reference if told not to
    # interpret.
    preference={"cpu": ("pallas_tpu", "reference"), "tpu": ("pallas_tpu", "reference"),
                "gpu": ("pallas_gpu", "reference")},
    aliases=registry.KERNEL_ALIASES)
IMPLEMENTATIONS = OP.names
default_implementation = OP.default_implementation


def block_sparse_attention(q: jax.Array, kv: jax.Array, sink: jax.Array, *, window: int,
                           scale: float, compressed: jax.Array | None = None,
                           compressed_valid: jax.Array | None = None, ratio: int = 0,
                           segment_ids: jax.Array | None = None, implementation: str | None = None,
                           interpret: bool | None = None, config: BlockSizes | None = None,
                           platform: str | None = None, query_offset=None,
                           offset_range: tuple[int, int] | None = None,
                           compressed_segments: jax.Array | None = None):
    """q [B, S, H, D]; kv [B, S, D] (q's dtype); sink [H]; compressed [B, N, D] | None;
    compressed_valid [B, N] bool | None (None = every entry valid: the fastest path, since
    positionally full blocks then need no mask); ratio >= 1 with entries; segment_ids [B, S] int
    | None; platform: the target (None = `registry.current_platform()`). Returns (out
    [B, S, H, D] in q's dtype, lse [B, S, H] fp32, sink included).
    Differentiable in q, kv, compressed and sink.

    A context-parallel shard's rows: query_offset (int32 scalar, may be traced) is the position
    of q's row 0 for the compressed entries (row t sees entry e iff e < (offset + t + 1) // m),
    bounded by the static offset_range (lo, hi), which the block map is planned over; the window
    part stays in local positions (the caller puts the halo in front). compressed_segments
    [B, N] give the entries' documents where segment_ids (the shard's rows) cannot: required
    with query_offset and segment_ids."""
    _validate(q, kv, sink, window, scale, compressed, compressed_valid, ratio, segment_ids)
    _validate_offset(q, compressed, segment_ids, query_offset, offset_range, compressed_segments)
    implementation = OP.canonical(implementation, platform)
    if config is not None and not isinstance(config, BlockSizes):
        raise TypeError(f"config={config!r} is invalid: expected a BlockSizes or None")
    return OP(q, kv, sink, window=window, scale=scale, compressed=compressed,
              compressed_valid=compressed_valid, ratio=ratio, segment_ids=segment_ids,
              query_offset=query_offset,
              offset_range=None if offset_range is None else tuple(int(v) for v in offset_range),
              compressed_segments=compressed_segments, config=config,
              implementation=implementation, interpret=interpret, platform=platform)


def _operands(plan: Plan, q, kv, compressed, compressed_valid, segment_ids, query_offset=None,
              compressed_segments=None):
    """Pad and lay out the kernel operands (see `Plan`). With a query offset the entries' kpos
    (first visible query) is shifted by it: the in-kernel mask then compares at global
    positions."""
    g = plan.geom
    b, s, h, d = q.shape
    n = g.num_entries
    q2 = jnp.pad(q, ((0, 0), (0, g.q_pad - s), (0, 0), (0, 0))).reshape(b, g.q_pad * h, d)
    parts = [jnp.pad(kv, ((0, 0), (0, g.win_pad - s), (0, 0)))]
    if n:
        parts.append(jnp.pad(compressed.astype(kv.dtype), ((0, 0), (0, g.comp_pad - n), (0, 0))))
    keys = jnp.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]
    kpos_static, _ = mask_lib.key_intervals(g)
    kpos = jnp.broadcast_to(jnp.asarray(kpos_static), (b, g.num_keys))
    if n and query_offset is not None:
        shifted = kpos[:, g.win_pad:g.win_pad + n] - jnp.asarray(query_offset, jnp.int32)
        kpos = kpos.at[:, g.win_pad:g.win_pad + n].set(shifted)
    if n and compressed_valid is not None:
        valid = jnp.pad(compressed_valid.astype(bool), ((0, 0), (0, g.comp_pad - n)))
        kpos = kpos.at[:, g.win_pad:].set(
            jnp.where(valid, kpos[:, g.win_pad:], mask_lib.NEVER))
    kseg = qseg = None
    if segment_ids is not None:
        seg = segment_ids.astype(jnp.int32)
        qseg = jnp.repeat(jnp.pad(seg, ((0, 0), (0, g.q_pad - s)), constant_values=-1), h, axis=1)
        kparts = [jnp.pad(seg, ((0, 0), (0, g.win_pad - s)), constant_values=-1)]
        if n:
            ent = (masks.entry_segments(seg, n, g.ratio) if compressed_segments is None
                   else compressed_segments.astype(jnp.int32))
            kparts.append(jnp.pad(ent,
                                  ((0, 0), (0, g.comp_pad - n)), constant_values=-1))
        kseg = jnp.concatenate(kparts, axis=1)
    return q2, keys, kpos.astype(jnp.int32), kseg, qseg


def _validate_offset(q, compressed, segment_ids, query_offset, offset_range,
                     compressed_segments):
    if query_offset is None:
        if offset_range is not None or compressed_segments is not None:
            raise ValueError("offset_range / compressed_segments given without query_offset")
        return
    if compressed is None:
        raise ValueError("query_offset given without compressed entries (it moves only the "
                         "entries' causal mask)")
    if jnp.shape(query_offset) != () or not jnp.issubdtype(jnp.result_type(query_offset),
                                                           jnp.integer):
        raise ValueError(f"query_offset must be an integer scalar, got {query_offset!r}")
    if (offset_range is None or len(offset_range) != 2
            or not all(isinstance(v, (int, np.integer)) for v in offset_range)
            or offset_range[0] > offset_range[1]):
        raise ValueError(f"offset_range={offset_range!r} is invalid: with query_offset it must "
                         "be static ints (lo, hi), lo <= hi, bounding the offset")
    b, n = q.shape[0], compressed.shape[1]
    if segment_ids is not None and compressed_segments is None:
        raise ValueError("query_offset with segment_ids needs compressed_segments [B, N] (the "
                         "rows' segment ids do not cover the entries' windows)")
    if compressed_segments is not None and (segment_ids is None
                                            or compressed_segments.shape != (b, n)):
        raise ValueError(f"compressed_segments has shape {compressed_segments.shape}: expected "
                         f"[B={b}, N={n}], with segment_ids")


def _validate(q, kv, sink, window, scale, compressed, compressed_valid, ratio, segment_ids):
    b, s, h, d = registry.check_query(q)
    if kv.shape != (b, s, d):
        raise ValueError(f"kv has shape {kv.shape}, expected {(b, s, d)} (one shared K = V head)")
    if kv.dtype != q.dtype:
        raise TypeError(f"kv has dtype {kv.dtype}, expected q's dtype {q.dtype}")
    if sink.shape != (h,):
        raise ValueError(f"sink has shape {sink.shape}, expected ({h},) (one logit per head)")
    registry.check_positive_int("window", window)
    if not isinstance(scale, (float, int, np.floating)) or isinstance(scale, bool) or scale <= 0:
        raise ValueError(f"scale={scale!r} is invalid: must be a positive Python float")
    if compressed is not None:
        if compressed.ndim != 3 or compressed.shape[0] != b or compressed.shape[2] != d:
            raise ValueError(f"compressed has shape {compressed.shape}, expected [B={b}, N, D={d}]")
        if not jnp.issubdtype(compressed.dtype, jnp.floating):
            raise TypeError(f"compressed has dtype {compressed.dtype}, expected a floating dtype")
        registry.check_positive_int("ratio", ratio)
        if compressed_valid is not None:
            n = compressed.shape[1]
            if compressed_valid.shape != (b, n) or compressed_valid.dtype != jnp.bool_:
                raise ValueError(f"compressed_valid has shape {compressed_valid.shape} and dtype "
                                 f"{compressed_valid.dtype}, expected bool [B={b}, N={n}]")
    elif compressed_valid is not None:
        raise ValueError("compressed_valid given without compressed entries")
    registry.check_segment_ids(segment_ids, b, s)
