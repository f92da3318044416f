"""Compiler-reported HBM of the lightning indexer's top-k at long context on a TPU, compiled
ahead of time on this (CPU) host: the fused kernel vs the naive score-then-top-k forms.

    python -m kernels_pallas.indexer_topk.aot_memory [--seq 65536] [--topology v5p:2x2x1]
                                                     [--measure]   # + measured on a GPU/TPU

Arms (V4-Flash indexer shapes: 64 heads x 128, ratio 4, top-k 512, bf16 inputs):
  fused        `indexer_topk(..., implementation="pallas_tpu")`: scores stay in VMEM, HBM holds
               the inputs and the [S, L] result.
  naive        the [S, S/4] fp32 score matrix (heads accumulated one at a time, so the
               [S, Hi, S/4] product never exists), then `lax.top_k`: the form the issue names.
  einsum       the model's `indexer_scores` as written (two einsums: [S, Hi, S/4] fp32), then
               top-k.
Peak = arguments + outputs + temporaries - aliased, from `compiled.memory_analysis()`; the
working memory (outputs + temporaries) is what each form adds to the inputs they share (q alone
is S * 64 * 128 * 2 bytes = 1 GiB at 64K, the same in every arm). When a
form does not fit, XLA refuses to compile and reports what its temporaries would need; that
figure is what we print (marked "does not compile").
"""
from __future__ import annotations

import argparse
import dataclasses
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
from jax import lax

from kernels_pallas.indexer_topk.api import indexer_topk
from kernels_pallas.indexer_topk.reference import indexer_topk_reference
from kernels_pallas.testing import tpu_aot

_UNITS = {"": 1, "K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}


@dataclasses.dataclass
class Footprint:
    name: str
    bytes: int           # arguments + outputs + temporaries - aliased (the peak)
    work: int            # outputs + temporaries: what the computation adds to its inputs
    compiled: bool
    detail: str

    def gib(self) -> float:
        return self.bytes / 2 ** 30


def _oom_bytes(msg: str) -> int | None:
    m = (re.search(r"temporaries \(([\d.]+)([KMGT]?)\)", msg)
         or re.search(r"Used ([\d.]+)([KMGT]?) of", msg))
    return None if not m else int(float(m.group(1)) * _UNITS[m.group(2)])


def footprint(name, fn, args) -> Footprint:
    try:
        ma = jax.jit(fn).lower(*args).compile().memory_analysis()
    except Exception as e:  # noqa: BLE001 - XLA raises a generic error for compile-time OOM
        need = _oom_bytes(str(e))
        if need is None or "RESOURCE_EXHAUSTED" not in str(e):
            raise
        return Footprint(name, need, need, False, str(e).splitlines()[0][:240])
    total = (ma.argument_size_in_bytes + ma.output_size_in_bytes + ma.temp_size_in_bytes
             - ma.alias_size_in_bytes)
    gib = lambda x: f"{x / 2 ** 30:.3f} GiB"  # noqa: E731
    work = ma.output_size_in_bytes + ma.temp_size_in_bytes - ma.alias_size_in_bytes
    return Footprint(name, total, work, True, f"args {gib(ma.argument_size_in_bytes)}, out "
                     f"{gib(ma.output_size_in_bytes)}, temp {gib(ma.temp_size_in_bytes)}")


def naive_topk(q, w, keys, *, k: int, ratio: int):
    """[S, N] fp32 scores accumulated head by head, causal mask, then lax.top_k."""
    b, s, h, _ = q.shape
    n = keys.shape[1]

    def head(hh, acc):
        dots = jnp.einsum("btd,bnd->btn", q[:, :, hh], keys, preferred_element_type=jnp.float32)
        return acc + jax.nn.relu(dots) * w[:, :, hh, None].astype(jnp.float32)

    sc = lax.fori_loop(0, h, head, jnp.zeros((b, s, n), jnp.float32))
    vis = (jnp.arange(n)[None, :] + 1) * ratio <= jnp.arange(s)[:, None] + 1
    vals, idx = lax.top_k(jnp.where(vis, sc, -jnp.inf), k)
    return jnp.where(jnp.isfinite(vals), idx, -1)


def einsum_topk(q, w, keys, *, k: int, ratio: int):
    return indexer_topk_reference(q, w, keys, k=k, ratio=ratio)[0]


def indexer_footprints(seq: int = 65536, topology: str = "v5p:2x2x1", *, heads: int = 64,
                       head_dim: int = 128, topk: int = 512, ratio: int = 4,
                       dtype=jnp.bfloat16, arms=("fused", "naive", "einsum")):
    b, s, n = 1, seq, seq // ratio

    def fused(q, w, keys):
        return indexer_topk(q, w, keys, k=topk, ratio=ratio, implementation="pallas_tpu",
                            interpret=False)

    fns = {"fused": fused,
           "naive": lambda q, w, keys: naive_topk(q, w, keys, k=topk, ratio=ratio),
           "einsum": lambda q, w, keys: einsum_topk(q, w, keys, k=topk, ratio=ratio)}
    names = {"fused": "fused pallas_tpu kernel", "naive": "naive [S, S/4] scores + top_k",
             "einsum": "model einsum [S, Hi, S/4] + top_k"}
    with tpu_aot(topology) as shaped:
        args = (shaped((b, s, heads, head_dim), dtype), shaped((b, s, heads), jnp.float32),
                shaped((b, n, head_dim), dtype))
        return {a: footprint(names[a], fns[a], args) for a in arms}


_MEASURE = """
import sys, jax, jax.numpy as jnp
from kernels_pallas.indexer_topk.aot_memory import {fn}
from kernels_pallas.indexer_topk import indexer_topk
s, k, arm = {seq}, {topk}, "{arm}"
ks = jax.random.split(jax.random.key(0), 3)
q = jax.random.normal(ks[0], (1, s, 64, 128), jnp.float32).astype(jnp.bfloat16)
w = jax.random.normal(ks[1], (1, s, 64), jnp.float32) / 64
keys = jax.random.normal(ks[2], (1, s // 4, 128), jnp.float32).astype(jnp.bfloat16)
jax.block_until_ready((q, w, keys))
dev = jax.devices()[0]
base = dev.memory_stats()["peak_bytes_in_use"]
if arm == "fused":
    f = lambda q, w, keys: indexer_topk(q, w, keys, k=k, ratio=4)
else:
    f = lambda q, w, keys: {fn}(q, w, keys, k=k, ratio=4)
jax.block_until_ready(jax.jit(f)(q, w, keys))
print("PEAK", base, dev.memory_stats()["peak_bytes_in_use"])
"""


def measure_on_device(seq: int = 65536, topk: int = 512) -> dict:
    """Measured peak device memory (`memory_stats()["peak_bytes_in_use"]`, one fresh process per
    arm) of the fused kernel (the platform default) and the naive form on the local GPU/TPU:
    {arm: (peak before the call = inputs, peak after)} in bytes, or an error string."""
    out = {}
    for arm in ("fused", "naive"):
        code = _MEASURE.format(fn="naive_topk", seq=seq, topk=topk, arm=arm)
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        line = [x for x in r.stdout.splitlines() if x.startswith("PEAK")]
        out[arm] = (tuple(int(v) for v in line[0].split()[1:]) if line
                    else (r.stderr.strip().splitlines() or ["no output"])[-1][:300])
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq", type=int, default=65536)
    ap.add_argument("--topology", default="v5p:2x2x1")
    ap.add_argument("--topk", type=int, default=512)
    ap.add_argument("--measure", action="store_true",
                    help="also run both forms on the local accelerator and print the measured "
                         "peak memory (GPU/TPU only)")
    a = ap.parse_args(argv)
    if a.measure:
        if jax.default_backend() == "cpu":
            raise SystemExit("--measure needs a GPU or TPU backend (JAX_PLATFORMS=cuda or tpu)")
        res = measure_on_device(a.seq, a.topk)
        print(f"measured on {jax.devices()[0].device_kind}, S={a.seq}, k={a.topk}:")
        for arm, v in res.items():
            if isinstance(v, tuple):
                print(f"  {arm:6s} peak {v[1] / 2**30:.3f} GiB (inputs {v[0] / 2**30:.3f} GiB, "
                      f"added {(v[1] - v[0]) / 2**30:.3f} GiB)")
            else:
                print(f"  {arm:6s} failed: {v}")
        if all(isinstance(v, tuple) for v in res.values()):
            add = {arm: v[1] - v[0] for arm, v in res.items()}
            print(f"  naive / fused added memory: {add['naive'] / max(add['fused'], 1):.1f}x")
    fp = indexer_footprints(a.seq, a.topology, topk=a.topk)
    s, k = a.seq, a.topk
    inputs = s * 64 * 128 * 2 + s * 64 * 4 + (s // 4) * 128 * 2
    print(f"lightning indexer top-k forward, S={s}, {a.topology}, V4-Flash shapes (Hi=64, "
          f"Di=128, ratio 4, top-k {k}), bf16; inputs alone {inputs / 2**30:.3f} GiB, "
          f"S*k*4 bytes = {s * k * 4 / 2**30:.3f} GiB")
    for f in fp.values():
        state = "compiled" if f.compiled else "does NOT compile (out of HBM); XLA reports"
        print(f"  {f.name:36s} {f.gib():10.3f} GiB  {state}: {f.detail}")
    ours = fp["fused"]
    for key in ("naive", "einsum"):
        if key in fp:
            print(f"  {key} / fused: peak {fp[key].bytes / ours.bytes:.1f}x, working memory "
                  f"(outputs + temporaries) {fp[key].work / ours.work:.1f}x "
                  f"({fp[key].work / 2**30:.3f} vs {ours.work / 2**30:.3f} GiB)")


if __name__ == "__main__":
    main()
