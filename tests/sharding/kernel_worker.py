"""The Pallas kernels inside sharded train steps, on N fake CPU devices (interpreted kernels).

    python -m tests.sharding.kernel_worker jaxpr|equal '<json args>'

jaxpr: for each preset, where every `pallas_call` of the traced sharded train step sits (inside a
`shard_map` or not).
equal: loss and gradients of each preset's sharded forward with attention_impl="pallas_tpu"
(interpreted; or args["attention_impl"]) against the unsharded model with the "xla" path.
halo: one attention layer's `_sparse_attention` with the sequence split over `context`, output,
lse and their VJP against the unsplit "xla" call: SWA, HCA and dense-stage CSA (the block-sparse
kernel with the shard's query offset) and CSA (the indexer's picks, a list) on 4 shards of 8
rows (a one-shard halo); SWA and HCA on 8 shards of 4 rows (a halo over two shards). For each,
the number of [.., rows, N] int / bool arrays in the traced step (a per-row entry list or mask).
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
        step = plan.train_step(Schedule(peak_lr=1e-3, total_steps=10), LossConfig(),
                               sparse=args.get("sparse", True))
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
        plan = make_plan(name, small_config(attention_impl=args.get("attention_impl", "pallas_tpu")),
                         optax.sgd(1e-3))
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


def halo(args: dict) -> dict:
    import jax.numpy as jnp
    from flax import nnx

    from sparse_lm.model.attention import Attention
    from sparse_lm.ops import masks
    from sparse_lm.sharding import kernels
    from sparse_lm.sharding.constraints import use_rules
    from sparse_lm.sharding.presets import load_preset
    from tests.sharding.workers import small_config
    cfg = small_config(num_heads=2)    # 2 heads: no [.., rows, H] array passes for [.., rows, N]
    b, s, h, d = 2, 32, cfg.num_heads, cfg.head_dim
    rng = np.random.default_rng(0)
    seg = np.ones((b, s), np.int32)
    seg[1, 13:] = 2                      # a document boundary inside a shard, mid-window
    x = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)  # noqa: E731
    q, kv, ct_out, ct_lse = x(b, s, h, d), x(b, s, d), x(b, s, h, d), x(b, s, h)
    cases = {}
    # dense-stage CSA (no picks) takes HCA's path at ratio 4
    for kind, listed in (("swa", False), ("hca", False), ("csa", False), ("csa", True)):
        layer = Attention(cfg, kind, rngs=nnx.Rngs(0))
        layer.sink[...] = x(h)
        entries = valid = picks = None
        if kind != "swa":
            n = s // layer.ratio
            entries, valid = x(b, n, d), masks.window_validity(jnp.asarray(seg), b, s, layer.ratio)
            if listed:           # 3 picks per row among its visible entries, -1 where fewer
                vis = np.asarray(masks.sequence_entry_visible(s, layer.ratio, valid, seg))
                picks = np.full((b, s, 3), -1, np.int32)
                for i, t in zip(*np.nonzero(vis.any(-1))):
                    e = np.flatnonzero(vis[i, t])
                    picks[i, t, :min(3, e.size)] = rng.permutation(e)[:3]
                picks = jnp.asarray(picks)
        cases[f"{kind}{'_listed' if listed else ''}"] = (layer, entries, valid, picks)
    out = {}
    for preset, devices, kinds in (("cp:fsdp=1,context=4", 4, list(cases)),
                                   ("cp:fsdp=1,context=8", 8, ["swa", "hca"])):
        p = load_preset(preset)
        mesh = p.make_mesh(jax.devices()[:devices])
        for name in kinds:
            layer, entries, valid, picks = cases[name]
            def f(q, kv, entries, impl, sharded, layer=layer, valid=valid, picks=picks):
                def loss(q, kv, entries):
                    o, lse = layer._sparse_attention(q, kv, jnp.asarray(seg), entries, valid,
                                                     picks, impl)
                    return jnp.sum(o * ct_out) + jnp.sum(lse * ct_lse), (o, lse)
                if not sharded:
                    return jax.value_and_grad(loss, (0, 1, 2), has_aux=True)(q, kv, entries)
                with use_rules(mesh, p.rules, preset=p.name):
                    return jax.value_and_grad(loss, (0, 1, 2), has_aux=True)(q, kv, entries)
            want = jax.jit(lambda *a: f(*a, "xla", False))(q, kv, entries)
            got = jax.jit(lambda *a: f(*a, "pallas_tpu", True))(q, kv, entries)
            (_, (wo, wl)), wg = want
            (_, (go, gl)), gg = got
            err = lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b))))  # noqa: E731
            out[f"{preset} {name}"] = {
                "out": err(go, wo), "lse": err(gl, wl),
                "grad": max(err(g, w) for g, w in zip(gg, wg) if w is not None),
                "pallas_calls_in_shard_map": _kernel_calls_inside(
                    lambda *a: f(*a, "pallas_tpu", True), q, kv, entries),
                "row_entry_arrays": None if entries is None else _row_entry_arrays(
                    lambda *a: f(*a, "pallas_tpu", True), (q, kv, entries),
                    rows={s, s // devices, s // devices + kernels.halo_length(cfg.sliding_window)},
                    n=entries.shape[1])}
    out["refused without a sequence form"] = _refusal_without_sequence_fn(q)
    return out


def _refusal_without_sequence_fn(q) -> str:
    """kernel_call's error where the rows are split along the sequence and the caller gave no
    sequence_fn."""
    from sparse_lm.sharding import kernels
    from sparse_lm.sharding.constraints import use_rules
    from sparse_lm.sharding.mesh import ShardingError
    from sparse_lm.sharding.presets import load_preset
    p = load_preset("cp:fsdp=1,context=4")
    names = ("activation_batch", "activation_length", "activation_heads", "activation_kv")
    try:
        with use_rules(p.make_mesh(jax.devices()[:4]), p.rules, preset=p.name):
            jax.eval_shape(lambda q: kernels.kernel_call(
                lambda q: q, [("q", q, names)], [(q.shape, q.dtype, names)], what="a kernel"), q)
    except ShardingError as e:
        return str(e)
    return ""


def _row_entry_arrays(fn, args, *, rows: set, n: int) -> list:
    """The int / bool values of fn's jaxpr shaped [..., r, N] for r in rows (a per-row entry
    list or visibility mask: [B, T, N] on a shard), as 'dtype[shape]' strings."""
    from tests.jaxpr_walk import equations
    found = []
    for eqn, _ in equations(jax.make_jaxpr(fn)(*args)):
        for v in eqn.outvars:
            aval = getattr(v, "aval", None)
            shape = getattr(aval, "shape", ())
            if (len(shape) >= 2 and shape[-1] == n and shape[-2] in rows
                    and (np.issubdtype(aval.dtype, np.integer) or aval.dtype == np.bool_)):
                found.append(f"{aval.dtype}{list(shape)}")
    return found


def _kernel_calls_inside(fn, *args) -> list:
    """[(calls inside a shard_map, all calls)] of fn's jaxpr."""
    from tests.jaxpr_walk import equations
    calls = [inside for eqn, inside in equations(jax.make_jaxpr(fn)(*args))
             if eqn.primitive.name == "pallas_call"]
    return [sum("shard_map" in i for i in calls), len(calls)]


if __name__ == "__main__":
    task = {"jaxpr": jaxpr, "equal": equal, "halo": halo}[sys.argv[1]]
    print("RESULT " + json.dumps(task(json.loads(sys.argv[2]))), flush=True)
