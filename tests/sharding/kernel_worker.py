"""The Pallas kernels inside sharded train steps, on N fake CPU devices (interpreted kernels).

    python -m tests.sharding.kernel_worker jaxpr|equal '<json args>'

jaxpr: for each preset, where every `pallas_call` of the traced sharded train step sits (inside a
`shard_map` or not), and whether a sequence-split preset refuses an explicit kernel.
equal: loss and gradients of each preset's sharded forward with attention_impl="pallas_tpu"
(interpreted) against the unsharded model with the "xla" path.
Prints `RESULT <json>`.
"""
from __future__ import annotations

import json
import sys
import time

import jax
import numpy as np


def jaxpr(args: dict) -> dict:
    import optax

    from sparse_lm.sharding.mesh import ShardingError
    from sparse_lm.train.plan import make_plan
    from sparse_lm.train.schedule import Schedule
    from sparse_lm.train.steps import LossConfig
    from tests.jaxpr_walk import equations
    from tests.sharding.workers import small_config
    out = {}
    for name in args["presets"]:
        plan = make_plan(name, small_config(attention_impl="pallas_tpu"), optax.sgd(1e-3))
        step = plan.train_step(Schedule(peak_lr=1e-3, total_steps=10), LossConfig(), sparse=True)
        try:
            jp = jax.make_jaxpr(step)(plan.abstract_state(), plan.batch_spec_struct(8, 32))
        except ShardingError as e:
            out[name] = {"refused": str(e)}
            continue
        calls = [inside for eqn, inside in equations(jp) if eqn.primitive.name == "pallas_call"]
        out[name] = {"pallas_calls": len(calls),
                     "inside_shard_map": sum("shard_map" in i for i in calls)}
    return out


def equal(args: dict) -> dict:
    import optax
    from flax import nnx

    from sparse_lm.model import build_model
    from sparse_lm.train.plan import make_plan
    from tests.sharding.workers import loss_and_grads_fn, packed_batch, small_config
    batch = packed_batch(8, 32)
    make_fn = loss_and_grads_fn

    cfg = small_config(attention_impl="xla")
    graphdef, params, buffers = nnx.split(build_model(cfg, seed=0), nnx.Param, ...)
    one = jax.devices()[0]
    ref_loss, ref_g = jax.jit(make_fn(graphdef))(*jax.device_put((params, buffers, batch), one))
    ref_g = [np.asarray(x) for x in jax.tree.leaves(ref_g)]
    scale = max(float(np.max(np.abs(r))) for r in ref_g)
    out = {"reference_loss": float(ref_loss), "grad_scale": scale, "presets": {}}
    for name in args["presets"]:
        t0 = time.perf_counter()
        plan = make_plan(name, small_config(attention_impl="pallas_tpu"), optax.sgd(1e-3))
        g2, p2, b2 = nnx.split(build_model(plan.model_cfg, seed=0), nnx.Param, ...)
        fn = plan.shard_step(make_fn(plan.graphdef),
                             (plan.shardings.params, plan.shardings.buffers, plan.batch_sharding),
                             (plan.replicated, plan.shardings.params))
        loss, g = fn(jax.device_put(p2, plan.shardings.params),
                     jax.device_put(b2, plan.shardings.buffers),
                     jax.device_put(batch, plan.batch_sharding))
        err = max(float(np.max(np.abs(np.asarray(a) - r))) for a, r in zip(jax.tree.leaves(g), ref_g))
        out["presets"][name] = {"loss_diff": abs(float(loss) - float(ref_loss)),
                                "grad_max_abs_err": err, "seconds": time.perf_counter() - t0}
        print(f"{name}: loss diff {out['presets'][name]['loss_diff']:.2e}, grad err {err:.2e} "
              f"({time.perf_counter() - t0:.1f} s)", file=sys.stderr, flush=True)
    return out


if __name__ == "__main__":
    task = {"jaxpr": jaxpr, "equal": equal}[sys.argv[1]]
    print("RESULT " + json.dumps(task(json.loads(sys.argv[2]))), flush=True)
