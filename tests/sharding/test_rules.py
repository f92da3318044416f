"""Sharding specifications that need no devices: mesh sizes, rule resolution, presets, golden
PartitionSpec dumps, the replicated-bytes bound, topology names and bad-input errors."""
from __future__ import annotations

import json

import pytest
from jax.sharding import PartitionSpec as P

from sparse_lm.sharding import partition
from sparse_lm.sharding.mesh import AXES, ShardingError, resolve_axis_sizes
from sparse_lm.sharding.presets import PRESETS, load_preset
from sparse_lm.sharding.rules import normalize_rules, spec_for
from sparse_lm.aot.topology import TOPOLOGIES, resolve_topology
from tests.sharding import golden_specs

SIZES = {"data": 1, "fsdp": 4, "tensor": 2, "expert": 1, "context": 1}


# ----------------------------------------------------------------------------- mesh sizes
def test_fill_axis_takes_the_remaining_devices():
    assert resolve_axis_sizes({"fsdp": -1, "tensor": 4}, 64) == dict(
        data=1, fsdp=16, tensor=4, expert=1, context=1)
    assert list(resolve_axis_sizes({}, 1)) == list(AXES)


@pytest.mark.parametrize("sizes,devices,needle", [
    ({"fsdp": -1, "tensor": 3}, 8, "divisors [1, 2, 4, 8]"),        # does not divide
    ({"fsdp": 2, "tensor": 2}, 8, "multiply to 4"),                  # too few, no fill
    ({"fsdp": 0}, 8, "divisors of the 8 devices: [1, 2, 4, 8]"),     # size 0
    ({"fsdp": -1, "data": -1}, 8, "at most one axis may be -1"),     # two fills
    ({"fsdp": -2}, 8, "integer >= 1, or -1"),
    ({"pipeline": 2}, 8, "valid axes: ['data', 'fsdp', 'tensor', 'expert', 'context']"),
])
def test_bad_mesh_sizes_name_the_valid_choices(sizes, devices, needle):
    with pytest.raises(ShardingError) as e:
        resolve_axis_sizes(sizes, devices)
    assert needle in str(e.value)


def test_preset_whose_axes_do_not_divide_the_devices():
    preset = load_preset("fsdp_tp:tensor=3")
    with pytest.raises(ShardingError, match=r"divisors \[1, 2, 4, 8\]"):
        resolve_axis_sizes(preset.ici, 8)


# ----------------------------------------------------------------------------- rule resolution
def test_axes_are_used_once_and_preferences_resolve_in_passes():
    rules = normalize_rules([("exp", ("fsdp", "tensor")), ("embed", ("fsdp", "tensor")),
                             ("mlp", ("tensor", "fsdp"))])
    # exp takes fsdp, mlp keeps its first choice tensor; embed's choices are both taken.
    assert spec_for(("exp", "embed", "mlp"), (8, 16, 32), SIZES, rules) == P("fsdp", None, "tensor")
    # Alone, embed takes both axes in preference order.
    assert spec_for(("embed", None), (16, 3), SIZES, rules) == P(("fsdp", "tensor"))


def test_axes_that_do_not_divide_are_skipped_and_noted():
    rules = normalize_rules([("heads", ("tensor", "fsdp"))])
    notes = []
    assert spec_for(("heads",), (6,), SIZES, rules, notes) == P("tensor")      # 6 % (2*4) != 0
    assert notes and "not sharded over fsdp" in notes[0]
    assert spec_for(("heads",), (5,), SIZES, rules) == P()


def test_size_one_axes_and_unruled_names_shard_nothing():
    rules = normalize_rules([("embed", ("expert",))])
    assert spec_for(("embed", "mlp", None), (8, 8, 8), SIZES, rules) == P()


@pytest.mark.parametrize("rules,needle", [
    ([("embd", "fsdp")], "unknown name 'embd'"),
    ([("embed", "fdsp")], "unknown mesh axis 'fdsp'"),
    ([("embed", "fsdp"), ("embed", "tensor")], "two rules"),
])
def test_bad_rules(rules, needle):
    with pytest.raises(ShardingError, match=needle):
        normalize_rules(rules)


def test_unknown_logical_name_in_an_array_is_an_error():
    with pytest.raises(ShardingError, match="unknown logical axis name 'activation_btach'"):
        spec_for(("activation_btach",), (4,), SIZES, ())


# ----------------------------------------------------------------------------- presets
def test_every_named_preset_loads_and_has_its_config_file():
    for name in PRESETS:
        p = load_preset(name)
        assert p.name == name and p.description
        assert set(p.ici) == set(AXES)


def test_preset_overrides_and_errors():
    p = load_preset("fsdp_ep:expert=16,moe_dispatch=a2a_padded")
    assert p.ici["expert"] == 16 and p.moe_dispatch == "a2a_padded"
    with pytest.raises(ShardingError, match="valid presets: .*'fsdp_tp'"):
        load_preset("fsdp_pt")
    with pytest.raises(ShardingError, match="override 'tensr' is unknown"):
        load_preset("fsdp_tp:tensr=2")
    with pytest.raises(ShardingError, match="moe_dispatch='bogus' is invalid"):
        load_preset("fsdp_ep:moe_dispatch=bogus")


def test_preset_from_a_file_path():
    assert load_preset("configs/sharding/cp.py:context=2").ici["context"] == 2


# ----------------------------------------------------------------------------- golden dumps
@pytest.mark.parametrize("model,devices", golden_specs.CASES)
@pytest.mark.parametrize("preset", PRESETS)
def test_partition_specs_match_the_golden_dump(preset, model, devices):
    path = golden_specs.path(preset, model, devices)
    want = json.loads(path.read_text())
    got = golden_specs.dump(preset, model, devices)
    changed = {k: (want["specs"].get(k), v) for k, v in got["specs"].items()
               if want["specs"].get(k) != v}
    missing = sorted(set(want["specs"]) - set(got["specs"]))
    assert got["mesh"] == want["mesh"] and not changed and not missing, (
        f"{path.name}: {len(changed)} changed, {len(missing)} missing, e.g. "
        f"{list(changed.items())[:3]} {missing[:3]}. If intended, regenerate with "
        f"`python -m tests.sharding.golden_specs` and review the diff.")


@pytest.mark.parametrize("model,devices", golden_specs.CASES)
@pytest.mark.parametrize("preset", [p for p in PRESETS if p != "dp"])
def test_at_most_two_percent_of_parameter_bytes_replicated_where_the_preset_shards(
        preset, model, devices):
    p = load_preset(preset)
    sizes = resolve_axis_sizes(p.ici, devices)
    rep = partition.replication_report(golden_specs.abstract_params(model), sizes, p.rules)
    assert rep["replicated_fraction"] <= 0.02, rep["replicated"][:5]
    # ...and the per-device parameter bytes are within 10% of a perfect split.
    assert rep["per_device_bytes"] <= 1.1 * rep["ideal_per_device_bytes"]


def test_dp_replicates_everything():
    p = load_preset("dp")
    sizes = resolve_axis_sizes(p.ici, 8)
    rep = partition.replication_report(golden_specs.abstract_params("tiny"), sizes, p.rules)
    assert rep["per_device_bytes"] == rep["total_bytes"]


# ----------------------------------------------------------------------------- topologies
@pytest.mark.parametrize("name,topo,chips", [("v5p-128", "v5p:4x4x4", 64),
                                              ("v6e-256", "v6e:16x16", 256),
                                              ("v5e-8", "v5e:2x4", 8), ("v4-8", "v4:2x2x1", 4)])
def test_cloud_tpu_names_map_to_topologies(name, topo, chips):
    t = resolve_topology(name)
    assert (t.topology, t.chips, t.slices) == (topo, chips, 1)


def test_multi_slice_names_and_raw_topologies():
    assert resolve_topology("v5p-128x2").slices == 2
    assert resolve_topology("v5e:2x2").chips == 4


@pytest.mark.parametrize("bad", ["v5p-100", "v7-8", "tpu", "v5e:2"])
def test_unknown_topology_lists_the_valid_names(bad):
    with pytest.raises(ShardingError) as e:
        resolve_topology(bad)
    assert "v5p-128" in str(e.value) and "v6e-256" in str(e.value)
    assert len(TOPOLOGIES) > 20
