"""Activation constraints are a no-op outside a rules context and follow the rules inside it;
the model config validates the dispatcher fields; meshes use Auto axes and the ICI x DCN split."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AxisType, PartitionSpec as P

from sparse_lm.config import ConfigError
from sparse_lm.sharding import constraints
from sparse_lm.sharding.mesh import make_mesh
from sparse_lm.sharding.presets import load_preset
from tests.conftest import tiny_config
from tests.sharding.helpers import has_libtpu, run_worker


def test_constrain_is_identity_without_rules():
    x = jnp.ones((2, 4, 8))
    assert constraints.constrain(x, ("activation_batch", "activation_length", "activation_embed")) is x
    assert constraints.spec(("activation_batch",)) is None


def test_constrain_follows_the_active_rules():
    preset = load_preset("cp")
    mesh = make_mesh({}, devices=jax.devices()[:1])
    with constraints.use_rules(mesh, preset.rules):
        assert constraints.active().mesh is mesh
        assert constraints.spec(("activation_batch", "activation_length")) == P()   # all size 1
        lowered = jax.jit(lambda x: constraints.constrain(x, ("activation_batch", None)) * 2).lower(
            jnp.ones((2, 3)))
        assert "sharding" in lowered.as_text()
        with pytest.raises(ValueError, match="2 logical names"):
            constraints.constrain(jnp.ones((2, 3, 4)), ("activation_batch", None))
    assert constraints.active() is None


def test_meshes_have_auto_axes():
    mesh = make_mesh({"fsdp": -1})
    assert all(t == AxisType.Auto for t in mesh.axis_types)


def test_moe_dispatch_config_validation():
    assert tiny_config().moe_dispatch == "local"
    with pytest.raises(ConfigError, match="allowed values: \\('local', 'a2a_padded', 'ragged_a2a'\\)"):
        tiny_config(moe_dispatch="alltoall")
    with pytest.raises(ConfigError, match="moe_capacity_factor"):
        tiny_config(moe_capacity_factor=-1.0)


def test_two_slices_put_the_dcn_factor_on_the_outer_axis():
    r = run_worker("mesh_slices", devices=8, timeout=300)
    assert r["shape"] == {"data": 2, "fsdp": 4, "tensor": 1, "expert": 1, "context": 1}
    assert r["slice_of_data_row"] == [[1], [0]] or r["slice_of_data_row"] == [[0], [1]]
    assert all(t.endswith("Auto") for t in r["axis_types"])


@pytest.mark.skipif(not has_libtpu(), reason="libtpu not installed: no TPU topologies")
def test_two_tpu_slices_split_on_the_dcn_axis():
    r = run_worker("tpu_multislice_mesh", {"topology": "v5e-4x2"}, devices=1, timeout=300)
    assert r["shape"] == {"data": 2, "fsdp": 4, "tensor": 1, "expert": 1, "context": 1}
    assert r["slices_per_data_row"] == [[0], [1]]


def test_collectives_across_slices_are_priced_on_dcn():
    from types import SimpleNamespace

    from sparse_lm.aot.topology import CHIPS, DCN_BW_PER_CHIP, collective_seconds
    devs = [SimpleNamespace(id=i, coords=(i % 2, i // 2 % 2, 0), slice_index=i // 4)
            for i in range(8)]
    chip = CHIPS["v5e"]
    t_ici, link = collective_seconds("all-gather", 1e9, [0, 1, 2, 3], 4, devs, chip)
    assert link == "ici" and t_ici == pytest.approx(1e9 * 3 / 4 / (2 * chip.ici_link_bw * 2))
    t_dcn, link = collective_seconds("all-gather", 1e9, [0, 4], 2, devs, chip)
    assert link == "dcn" and t_dcn == pytest.approx(1e9 / 2 / DCN_BW_PER_CHIP)
    assert collective_seconds("all-reduce", 1e9, [0, 1], 2, devs, chip)[0] == pytest.approx(
        2 * collective_seconds("all-gather", 1e9, [0, 1], 2, devs, chip)[0])


def test_muon_orthogonalizes_whole_matrices_per_device_with_the_same_result():
    """map_over_devices: Newton-Schulz under an 8-device mesh gives the one-device update, keeps
    the parameters' layout, and needs no all-reduce (each device owns whole matrices)."""
    r = run_worker("muon_spread", timeout=600)
    assert r["max_abs_diff"] < 1e-5, r
    assert r["all_reduces"] == 0, r
    assert r["out_specs"] == {"stack": str(P(None, None, "fsdp")),
                              "experts": str(P(None, "expert", None, "fsdp"))}


def test_map_over_devices_is_fn_without_rules():
    x = jnp.arange(12.0).reshape(3, 2, 2)
    assert (constraints.map_over_devices(lambda a: a * 2, x) == x * 2).all()
