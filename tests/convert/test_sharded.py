"""Conversion straight onto a target sharding across two processes (a multi-host slice in
miniature: 2 processes x 2 CPU devices, gloo collectives over loopback).

Checked, in each process: every array lands on its NamedSharding (logical axes mapped by the
rules) and each addressable shard equals the same slice of an unsharded load; routed-expert
tensors are only ever read for the expert range of one shard (so a process never holds all
experts of a layer); the orbax checkpoint written collectively appears atomically at --out and
restores onto the same mesh with the same values. Also: rules that reuse a mesh axis within one
parameter, and a dimension that the mesh axes do not divide (an error naming the parameter).
"""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = r"""
import json, os, sys
pid, port, src, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.config.update("jax_num_cpu_devices", 2)
jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=pid)
import numpy as np
from flax import nnx
from sparse_lm.convert import core
from sparse_lm.convert.hf_to_orbax import convert, parse_mesh, parse_rules
from sparse_lm.convert.safetensors_io import LogicalCheckpoint

reads = []
orig = LogicalCheckpoint.read
def logged(self, name, experts=None):
    reads.append((name, None if experts is None else [experts.start, experts.stop]))
    return orig(self, name, experts)
LogicalCheckpoint.read = logged

mesh = parse_mesh("expert=2,fsdp=-1")
rules = parse_rules("exp:expert,embed:fsdp")
model, cfg = core.load_hf(src, mesh=mesh, rules=rules, progress=False)
expert_reads = [r for r in reads if ".mlp.experts." in r[0]]
plain, _ = core.load_hf(src, progress=False)
ref = {k: np.asarray(v[...]) for k, v in nnx.to_flat_state(nnx.state(plain))}

def shards_equal(m):
    flat = dict(nnx.to_flat_state(nnx.state(m)))
    return all(np.array_equal(np.asarray(s.data), ref[k][s.index])
               for k in ref for s in flat[k][...].addressable_shards)

w = dict(nnx.to_flat_state(nnx.state(model)))[("cycles", "blocks", 0, "moe", "w_gate")][...]
res = {"devices": [jax.device_count(), jax.local_device_count()],
       "equal": shards_equal(model), "w_gate_spec": list(w.sharding.spec),
       "w_gate_shard": list(w.addressable_shards[0].data.shape),
       "embed_spec": list(dict(nnx.to_flat_state(nnx.state(model)))[("embed",)][...].sharding.spec),
       "expert_reads": expert_reads}
_, _, abstract = core.abstract_model(cfg)
dup = core.shardings_from_rules(abstract, mesh, {"exp": "expert", "mlp": "fsdp", "embed": "fsdp"})
res["w_down_spec_shared_axis"] = list(dup[("cycles", "blocks", 0, "moe", "w_down")].spec)
try:
    core.shardings_from_rules(abstract, mesh, {"layers": ("expert", "fsdp")})
except ValueError as e:
    res["not_divisible"] = str(e)
convert(src, out, mesh=mesh, rules=rules, progress=False)
res["out_listing"] = sorted(os.listdir(out))
restored, _ = core.restore_checkpoint(out, mesh=mesh, rules=rules)
res["restored_equal"] = shards_equal(restored)
print("RESULT " + json.dumps(res), flush=True)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_process_sharded_conversion(tmp_path):
    src = ROOT / "tests" / "parity_data" / "pro_like"    # 8 experts, two scanned cycles
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    port = str(_free_port())
    procs = [subprocess.Popen([sys.executable, "-c", SCRIPT, str(i), port, str(src),
                               str(tmp_path / "ckpt")], cwd=ROOT, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in range(2)]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=300))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    for out, _ in outs:
        res = json.loads(out.split("RESULT ", 1)[1])
        assert res["devices"] == [4, 2]
        assert res["equal"] and res["restored_equal"]
        # w_gate: logical ('layers', 'exp', 'embed', 'mlp') -> (None, 'expert', 'fsdp', None).
        assert res["w_gate_spec"] == [None, "expert", "fsdp", None]
        assert res["w_gate_shard"] == [2, 4, 32, 12]              # [cycles, E/2, d/2, I]
        assert res["embed_spec"] == [None, "fsdp"]
        assert res["expert_reads"] and all(
            e is not None and e[1] - e[0] == 4 for _, e in res["expert_reads"])
        assert res["out_listing"] == ["model", "model_config.json"]
        # w_down ('layers', 'exp', 'mlp', 'embed'): 'mlp' takes fsdp first, 'embed' replicates.
        assert res["w_down_spec_shared_axis"] == [None, "expert", "fsdp", None]
        assert "dimension 'layers' of size 2 is not divisible" in res["not_divisible"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]     # no partial left
