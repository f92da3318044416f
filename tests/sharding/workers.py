"""Multi-device checks, run in a subprocess by tests/sharding/helpers.run_worker.

    python -m tests.sharding.workers <task> '<json args>'     (XLA_FLAGS sets the device count)

Each task prints `RESULT <json>` with what it measured; the pytest side asserts on it.
"""
from __future__ import annotations

import json
import math
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

jax.config.update("jax_enable_x64", False)


def small_config(**kw):
    """Every layer kind (SWA with hash routing, CSA with the indexer, HCA), score routing, MTP,
    at the smallest size that compiles quickly."""
    from configs import model_presets
    from sparse_lm.config import ModelConfig
    base = dict(num_layers=3, layer_prefix=("swa",), layer_cycle=("csa", "hca"), layer_tail=(),
                num_hash_layers=1, hc_sinkhorn_iters=3)
    base.update(kw)
    return ModelConfig.from_dict(model_presets.tiny()).replace(**base)


def packed_batch(b: int, s: int, seed: int = 0) -> dict:
    """Token rows [b, s+1] with two documents in some rows (aligned to 8 = the HCA ratio)."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, 256, (b, s + 1)).astype(np.int32)
    seg = np.ones((b, s + 1), np.int32)
    seg[1::2, s // 2:] = 2
    return {"tokens": tokens, "segment_ids": seg}


# ----------------------------------------------------------------------------- presets
def loss_and_grads_fn(graphdef):
    """(params, buffers, batch) -> (loss, gradients) of the full training objective."""
    from sparse_lm.train.losses import total_loss
    from sparse_lm.train.steps import _forward

    def loss_and_grads(params, buffers, batch):
        def f(p):
            out = _forward(graphdef, p, buffers, batch, sparse=True)
            return total_loss(out, batch, mtp_weight=0.3, balance_alpha=1e-2,
                              indexer_weight=1.0)[0]
        return jax.value_and_grad(f)(params)
    return loss_and_grads


def task_presets(args):
    """Loss and gradients of every preset on 8 devices vs one device; placement of parameters."""
    from flax import nnx

    from sparse_lm.model import build_model
    from sparse_lm.sharding import partition
    from sparse_lm.train.plan import make_plan
    cfg = small_config()
    batch = packed_batch(args.get("batch", 8), args.get("seq", 32))
    make_fn = loss_and_grads_fn

    t0 = time.perf_counter()
    graphdef, params, buffers = nnx.split(build_model(cfg, seed=0), nnx.Param, ...)
    dev0 = jax.devices()[0]
    ref_loss, ref_g = jax.jit(make_fn(graphdef), device=dev0)(params, buffers, batch)
    ref_g = [np.asarray(x) for x in jax.tree.leaves(ref_g)]
    out = {"reference_loss": float(ref_loss), "reference_s": time.perf_counter() - t0, "presets": {}}
    for name in args["presets"]:
        t0 = time.perf_counter()
        import optax
        plan = make_plan(name, cfg, optax.sgd(1e-3))
        g2, p2, b2 = nnx.split(build_model(plan.model_cfg, seed=0), nnx.Param, ...)
        p2 = jax.device_put(p2, plan.shardings.params)
        b2 = jax.device_put(b2, plan.shardings.buffers)
        fn = plan.shard_step(make_fn(plan.graphdef),
                             (plan.shardings.params, plan.shardings.buffers, plan.batch_sharding),
                             (plan.replicated, plan.shardings.params))
        loss, g = fn(p2, b2, jax.device_put(batch, plan.batch_sharding))
        gl = jax.tree.leaves(g)
        scale = max(float(np.max(np.abs(r))) for r in ref_g)
        err = max(float(np.max(np.abs(np.asarray(a) - r))) for a, r in zip(gl, ref_g))
        rel = max(float(np.max(np.abs(np.asarray(a) - r) / (np.abs(r) + 1e-3 * scale)))
                  for a, r in zip(gl, ref_g))
        # Placement: every parameter and gradient is laid out as the plan says.
        specs = jax.tree.leaves(partition.state_specs(plan.abstract.params, plan.sizes,
                                                      plan.preset.rules),
                                is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
        misplaced = []
        for (path, a), ga, sp in zip(jax.tree_util.tree_leaves_with_path(p2), gl, specs):
            want = jax.sharding.NamedSharding(plan.mesh, sp)
            for arr in (a, ga):
                shard = arr.addressable_shards[0].data.shape
                if not arr.sharding.is_equivalent_to(want, arr.ndim) or \
                        tuple(shard) != tuple(want.shard_shape(arr.shape)):
                    misplaced.append(partition.path_str(path))
        sharded = sum(1 for a in jax.tree.leaves(p2)
                      if a.addressable_shards[0].data.size < a.size)
        out["presets"][name] = {
            "loss": float(loss), "loss_diff": abs(float(loss) - float(ref_loss)),
            "grad_max_abs_err": err, "grad_scale": scale, "grad_max_rel_err": rel,
            "misplaced": misplaced, "sharded_arrays": sharded, "arrays": len(gl),
            "mesh": plan.sizes, "moe_dispatch": plan.model_cfg.moe_dispatch,
            "seconds": time.perf_counter() - t0}
        print(f"{name}: loss diff {out['presets'][name]['loss_diff']:.2e}, grad err {err:.2e} "
              f"({time.perf_counter() - t0:.1f} s)", file=sys.stderr, flush=True)
    return out


# ----------------------------------------------------------------------------- expert parallel
def _ep_problem(t, d, i, e, k, seed=0):
    rng = np.random.default_rng(seed)
    u = rng.normal(size=(t, d)).astype(np.float32)
    idx = np.argsort(rng.random((t, e)), axis=1)[:, :k].astype(np.int32)   # k distinct experts
    # Skew the routing so some destinations overflow a small capacity.
    idx[: t // 2, 0] = 0
    idx[: t // 2, 1:] = np.where(idx[: t // 2, 1:] == 0, 1, idx[: t // 2, 1:])
    w = rng.random((t, k)).astype(np.float32) + 0.1
    wg = (rng.normal(size=(e, d, i)) * 0.3).astype(np.float32)
    wu = (rng.normal(size=(e, d, i)) * 0.3).astype(np.float32)
    wd = (rng.normal(size=(e, i, d)) * 0.3).astype(np.float32)
    return u, idx, w, wg, wu, wd


def _token_chunks(sizes: dict, t: int):
    """Chunk of rows of each device coordinate, for tokens split over every size>1 axis."""
    axes = [a for a, s in sizes.items() if s > 1]
    n = math.prod(sizes[a] for a in axes)
    coords = list(np.ndindex(*[sizes[a] for a in axes]))
    per = t // n
    return axes, {c: np.arange(j * per, (j + 1) * per) for j, c in enumerate(coords)}


def keep_mask_padded(idx, sizes, e, cap):
    """Assignments kept by a2a_padded: per device chunk and destination, the first `cap` in
    (token, slot) order."""
    n_ep = sizes["expert"]
    e_loc = e // n_ep
    keep = np.zeros(idx.shape, bool)
    _, chunks = _token_chunks(sizes, idx.shape[0])
    for rows in chunks.values():
        seen = np.zeros(n_ep, int)
        for r in rows:
            for j in range(idx.shape[1]):
                dest = idx[r, j] // e_loc
                keep[r, j] = seen[dest] < cap
                seen[dest] += 1
    return keep


def keep_mask_ragged(idx, sizes, e, buf):
    """Assignments kept by ragged_a2a: each receiver accepts its sources in expert-axis order
    until `buf` rows; a source's rows to it are ordered by (expert, token, slot)."""
    n_ep = sizes["expert"]
    e_loc = e // n_ep
    keep = np.zeros(idx.shape, bool)
    axes, chunks = _token_chunks(sizes, idx.shape[0])
    ex = axes.index("expert") if "expert" in axes else None
    groups: dict = {}
    for c, rows in chunks.items():
        key = tuple(v for a, v in zip(axes, c) if a != "expert")
        groups.setdefault(key, {})[c[ex] if ex is not None else 0] = rows
    for members in groups.values():
        for recv in range(n_ep):
            used = 0
            for src in range(n_ep):
                rows = members[src]
                items = [(idx[r, j], r, j) for r in rows for j in range(idx.shape[1])
                         if idx[r, j] // e_loc == recv]
                items.sort()
                take = max(0, min(len(items), buf - used))
                for (_, r, j) in items[:take]:
                    keep[r, j] = True
                used += len(items)
    return keep


def task_expert_parallel(args):
    """EP dispatchers vs the local dropless experts: values and gradients, no-drop and capacity."""
    from sparse_lm.ops import moe as moe_ops
    from sparse_lm.sharding import expert_parallel as ep
    from sparse_lm.sharding.mesh import make_mesh
    t, d, i, e, k = 64, 16, 8, 8, 2
    u, idx, w, wg, wu, wd = _ep_problem(t, d, i, e, k)
    limit = 10.0
    res = {}

    def ref_fn(u, w, wg, wu, wd, keep):
        return moe_ops.experts_dropless(u, idx, w * keep, wg, wu, wd, limit)

    for layout in args.get("layouts", [{"fsdp": 2, "expert": 4}, {"expert": 8}]):
        mesh = make_mesh(layout)
        sizes = dict(zip(mesh.axis_names, mesh.devices.shape))
        for kind, emulate in (("a2a_padded", False), ("ragged_a2a", True)):
            for cf in (0.0, 0.5):
                def ep_fn(u, w, wg, wu, wd):
                    return ep.dispatch(kind, u, jnp.asarray(idx), w, wg, wu, wd, limit=limit,
                                       capacity_factor=cf, mesh=mesh, emulate=emulate)
                n_dev = math.prod(sizes.values())
                a = t // n_dev * k
                if cf == 0:
                    keep = np.ones_like(w)
                elif kind == "a2a_padded":
                    keep = keep_mask_padded(idx, sizes, e, max(1, math.ceil(cf * a / sizes["expert"])))
                else:
                    keep = keep_mask_ragged(idx, sizes, e, max(1, math.ceil(cf * a)))
                keep = keep.astype(np.float32)
                got = np.asarray(jax.jit(ep_fn)(u, w, wg, wu, wd))
                want = np.asarray(jax.jit(ref_fn)(u, w, wg, wu, wd, keep))
                loss_ep = lambda *xs: jnp.sum(jnp.sin(ep_fn(*xs)))            # noqa: E731
                loss_ref = lambda *xs: jnp.sum(jnp.sin(ref_fn(*xs, keep)))    # noqa: E731
                g_ep = jax.jit(jax.grad(loss_ep, argnums=(0, 1, 2, 3, 4)))(u, w, wg, wu, wd)
                g_ref = jax.jit(jax.grad(loss_ref, argnums=(0, 1, 2, 3, 4)))(u, w, wg, wu, wd)
                gerr = max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
                           for x, y in zip(g_ep, g_ref))
                gscale = max(float(np.max(np.abs(np.asarray(y)))) for y in g_ref)
                name = f"{kind}{'(emulated)' if emulate else ''} cf={cf} " + \
                       ",".join(f"{a}={s}" for a, s in sizes.items() if s > 1)
                res[name] = {"max_abs_err": float(np.max(np.abs(got - want))),
                             "scale": float(np.max(np.abs(want))),
                             "dropped": int((keep == 0).sum()), "assignments": int(keep.size),
                             "grad_max_abs_err": gerr, "grad_scale": gscale}
    return res


def task_ep_tpu_compile(args):
    """The ragged_all_to_all dispatcher (value and gradient) compiled for a TPU topology."""
    from sparse_lm.sharding import expert_parallel as ep
    from sparse_lm.sharding.mesh import make_mesh
    from sparse_lm.aot.topology import resolve_topology, topology_devices
    devices = topology_devices(resolve_topology(args.get("topology", "v5e:2x2")))
    mesh = make_mesh({"expert": len(devices)}, devices=devices)
    t, d, i, e, k = 256, 128, 128, 8, 2
    sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    s = lambda *shape, dt=jnp.float32: jax.ShapeDtypeStruct(shape, dt, sharding=sh)  # noqa: E731
    out = {}
    for kind in ("ragged_a2a", "a2a_padded"):
        def loss(u, idx, w, wg, wu, wd):
            y = ep.dispatch(kind, u, idx, w, wg, wu, wd, limit=10.0, mesh=mesh)
            return jnp.sum(y.astype(jnp.float32) ** 2)
        t0 = time.perf_counter()
        c = jax.jit(jax.value_and_grad(loss, argnums=(0, 3, 4, 5))).lower(
            s(t, d, dt=jnp.bfloat16), s(t, k, dt=jnp.int32), s(t, k), s(e, d, i), s(e, d, i),
            s(e, i, d)).compile()
        text = c.as_text()
        out[kind] = {"seconds": time.perf_counter() - t0,
                     "ragged_all_to_all_ops": (text.count("ragged-all-to-all(")  # sync or async (TPU)
                                              + text.count("ragged-all-to-all-start(")),
                     "all_to_all_ops": text.count(" all-to-all("),
                     "platform": devices[0].platform, "device_kind": devices[0].device_kind}
    return out


def task_mesh_slices(args):
    """ICI x DCN: a 2-slice mesh keeps each slice's devices together on the dcn axis."""
    from sparse_lm.sharding.mesh import make_mesh
    devs = jax.devices()
    mesh = make_mesh({"fsdp": -1}, {"data": -1}, devs, slices=2)
    arr = mesh.devices
    half = len(devs) // 2
    first = {d.id for d in devs[:half]}
    slice_of_data = [sorted({int(d.id in first) for d in arr[j].flat}) for j in range(arr.shape[0])]
    return {"shape": dict(zip(mesh.axis_names, arr.shape)), "slice_of_data_row": slice_of_data,
            "axis_types": [str(t) for t in mesh.axis_types]}


def task_hlo_stats(args):
    """Loop-aware FLOP and collective accounting on a CPU-compiled SPMD program with a known
    answer: a scan of `trips` matmuls on row-sharded activations, then an all-gather."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    from sparse_lm.aot import hlo_stats
    from sparse_lm.sharding.mesh import make_mesh
    mesh = make_mesh({"fsdp": -1})
    n = mesh.devices.size
    b, d, trips = 8 * n, 64, args.get("trips", 37)
    rows = NamedSharding(mesh, P("fsdp"))
    rep = NamedSharding(mesh, P())

    def f(x, w, w2):
        def body(h, _):
            return jnp.tanh(h @ w), None
        h, _ = jax.lax.scan(body, x, None, length=trips)
        h = jax.lax.with_sharding_constraint(h, rep)       # all-gather of the rows
        return h @ w2
    c = jax.jit(f, in_shardings=(rows, rep, rep), out_shardings=rep).lower(
        jax.ShapeDtypeStruct((b, d), jnp.float32), jax.ShapeDtypeStruct((d, d), jnp.float32),
        jax.ShapeDtypeStruct((d, d), jnp.float32)).compile()
    s = hlo_stats.summarize(c.as_text(), n)
    cost = c.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return {"devices": n, "rows_per_device": b // n, "d": d, "trips": trips,
            "matmul_flops": s.matmul_flops, "matmul_flops_once": s.matmul_flops_once,
            "cost_analysis_flops": float(cost.get("flops", 0.0)),
            "collectives": s.collective_table(), "unknown_loops": s.unknown_loops,
            "global_rows": b}


def task_train_loop(args):
    """The training loop with a sharding preset: train, then resume under another preset."""
    import pathlib

    from sparse_lm.train.loop import train
    from tests.train.tiny_train_config import get_config
    work = pathlib.Path(args["workdir"])
    out = {}
    for preset, steps in (("fsdp", 4), ("fsdp_tp:tensor=2", 6)):
        c = get_config()
        c.sharding = preset
        c.train.update(dict(steps=steps, batch_size=8, checkpoint_every=2, async_checkpoint=False))
        c.schedule.update(dict(warmup_steps=1, decay_steps=0))
        summary = train(c, work)
        doc = json.loads((work / "config.json").read_text())
        out[preset] = {"resumed_from": summary["resumed_from"],
                       "last_loss": summary["history"][-1]["loss"],
                       "sharding": {k: doc["sharding"][k] for k in ("name", "mesh", "rules")}}
    return out


def task_tpu_multislice_mesh(args):
    """A 2-slice TPU topology: the dcn factor of `data` separates the slices."""
    from sparse_lm.sharding.mesh import make_mesh
    from sparse_lm.aot.topology import resolve_topology, topology_devices
    devs = topology_devices(resolve_topology(args.get("topology", "v5e-4x2")))
    mesh = make_mesh({"fsdp": -1}, {"data": -1}, devs)
    arr = mesh.devices
    return {"shape": dict(zip(mesh.axis_names, arr.shape)),
            "slices_per_data_row": [sorted({d.slice_index for d in arr[j].flat})
                                    for j in range(arr.shape[0])]}


def task_step_layout(args):
    """Compile the sharded train step (Muon + AdamW) for `presets` and report, from the
    partitioned HLO, (a) which full (unsharded) shapes of the stacked cycle parameters that the
    preset shards appear in the program (the backward scan's gradient carry or Newton-Schulz
    left replicated would), and (b) the longest sort (the MoE sorts its (token, expert)
    assignments: per device it sorts rows_per_device x k, a global sort would be x devices).
    args.disable: "slice_constraint" (the scan-body constraint) and/or "local_experts" (the
    per-device MoE under shard_map) switched off, to show that the checks can fail."""
    import re

    from sparse_lm.model import transformer
    from sparse_lm.sharding import partition
    from sparse_lm.train.plan import make_plan
    from sparse_lm.train import optimizer as opt_lib
    from sparse_lm.train.schedule import Schedule
    from sparse_lm.train.steps import LossConfig
    if "slice_constraint" in args.get("disable", []):
        transformer.constrain_slice = lambda state, names: state
    if "local_experts" in args.get("disable", []):
        from sparse_lm.sharding import expert_parallel
        expert_parallel.local_experts = lambda experts, *a, limit: experts(*a, limit)
    cfg = small_config(num_layers=5, n_routed_experts=16)
    b, s = args.get("batch", 8), args.get("seq", 32)
    schedule = Schedule(peak_lr=1e-3, total_steps=10)
    tx = opt_lib.make_optimizer(opt_lib.OptimizerConfig(), schedule)
    out = {}
    for name in args["presets"]:
        plan = make_plan(name, cfg, tx)
        n = plan.mesh.devices.size
        step = plan.train_step(schedule, LossConfig(), sparse=True, donate=False)
        text = step.lower(plan.abstract_state(), plan.batch_spec_struct(b, s)).compile().as_text()
        specs = jax.tree.leaves(partition.state_specs(plan.abstract.params, plan.sizes,
                                                      plan.preset.rules),
                                is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
        full = {}
        for (path, x), sp in zip(jax.tree_util.tree_leaves_with_path(plan.abstract.params), specs):
            p = partition.path_str(path)
            if p.startswith("cycles/") and x.ndim >= 3 and any(a is not None for a in sp):
                dims = ",".join(map(str, x.shape))
                hits = len(re.findall(r"\[" + dims + r"\]", text))
                full[p] = {"shape": list(x.shape), "spec": str(sp), "instructions": hits}
        sorts = [int(m) for m in re.findall(r"= \(?[a-z0-9]+\[(\d+)[^=]*? sort\(", text)]
        out[name] = {"devices": n, "full_shape_hits": full, "longest_sort": max(sorts, default=0),
                     "rows_per_device": b * s // n, "k": cfg.num_experts_per_tok,
                     "global_rows": b * s}
        print(f"{name}: {sum(v['instructions'] for v in full.values())} full-shape instructions, "
              f"longest sort {out[name]['longest_sort']}", file=sys.stderr, flush=True)
    return out


def task_muon_spread(args):
    """Muon's update on 8 devices (matrix axes split over fsdp, experts over expert) against one
    device, and whether the compiled update holds any all-reduce (it would if Newton-Schulz
    iterated on slices of matrices instead of whole ones per device)."""
    import numpy as np

    from jax.sharding import NamedSharding, PartitionSpec as P

    from sparse_lm.sharding.constraints import use_rules
    from sparse_lm.sharding.mesh import make_mesh
    from sparse_lm.sharding.presets import load_preset
    from sparse_lm.train.optimizer import scale_by_report_muon
    rng = np.random.default_rng(0)
    grads = {"stack": rng.normal(size=(5, 16, 24)).astype(np.float32),        # [layers, m, n]
             "experts": rng.normal(size=(3, 8, 16, 24)).astype(np.float32)}   # [layers, E, m, n]
    tx = scale_by_report_muon()
    ref = jax.jit(lambda g: tx.update(g, tx.init(g))[0])(grads)
    preset = load_preset("fsdp_ep:expert=4")
    mesh = make_mesh(preset.ici, devices=jax.devices())
    shard = {"stack": NamedSharding(mesh, P(None, None, "fsdp")),
             "experts": NamedSharding(mesh, P(None, "expert", None, "fsdp"))}

    def update(g):
        with use_rules(mesh, preset.rules):
            return tx.update(g, tx.init(g))[0]
    fn = jax.jit(update, in_shardings=(shard,), out_shardings=shard)
    g = jax.device_put(grads, shard)
    got = fn(g)
    text = fn.lower(g).compile().as_text()
    return {"max_abs_diff": max(float(np.abs(np.asarray(got[k]) - np.asarray(ref[k])).max())
                                for k in grads),
            "all_reduces": text.count(" all-reduce("),
            "out_specs": {k: str(v.sharding.spec) for k, v in got.items()}}


TASKS = {"muon_spread": task_muon_spread, "hlo_stats": task_hlo_stats, "tpu_multislice_mesh": task_tpu_multislice_mesh, "train_loop": task_train_loop, "presets": task_presets, "expert_parallel": task_expert_parallel,
         "ep_tpu_compile": task_ep_tpu_compile, "mesh_slices": task_mesh_slices,
         "step_layout": task_step_layout}

if __name__ == "__main__":
    task, raw = sys.argv[1], (sys.argv[2] if len(sys.argv) > 2 else "{}")
    result = TASKS[task](json.loads(raw))
    print("RESULT " + json.dumps(result, default=str), flush=True)
