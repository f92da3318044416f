"""Grouped matmul registry (kernels_pallas/grouped_matmul): the Mosaic TPU and Pallas Triton
kernels, interpreted on CPU, equal `lax.ragged_dot` forward and backward (d lhs, d rhs) for
group sizes with empty experts, one expert receiving every row, rows not a multiple of the
tile, K/N not multiples of their tiles, bf16; the visit lists cover every row exactly once;
bad input is refused with errors naming the argument; tokamax is used only when importable.
About 30 s of CPU time (interpreted kernels)."""
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas.grouped_matmul import (GroupedMatmulConfig, grouped_matmul,
                                           grouped_matmul_transposed)
from kernels_pallas.grouped_matmul import api as gmm_api
from kernels_pallas.grouped_matmul.plan import work_list
from kernels_pallas.grouped_matmul.reference import grouped_transposed
from kernels_pallas.testing import assert_close

PALLAS = ("pallas_tpu", "pallas_gpu")
SMALL = GroupedMatmulConfig(block_m=16, block_k=16, block_n=16)
# (group sizes, K, N): sums are M. Zero-size experts first, middle and last; one expert with
# every row; a single row; sizes that straddle tile boundaries; K, N not multiples of 16.
CASES = {
    "empty_experts_ragged": ([0, 7, 0, 20, 13, 0], 24, 20),
    "one_expert_takes_all": ([0, 0, 37, 0], 16, 32),
    "single_row": ([0, 1, 0], 8, 16),
}


def _data(sizes, k, n, dtype, seed=0, transpose_rhs=False):
    rng = np.random.default_rng(seed)
    m, g = int(sum(sizes)), len(sizes)
    lhs = jnp.asarray(rng.normal(size=(m, k)), jnp.float32).astype(dtype)
    shape = (g, n, k) if transpose_rhs else (g, k, n)
    rhs = jnp.asarray(rng.normal(size=shape) / np.sqrt(k), jnp.float32).astype(dtype)
    cot = jnp.asarray(rng.normal(size=(m, n)), jnp.float32)
    return lhs, rhs, jnp.asarray(np.asarray(sizes, np.int32)), cot


def _value_and_grads(impl, lhs, rhs, sizes, cot, **kw):
    def loss(a, b):
        out = grouped_matmul(a, b, sizes, implementation=impl, **kw)
        return jnp.sum(out.astype(jnp.float32) * cot), out
    (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(lhs, rhs)
    return out, grads


@pytest.mark.parametrize("impl", PALLAS)
@pytest.mark.parametrize("case", list(CASES))
def test_forward_and_gradients_equal_ragged_dot(impl, case):
    sizes, k, n = CASES[case]
    lhs, rhs, gs, cot = _data(sizes, k, n, jnp.float32)
    got = _value_and_grads(impl, lhs, rhs, gs, cot, config=SMALL, interpret=True)
    with jax.default_matmul_precision("highest"):
        want = _value_and_grads("reference", lhs, rhs, gs, cot)
    assert_close("out", got[0], want[0], 1e-5)
    assert_close("dlhs", got[1][0], want[1][0], 1e-5)
    assert_close("drhs", got[1][1], want[1][1], 1e-5)
    # Empty experts get exactly zero weight gradient.
    empty = np.asarray(sizes) == 0
    assert np.all(np.asarray(got[1][1])[empty] == 0)


@pytest.mark.parametrize("impl", PALLAS)
def test_transposed_rhs_and_bf16(impl):
    sizes, k, n = [5, 0, 30, 2], 32, 24
    lhs, rhs, gs, cot = _data(sizes, k, n, jnp.bfloat16, seed=3, transpose_rhs=True)
    got = _value_and_grads(impl, lhs, rhs, gs, cot, config=SMALL, interpret=True,
                           transpose_rhs=True)
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    with jax.default_matmul_precision("highest"):
        want = _value_and_grads("reference", f32(lhs), f32(rhs), gs, cot, transpose_rhs=True)
    assert got[0].dtype == jnp.bfloat16 and got[1][1].dtype == jnp.bfloat16
    for name, a, b in (("out", got[0], want[0]), ("dlhs", got[1][0], want[1][0]),
                       ("drhs", got[1][1], want[1][1])):
        assert_close(name, a, b, 2e-2)


@pytest.mark.parametrize("impl", PALLAS)
def test_traced_group_sizes_under_jit_and_default_config(impl):
    """The MoE case: sizes come from a bincount inside jit (not checkable, not static)."""
    sizes, k, n = [3, 0, 9, 0, 12], 16, 8
    lhs, rhs, _, _ = _data(sizes, k, n, jnp.float32, seed=5)
    ids = jnp.asarray(np.repeat(np.arange(5), sizes), jnp.int32)

    @jax.jit
    def f(lhs, rhs, ids):
        gs = jnp.bincount(ids, length=5).astype(jnp.int32)
        return (grouped_matmul(lhs, rhs, gs, implementation=impl),
                grouped_matmul(lhs, rhs, gs, implementation="reference"))

    got, want = f(lhs, rhs, ids)
    assert_close("out", got, want, 1e-5)


@pytest.mark.parametrize("impl", PALLAS)
def test_transposed_product_equals_masked_reference(impl):
    sizes, k, n = [0, 11, 0, 6, 15], 24, 40
    lhs, _, gs, cot = _data(sizes, k, n, jnp.float32, seed=7)
    got = grouped_matmul_transposed(lhs, cot, gs, len(sizes), implementation=impl, config=SMALL,
                                    interpret=True)
    want = grouped_transposed(lhs, cot, gs, len(sizes))
    assert got.shape == (len(sizes), k, n)
    assert_close("tgmm", got, want, 1e-5)
    via_xla = grouped_matmul_transposed(lhs, cot, gs, len(sizes), implementation="reference")
    assert_close("tgmm ragged_dot", via_xla, want, 1e-5)


@pytest.mark.parametrize("sizes", [[0, 7, 0, 20, 13, 0], [37], [0, 0, 0, 16, 0], [1, 1, 1, 1]])
@pytest.mark.parametrize("tm", [8, 16])
@pytest.mark.parametrize("visit_empty,tail", [(False, True), (True, False)])
def test_visit_list_covers_every_row_once(sizes, tm, visit_empty, tail):
    m = int(sum(sizes))
    mp = -(-m // tm) * tm
    wl = work_list(jnp.asarray(sizes, jnp.int32), mp, tm, visit_empty=visit_empty, tail=tail)
    group, tile = np.asarray(wl.group), np.asarray(wl.tile)
    start, end, count = np.asarray(wl.start), np.asarray(wl.end), int(wl.count[0])
    assert count <= wl.length
    covered = np.zeros(mp, int)
    for i in range(count):
        rows = np.arange(tile[i] * tm, tile[i] * tm + tm)
        covered[rows[(rows >= start[group[i]]) & (rows < end[group[i]])]] += 1
    want = np.ones(mp, int) if tail else (np.arange(mp) < m).astype(int)
    np.testing.assert_array_equal(covered, want)
    # Visits of one group are consecutive and in tile order; padding repeats the last visit.
    assert np.all(np.diff(group[:count]) >= 0)
    assert np.all(group[count:] == group[count - 1]) and np.all(tile[count:] == tile[count - 1])
    if visit_empty:   # every group is visited (its weight gradient must be written)
        assert set(group[:count]) == set(range(len(sizes)))


def test_bad_input_is_refused_with_clear_errors():
    lhs, rhs, gs, _ = _data([3, 5], 8, 4, jnp.float32)
    with pytest.raises(TypeError, match="group_sizes has dtype int64"):
        grouped_matmul(lhs, rhs, np.array([3, 5], np.int64), implementation="reference")
    with pytest.raises(TypeError, match="group_sizes has dtype float32"):
        grouped_matmul(lhs, rhs, gs.astype(jnp.float32), implementation="reference")
    with pytest.raises(ValueError, match="sum to 7 but lhs has M=8"):
        grouped_matmul(lhs, rhs, jnp.asarray([3, 4], jnp.int32), implementation="pallas_tpu")
    with pytest.raises(ValueError, match="sizes must be >= 0"):
        grouped_matmul(lhs, rhs, jnp.asarray([9, -1], jnp.int32), implementation="reference")
    with pytest.raises(ValueError, match=r"group_sizes has shape \(3,\)"):
        grouped_matmul(lhs, rhs, jnp.asarray([3, 5, 0], jnp.int32))
    with pytest.raises(ValueError, match="lhs has K=6 columns"):
        grouped_matmul(lhs[:, :6], rhs, gs)
    with pytest.raises(TypeError, match="lhs has dtype bfloat16 but rhs has float32"):
        grouped_matmul(lhs.astype(jnp.bfloat16), rhs, gs)
    with pytest.raises(ValueError, match="implementation='dense' is invalid"):
        grouped_matmul(lhs, rhs, gs, implementation="dense")
    with pytest.raises(ValueError, match="block_k=16 is invalid for the compiled TPU kernel"):
        GroupedMatmulConfig(block_k=16).validate_for("tpu", compiled=True)
    with pytest.raises(ValueError, match="block_n=96 is invalid for the compiled GPU kernel"):
        GroupedMatmulConfig(block_n=96).validate_for("gpu", compiled=True)


def test_default_is_ragged_dot_on_cpu():
    assert gmm_api.default_implementation("cpu") == "reference"
    assert gmm_api.default_implementation("tpu") == "pallas_tpu"
    assert gmm_api.default_implementation("gpu") == "pallas_gpu"


def test_tokamax_is_used_only_when_importable(monkeypatch):
    lhs, rhs, gs, _ = _data([2, 0, 6], 8, 4, jnp.float32)
    gmm_api.tokamax_module.cache_clear()
    monkeypatch.setitem(sys.modules, "tokamax", None)          # not importable
    with pytest.raises(RuntimeError, match="needs the optional `tokamax` package"):
        grouped_matmul(lhs, rhs, gs, implementation="tokamax")
    assert not gmm_api.tokamax_available()
    calls = []

    def fake_ragged_dot(lhs, rhs, group_sizes, preferred_element_type=None, implementation=None):
        calls.append(implementation)
        return jax.lax.ragged_dot(lhs, rhs, group_sizes,
                                  preferred_element_type=preferred_element_type)

    gmm_api.tokamax_module.cache_clear()
    monkeypatch.setitem(sys.modules, "tokamax", types.SimpleNamespace(ragged_dot=fake_ragged_dot))
    try:
        out = grouped_matmul(lhs, rhs, gs, implementation="tokamax")
        assert calls == ["xla"]                                  # the CPU choice, explicit
        assert_close("tokamax", out, grouped_matmul(lhs, rhs, gs, implementation="reference"),
                     1e-6)
    finally:
        gmm_api.tokamax_module.cache_clear()
