"""Sharded chunked prefill + decode on N fake CPU devices against the unsharded full forward.

    python -m tests.inference.sharded_worker decode|ep_padding '<json args>'   (XLA_FLAGS sets the device count)

Prints `RESULT <json>`: per preset the largest |logit difference| of prefill (every prompt
position) and of each decode step, and where the parameters and caches were placed.
"""
from __future__ import annotations

import json
import sys
import time

import jax
import numpy as np


def _sharded_fraction(tree) -> tuple[int, int]:
    leaves = [a for a in jax.tree.leaves(tree) if a.ndim]
    return sum(1 for a in leaves if a.addressable_shards[0].data.size < a.size), len(leaves)


def _spec_of(state, needle: str) -> str:
    from sparse_lm.sharding.partition import path_str
    for path, a in jax.tree_util.tree_leaves_with_path(state):
        if needle in path_str(path):
            return str(a.sharding.spec)
    raise KeyError(needle)


def ep_padding(args: dict) -> dict:
    """Expert-parallel dispatch of a row count that does not split over the devices (a decode
    step of batch 1: rows padded with zero weight) against the local dropless experts."""
    import jax.numpy as jnp

    from sparse_lm.ops import moe as moe_ops
    from sparse_lm.sharding import expert_parallel as ep
    from sparse_lm.sharding.mesh import make_mesh
    from tests.sharding.workers import _ep_problem
    t, d, i, e, k = 5, 16, 8, 8, 2
    u, idx, w, wg, wu, wd = _ep_problem(t, d, i, e, k)
    mesh = make_mesh({"expert": 8})
    want = np.asarray(moe_ops.experts_dropless(u, idx, w, wg, wu, wd, 10.0))
    got = np.asarray(jax.jit(lambda *xs: ep.dispatch("a2a_padded", u, jnp.asarray(idx), *xs,
                                                     limit=10.0, mesh=mesh))(w, wg, wu, wd))
    try:
        ep.dispatch("a2a_padded", u, jnp.asarray(idx), w, wg, wu, wd, limit=10.0, mesh=mesh,
                    capacity_factor=1.25)
        refused = ""
    except ep.DispatchError as err:
        refused = str(err)
    return {"rows": t, "shape": list(got.shape), "max_abs_err": float(np.max(np.abs(got - want))),
            "scale": float(np.max(np.abs(want))), "capacity_refusal": refused}


def decode(args: dict) -> dict:
    from sparse_lm.inference import Decoder
    from sparse_lm.model import build_model
    from tests.sharding.workers import small_config

    cfg = small_config(num_layers=int(args.get("layers", 5)))   # a scanned cycle of 2 layers
    model = build_model(cfg, seed=0)
    b, prompt, steps, chunk = 8, args.get("prompt", 21), args.get("steps", 3), args.get("chunk", 8)
    rng = np.random.default_rng(0)
    lengths = np.array([prompt - (r % 4) * 3 for r in range(b)])      # rows of other lengths
    seq = rng.integers(1, cfg.vocab_size, (b, prompt + steps)).astype(np.int32)
    full = np.asarray(jax.jit(lambda t: model(t))(seq))                # [B, S, V]
    out = {"lengths": lengths.tolist(), "presets": {}}
    for name in args["presets"]:
        t0 = time.perf_counter()
        dec = Decoder(model, sharding=name)
        cache = dec.init_cache(b, 64)   # entries 16 (CSA) / 8 (HCA): they split over 8
        prompts = [seq[r, :n] for r, n in enumerate(lengths)]
        logits, cache = dec.prefill(cache, prompts, chunk_size=chunk, logits="all")
        prefill_err = max(float(np.max(np.abs(np.asarray(logits[r]) - full[r, :n])))
                          for r, n in enumerate(lengths))
        decode_err = []
        for j in range(steps):
            tokens = seq[np.arange(b), lengths + j]
            step_logits, cache = dec.decode(cache, tokens)
            want = full[np.arange(b), lengths + j]
            decode_err.append(float(np.max(np.abs(np.asarray(step_logits) - want))))
        params_sharded = _sharded_fraction(dec.params)
        blocks_sharded = _sharded_fraction(dec.block_params)
        cache_sharded = _sharded_fraction(cache)
        out["presets"][name] = {
            "mesh": dec.layout.sizes, "moe_dispatch": dec.cfg.moe_dispatch,
            "prefill_max_abs_err": prefill_err, "decode_max_abs_err": decode_err,
            "params_sharded": params_sharded, "block_params_sharded": blocks_sharded,
            "cache_sharded": cache_sharded,
            "expert_spec": _spec_of(dec.block_params[-1], "w_gate"),
            "wq_b_spec": _spec_of(dec.block_params[-1], "wq_b"),
            "entries_spec": str(cache.layers[-1].compressor.entries.sharding.spec),
            "window_spec": str(cache.layers[0].window.sharding.spec),
            "seconds": time.perf_counter() - t0}
        print(f"{name}: prefill {prefill_err:.2e}, decode {max(decode_err):.2e} "
              f"({time.perf_counter() - t0:.1f} s)", file=sys.stderr, flush=True)
    return out


if __name__ == "__main__":
    task = {"decode": decode, "ep_padding": ep_padding}[sys.argv[1]]
    print("RESULT " + json.dumps(task(json.loads(sys.argv[2]))), flush=True)
