"""Compile and time tile variants of the GPU attention kernels at V4-Flash shapes (GPU only).

    python -m benchmarks.tile_probe [--seq 8192] [--runs 5] [--only csa,hca,dense]

For each variant: forward and forward+backward compiled and timed (median of --runs after one
warm-up, compile excluded), or the error (e.g. a shared-memory overflow) in one line. A quick
way to find which tiles fit the H100's shared memory before a full `experiments.bench_attention`
run; the tables of record come from that script, not this one.
"""
from __future__ import annotations

import argparse
import statistics
import sys

import jax
import jax.numpy as jnp

from experiments.bench_attention import spread_topk
from experiments.benchlib import time_compiled
from kernels_pallas.block_sparse_attention import BlockSizes, block_sparse_attention
from kernels_pallas.sparse_attention import SparseAttentionConfig, csa_attention

H, D, W, TOPK, R_CSA, R_HCA = 64, 512, 128, 512, 4, 128

BSA_VARIANTS = {
    "default": None,
    "dq64rows": BlockSizes(block_q=1, block_kv=64, block_kv_dq=32, block_kv_dkv=32, num_warps=8,
                           num_stages=1, block_rows=64, block_rows_dq=64, block_rows_dkv=32),
    "k64all": BlockSizes(block_q=1, block_kv=64, num_warps=8, num_stages=1, block_rows=64,
                          block_rows_dq=32, block_rows_dkv=32),
    "dkv16rows_k64": BlockSizes(block_q=1, block_kv=64, block_kv_dq=32, num_warps=8,
                                num_stages=1, block_rows=64, block_rows_dq=32,
                                block_rows_dkv=16),
    "stages2": BlockSizes(block_q=1, block_kv=64, block_kv_dq=32, block_kv_dkv=32, num_warps=8,
                          num_stages=2, block_rows=64, block_rows_dq=32, block_rows_dkv=32),
    "fwd_k128_w8": BlockSizes(block_q=1, block_kv=128, block_kv_dq=32, block_kv_dkv=32,
                              num_warps=8, num_stages=1, block_rows=64, block_rows_dq=32,
                              block_rows_dkv=32),
}
CSA_VARIANTS = {   # every variant's backward keeps the 32-head x 32-row tiles that fit
    "default": None,
    "w8": SparseAttentionConfig(block_k=64, num_warps=8, bwd_block_k=32, bwd_heads=32),
    "fwd_k32": SparseAttentionConfig(block_k=32, bwd_block_k=32, bwd_heads=32),
    "fwd_k128_w8": SparseAttentionConfig(block_k=128, num_warps=8, bwd_block_k=32,
                                         bwd_heads=32),
}


def _time(fn, args, runs):
    return 1e3 * statistics.median(time_compiled(fn, args, runs, warmup=1))


def _both(fn, args, nd, runs):
    """(fwd ms, fwd+bwd ms) with errors as strings."""
    def loss(*a):
        out, lse = fn(*a)
        return jnp.sum(out.astype(jnp.float32)) + jnp.sum(lse)
    grad = jax.grad(loss, argnums=tuple(range(nd)))
    res = []
    for f in (fn, grad):
        try:
            res.append(f"{_time(f, args, runs):9.3f}")
        except Exception as e:  # noqa: BLE001 - report every failure and go on
            res.append("ERROR " + f"{type(e).__name__}: {e}".splitlines()[0][:160])
    return res


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--seq", type=int, default=8192)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--only", default="csa,hca,dense")
    p.add_argument("--variants", default="", help="comma list of variant names (default: all)")
    a = p.parse_args(argv)
    s = a.seq
    ks = jax.random.split(jax.random.key(0), 5)
    bf = jnp.bfloat16
    q = jax.random.normal(ks[0], (1, s, H, D), jnp.float32).astype(bf)
    kv = jax.random.normal(ks[1], (1, s, D), jnp.float32).astype(bf)
    sink = jax.random.normal(ks[2], (H,), jnp.float32)
    c_hca = jax.random.normal(ks[3], (1, s // R_HCA, D), jnp.float32).astype(bf)
    c_csa = jax.random.normal(ks[4], (1, s // R_CSA, D), jnp.float32).astype(bf)
    topk = spread_topk(s, s // R_CSA, TOPK, 1, 0, R_CSA)
    scale = D ** -0.5
    print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}, S={s}, median of {a.runs}",
          flush=True)
    only = a.only.split(",")
    keep = lambda table: {k: v for k, v in table.items()  # noqa: E731
                          if not a.variants or k in a.variants.split(",")}
    for name, cfg in keep(CSA_VARIANTS).items() if "csa" in only else ():
        fn = lambda q, kv, c, sink, cfg=cfg: csa_attention(  # noqa: E731
            q, kv, c, topk, sink, window=W, scale=scale, implementation="pallas_gpu",
            interpret=False, config=cfg)
        print(f"csa   {name:14s}", *_both(fn, (q, kv, c_csa, sink), 4, a.runs), flush=True)
    for geom in ("hca", "dense"):
        if geom not in only:
            continue
        for name, cfg in keep(BSA_VARIANTS).items():
            if geom == "hca":
                fn = lambda q, kv, sink, c, cfg=cfg: block_sparse_attention(  # noqa: E731
                    q, kv, sink, window=W, scale=scale, compressed=c, ratio=R_HCA,
                    implementation="pallas_gpu", interpret=False, config=cfg)
                args = (q, kv, sink, c_hca)
            else:
                fn = lambda q, kv, sink, cfg=cfg: block_sparse_attention(  # noqa: E731
                    q, kv, sink, window=s, scale=scale, implementation="pallas_gpu", interpret=False,
                    config=cfg)
                args = (q, kv, sink)
            print(f"{geom:5s} {name:14s}", *_both(fn, args, len(args), a.runs), flush=True)


if __name__ == "__main__":
    sys.exit(main())
