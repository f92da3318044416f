"""One process of a 2-process `jax.distributed` run on loopback (CPU, gloo collectives).

    python -m tests.sharding.dist_worker <process_id> <num_processes> <port> <workdir> <out.json>

Each process has 2 CPU devices (4 global). It trains a few steps with preset A (fsdp over all 4
devices; each process feeds only its own rows), saves the train state with orbax, restores it
onto preset B (fsdp_tp: a different mesh and different shardings) and writes what it measured.
"""
from __future__ import annotations

import json
import sys
import time

import jax

jax.config.update("jax_num_cpu_devices", 2)
jax.config.update("jax_cpu_collectives_implementation", "gloo")


def main(pid: int, nproc: int, port: int, workdir: str, out_path: str) -> None:
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=nproc,
                               process_id=pid, initialization_timeout=120)
    import numpy as np
    from jax.experimental import multihost_utils

    from sparse_lm.train.plan import make_plan
    from sparse_lm.train import optimizer as opt_lib
    from sparse_lm.train.checkpoint import Checkpointer
    from sparse_lm.train.schedule import Schedule
    from sparse_lm.train.steps import LossConfig
    from tests.sharding.workers import packed_batch, small_config

    t0 = time.perf_counter()
    cfg = small_config()
    schedule = Schedule(peak_lr=3e-3, total_steps=10, warmup_steps=1)
    tx = opt_lib.make_optimizer(opt_lib.OptimizerConfig(), schedule)
    res = {"process": pid, "processes": jax.process_count(), "devices": jax.device_count(),
           "local_devices": jax.local_device_count()}
    plan_a = make_plan("fsdp", cfg, tx)
    state = plan_a.init_state(seed=0)
    step = plan_a.train_step(schedule, LossConfig(), sparse=True)
    global_b = 8
    losses = []
    for i in range(3):
        full = packed_batch(global_b, 32, seed=i)       # every process builds the same rows...
        rows = slice(pid * global_b // nproc, (pid + 1) * global_b // nproc)
        local = {k: v[rows] for k, v in full.items()}   # ...and feeds only its own
        state, m = step(state, plan_a.global_batch(local))
        losses.append(float(m["loss"]))
    res["losses"] = losses
    res["train_s"] = time.perf_counter() - t0

    ckpt = Checkpointer(workdir, keep=2, async_save=False)
    ckpt.save(3, state, [{"position": 0}] * nproc, {"model": cfg.to_dict(),
                                                      "sharding": plan_a.metadata()["rules"]},
              force=True)
    ckpt.wait()

    plan_b = make_plan("fsdp_tp:tensor=2", cfg, tx)
    restored, _, meta = ckpt.restore(3, plan_b.abstract_state())
    ckpt.close()
    res["mesh_a"] = plan_a.sizes
    res["mesh_b"] = plan_b.sizes
    res["saved_rules_fsdp"] = meta["sharding"]
    # Restored arrays live in preset B's layout...
    specs_b = [s.spec for s in jax.tree.leaves(plan_b.shardings.params,
                                               is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))]
    res["restored_in_b_layout"] = all(
        a.sharding.spec == s for a, s in zip(jax.tree.leaves(restored.params), specs_b))
    res["layouts_differ"] = sum(
        a.sharding.spec != b.sharding.spec
        for a, b in zip(jax.tree.leaves(restored.params), jax.tree.leaves(state.params)))

    # ...and hold exactly the trained values (compared on the full arrays, on every process).
    gather = lambda t: [np.asarray(multihost_utils.process_allgather(x, tiled=True))  # noqa: E731
                        for x in jax.tree.leaves(t)]
    pa, pb = gather(state.params), gather(restored.params)
    res["param_max_abs_diff"] = max(float(np.max(np.abs(x - y))) for x, y in zip(pa, pb))
    oa, ob = gather(state.opt_state), gather(restored.opt_state)
    res["opt_max_abs_diff"] = max(float(np.max(np.abs(x - y))) for x, y in zip(oa, ob))
    res["step_restored"] = int(restored.step.addressable_data(0))
    res["param_checksum"] = float(sum(np.sum(x.astype(np.float64) ** 2) for x in pa))
    res["total_s"] = time.perf_counter() - t0
    with open(out_path, "w") as f:
        json.dump(res, f)
    jax.distributed.shutdown()


if __name__ == "__main__":
    a = sys.argv[1:]
    main(int(a[0]), int(a[1]), int(a[2]), a[3], a[4])
