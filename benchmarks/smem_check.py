"""Shared memory, registers and spills of the GPU attention kernels for an H100, on a CPU host.

    python -m benchmarks.smem_check [--heads 64,128] [--csa '{"block_k": 32}'] [--bsa '{...}']

Why: the Pallas Triton kernels compile to PTX only inside XLA on a GPU machine, so a tile that
overflows the H100's 227 KiB of shared memory per block shows up only there ("Shared memory
size limit exceeded"). This script lowers each kernel (forward and gradient) for an abstract
H100 on the CPU, takes the Triton module Pallas emits, and compiles it for sm_90 with the
`triton` Python package (its own pass pipeline and bundled ptxas; no GPU needed), then prints
per kernel: shared memory, registers, spill bytes. Checked against the first H100 run (JAX
0.11.2): the old CSA backward and block-sparse dkv kernels give exactly the 262144 and 294912
bytes the GPU refused, and the forward kernels that ran give 196608 and 131072 (<= 232448).
XLA bundles its own Triton, so treat small differences as possible; the final word is the GPU.

Needs `triton` (not a project dependency; the GPU machine has 3.6.0):
    python -m pip install --target /tmp/tritonsite triton==3.6.0 && PYTHONPATH=/tmp/tritonsite ...
Exit status 1 if any kernel asks for more than the H100's 232448 bytes.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
from jax import export

H100_SHARED_LIMIT = 232448      # bytes per block (the figure in the H100's error message)
D, WINDOW, TOPK, R_CSA, R_HCA = 512, 128, 512, 4, 128


def _capture_triton_modules():
    """Patch the Pallas Triton lowering to record (name, TTIR text, num_warps, num_stages)."""
    from jax._src.pallas.triton import lowering
    from jax._src.pallas.triton import pallas_call_registration as reg
    seen = []
    orig = lowering.lower_jaxpr_to_triton_module

    def capture(*args, **kwargs):
        res = orig(*args, **kwargs)
        seen.append(res.module.operation.get_asm())
        return res

    reg.lowering.lower_jaxpr_to_triton_module = capture
    return seen


def _lower(fn, args):
    device = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=None,
                                         platform="cuda")
    mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device)
    skip = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    with jax.sharding.use_abstract_mesh(mesh):
        export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=skip)(*args)


def _grad(fn, n):
    def g(*args):
        loss = lambda *d: jnp.sum(fn(*d, *args[n:])[0].astype(jnp.float32))  # noqa: E731
        return jax.grad(loss, argnums=tuple(range(n)))(*args[:n])
    return g


def _compile(ttir: str, num_warps: int, num_stages: int) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import compile as tcompile
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ttir")
        with open(path, "w") as f:
            f.write(ttir)
        k = tcompile(path, target=GPUTarget("cuda", 90, 32),
                     options=dict(num_warps=num_warps, num_stages=num_stages))
        ptx = os.path.join(tmp, "kernel.ptx")
        with open(ptx, "w") as f:
            f.write(k.asm["ptx"])
        ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
        r = subprocess.run([ptxas, "-v", "--gpu-name", "sm_90a", ptx, "-o", os.devnull],
                           capture_output=True, text=True)
    info = {"shared": int(k.metadata.shared)}
    for line in r.stderr.splitlines():
        line = line.strip()
        if "spill stores" in line:
            parts = line.replace(",", "").split()
            info["stack"], info["spill_st"], info["spill_ld"] = (int(parts[0]), int(parts[4]),
                                                                 int(parts[8]))
        elif line.startswith("ptxas info") and "Used" in line and "registers" in line:
            info["regs"] = int(line.split("Used")[1].split()[0])
    return info


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--heads", default="64,128", help="query head counts (V4-Flash 64, Pro 128)")
    p.add_argument("--seq", type=int, default=512, help="S (tiles do not depend on it)")
    p.add_argument("--csa", default="", help="SparseAttentionConfig fields as JSON ('' = default)")
    p.add_argument("--bsa", default="", help="BlockSizes fields as JSON ('' = default)")
    a = p.parse_args(argv)
    try:
        import triton  # noqa: F401
    except ImportError:
        print("needs the `triton` package: python -m pip install --target /tmp/tritonsite "
              "triton==3.6.0, then PYTHONPATH=/tmp/tritonsite", file=sys.stderr)
        return 2
    from kernels_pallas.block_sparse_attention import BlockSizes, block_sparse_attention
    from kernels_pallas.sparse_attention import SparseAttentionConfig, csa_attention
    from kernels_pallas.sparse_attention.config import default_config
    from kernels_pallas.block_sparse_attention.config import default_block_sizes

    seen = _capture_triton_modules()
    A, bf, s = jax.ShapeDtypeStruct, jnp.bfloat16, a.seq
    over = False
    print(f"{'kernel':34s} {'heads':>5s} {'shared B':>9s} {'regs':>5s} {'stack B':>8s} "
          f"{'spill st/ld B':>14s}")
    for h in (int(x) for x in a.heads.split(",")):
        csa_cfg = (SparseAttentionConfig(**json.loads(a.csa)) if a.csa
                   else default_config("gpu", compiled=True, num_selected=TOPK))
        bsa_cfg = (BlockSizes(**json.loads(a.bsa)) if a.bsa
                   else default_block_sizes("gpu", num_heads=h))
        q, kv, sink = A((1, s, h, D), bf), A((1, s, D), bf), A((h,), jnp.float32)
        jobs = [
            ("csa", csa_cfg, lambda q, kv, c, sink, idx: csa_attention(
                q, kv, c, idx, sink, window=WINDOW, scale=D ** -0.5,
                implementation="pallas_gpu", interpret=False, config=csa_cfg),
             (q, kv, A((1, s // R_CSA, D), bf), sink, A((1, s, TOPK), jnp.int32)), 4,
             ("csa_fwd_gpu", "csa_bwd_gpu")),
            ("hca", bsa_cfg, lambda q, kv, sink, c: block_sparse_attention(
                q, kv, sink, window=WINDOW, scale=D ** -0.5, compressed=c, ratio=R_HCA,
                implementation="pallas_gpu", interpret=False, config=bsa_cfg),
             (q, kv, sink, A((1, s // R_HCA, D), bf)), 4,
             ("block_sparse_fwd", "block_sparse_dq", "block_sparse_dkv")),
        ]
        for kind, cfg, fn, args, nd, names in jobs:
            seen.clear()
            _lower(_grad(fn, nd), args)
            for name, ttir in zip(names, seen):
                info = _compile(ttir, cfg.num_warps, cfg.num_stages)
                over |= info["shared"] > H100_SHARED_LIMIT
                flag = "  OVER the H100 limit" if info["shared"] > H100_SHARED_LIMIT else ""
                print(f"{name:34s} {h:5d} {info['shared']:9d} {info.get('regs', -1):5d} "
                      f"{info.get('stack', -1):8d} {info.get('spill_st', -1):7d}/"
                      f"{info.get('spill_ld', -1):<6d}{flag}", flush=True)
    print(f"limit {H100_SHARED_LIMIT} bytes of shared memory per block (H100)")
    return 1 if over else 0


if __name__ == "__main__":
    sys.exit(main())
