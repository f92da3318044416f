"""Compiler-reported HBM of one CSA attention layer at long context on a TPU, compiled ahead of
time on this (CPU) host: our kernel path vs the dense-mask formulation.

    python -m kernels_pallas.sparse_attention.aot_memory [--seq 65536] [--topology v5p:2x2x1]
                                                         [--backward]

The dense-mask formulation is the model's "reference" attention: a [Q, window keys + entries]
mask (band over the S raw keys, the listed entries over the N compressed ones) applied to full
logits, i.e. what a dense-mask attention kernel is fed. When it does not fit, XLA refuses to
compile and reports the HBM its temporaries would need; that figure is what we print.
Shapes default to V4-Flash: 64 query heads, one 512-wide KV head, window 128, top-k 512, ratio 4.
"""
from __future__ import annotations

import argparse
import dataclasses
import re

import jax
import jax.numpy as jnp

from kernels_pallas.sparse_attention.api import csa_attention
from sparse_lm.ops.attention import attention_reference
from kernels_pallas.testing import tpu_aot

_UNITS = {"": 1, "K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}


@dataclasses.dataclass
class Footprint:
    name: str
    bytes: int               # arguments + outputs + temporaries - aliased
    compiled: bool           # False: XLA refused (out of HBM); bytes = its reported requirement
    detail: str

    def gib(self) -> float:
        return self.bytes / 2 ** 30


def _required_from_oom(msg: str) -> int | None:
    """Bytes from XLA's 'memory required for HLO temporaries (1.27T) exceeds ...' message."""
    m = re.search(r"temporaries \(([\d.]+)([KMGT]?)\)", msg) or \
        re.search(r"Used ([\d.]+)([KMGT]?) of", msg)
    if not m:
        return None
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def footprint(name, fn, args) -> Footprint:
    try:
        m = jax.jit(fn).lower(*args).compile().memory_analysis()
    except Exception as e:  # noqa: BLE001 - XLA raises a generic error for compile-time OOM
        msg = str(e)
        need = _required_from_oom(msg)
        if need is None or "RESOURCE_EXHAUSTED" not in msg:
            raise
        return Footprint(name, need, False, msg.splitlines()[0][:300])
    total = (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
             - m.alias_size_in_bytes)
    detail = (f"args {m.argument_size_in_bytes / 2**30:.2f} GiB, out "
              f"{m.output_size_in_bytes / 2**30:.2f} GiB, temp {m.temp_size_in_bytes / 2**30:.2f} GiB")
    return Footprint(name, total, True, detail)


def csa_layer_footprints(seq: int = 65536, topology: str = "v5p:2x2x1", *, heads: int = 64,
                         head_dim: int = 512, topk: int = 512, window: int = 128, ratio: int = 4,
                         backward: bool = False, dtype=jnp.bfloat16):
    """(ours, dense) Footprints of one CSA attention call (forward, or forward+backward)."""

    b, s, h, d, k, n = 1, seq, heads, head_dim, topk, seq // ratio
    scale = d ** -0.5

    def ours(q, kv, c, idx, sink):
        return csa_attention(q, kv, c, idx, sink, window=window, scale=scale,
                             implementation="pallas_tpu", interpret=False)

    def dense(q, kv, c, idx, sink):      # every query against every key and entry at once
        return attention_reference(q, kv, sink, window=window, scale=scale, compressed=c,
                                   compressed_valid=jnp.ones(c.shape[:2], bool), ratio=1,
                                   topk_idx=idx, query_chunk=None)

    def with_grad(f):
        def g(q, kv, c, idx, sink):
            loss = lambda q, kv, c, sink: jnp.sum(f(q, kv, c, idx, sink)[0].astype(jnp.float32))
            return jax.grad(loss, argnums=(0, 1, 2, 3))(q, kv, c, sink)
        return g

    with tpu_aot(topology) as shaped:
        args = (shaped((b, s, h, d), dtype), shaped((b, s, d), dtype), shaped((b, n, d), dtype),
                shaped((b, s, k), jnp.int32), shaped((h,), jnp.float32))
        fns = (ours, dense) if not backward else (with_grad(ours), with_grad(dense))
        return (footprint("pallas_tpu kernel path", fns[0], args),
                footprint("dense-mask formulation", fns[1], args))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq", type=int, default=65536)
    ap.add_argument("--topology", default="v5p:2x2x1")
    ap.add_argument("--backward", action="store_true", help="forward+backward instead of forward")
    a = ap.parse_args(argv)
    ours, dense = csa_layer_footprints(a.seq, a.topology, backward=a.backward)
    what = "forward+backward" if a.backward else "forward"
    print(f"CSA attention {what}, S={a.seq}, {a.topology}, V4-Flash shapes (H=64, D=512, "
          f"top-k 512, window 128), bf16")
    for f in (ours, dense):
        state = "compiled" if f.compiled else "does NOT compile (out of HBM); XLA reports"
        print(f"  {f.name:26s} {f.gib():10.2f} GiB  {state}: {f.detail}")
    print(f"  ratio dense / ours: {dense.bytes / ours.bytes:.1f}x")


if __name__ == "__main__":
    main()
