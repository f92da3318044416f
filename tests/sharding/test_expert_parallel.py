"""Expert-parallel dispatchers: the capacity-padded all-to-all and the ragged all-to-all
(bookkeeping checked on CPU with an all-gather stand-in for lax.ragged_all_to_all) equal the
local dropless experts, in value and gradient, without drops (capacity = tokens per shard x k)
and with a capacity that drops exactly the assignments the documented policy drops; the ragged
one compiles for a TPU topology."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from sparse_lm.sharding import expert_parallel as ep
from sparse_lm.sharding.mesh import make_mesh
from tests.sharding.helpers import has_libtpu, run_worker


@pytest.fixture(scope="module")
def result():
    return run_worker("expert_parallel", {}, timeout=900)


def test_dispatchers_equal_the_local_experts(result):
    assert len(result) == 8             # 2 dispatchers x 2 capacities x 2 mesh layouts
    for name, r in result.items():
        assert r["max_abs_err"] <= 1e-5 * max(r["scale"], 1.0), (name, r)
        assert r["grad_max_abs_err"] <= 1e-5 * max(r["grad_scale"], 1.0), (name, r)


def test_capacity_cases_actually_drop(result):
    for name, r in result.items():
        if "cf=0.0" in name:
            assert r["dropped"] == 0, name
        else:
            assert 0 < r["dropped"] < r["assignments"], (name, r)


@pytest.mark.skipif(not has_libtpu(), reason="libtpu not installed (pip install the pin in "
                    "requirements.txt) so TPU ahead-of-time compilation is unavailable")
def test_ragged_dispatcher_compiles_for_tpu():
    r = run_worker("ep_tpu_compile", {"topology": "v5e:2x2"}, timeout=900)
    assert r["ragged_a2a"]["platform"] == "tpu"
    assert r["ragged_a2a"]["ragged_all_to_all_ops"] >= 2       # there and back (+ transposes)
    assert r["a2a_padded"]["all_to_all_ops"] >= 2


def test_dispatch_errors_name_the_fix():
    u = jnp.zeros((8, 4))
    idx = jnp.zeros((8, 2), jnp.int32)
    w = jnp.ones((8, 2))
    wg = jnp.zeros((4, 4, 2))
    wd = jnp.zeros((4, 2, 4))
    with pytest.raises(ep.DispatchError, match="needs a device mesh"):
        ep.dispatch("a2a_padded", u, idx, w, wg, wg, wd, limit=1.0)
    mesh = make_mesh({})                                    # one CPU device
    with pytest.raises(ep.DispatchError, match="use 'a2a_padded' on CPU"):
        ep.dispatch("ragged_a2a", u, idx, w, wg, wg, wd, limit=1.0, mesh=mesh)
    with pytest.raises(ep.DispatchError, match="allowed|dispatchers are"):
        ep.dispatch("local", u, idx, w, wg, wg, wd, limit=1.0, mesh=mesh)


def test_one_device_dispatch_is_the_local_computation():
    from sparse_lm.ops import moe as moe_ops
    rng = np.random.default_rng(0)
    u = rng.normal(size=(16, 8)).astype(np.float32)
    idx = np.argsort(rng.random((16, 4)), axis=1)[:, :2].astype(np.int32)
    w = rng.random((16, 2)).astype(np.float32)
    wg, wu = (rng.normal(size=(4, 8, 6)).astype(np.float32) for _ in range(2))
    wd = rng.normal(size=(4, 6, 8)).astype(np.float32)
    got = ep.dispatch("a2a_padded", u, idx, w, wg, wu, wd, limit=10.0, mesh=make_mesh({}))
    want = moe_ops.experts_dropless(u, idx, w, wg, wu, wd, 10.0)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
