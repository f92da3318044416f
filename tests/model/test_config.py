"""Config resolution: the published schedules, the scan grouping, and errors naming the field."""
import pytest

from configs import model_presets
from sparse_lm.config import ConfigError, ModelConfig, schedule_from_ratios

FLASH_RATIOS = [0, 0] + [4, 128] * 20 + [4] + [0]
PRO_RATIOS = [128, 128] + [4, 128] * 29 + [4] + [0]


def test_published_compress_ratios_are_derived_from_the_pattern():
    flash = ModelConfig.from_dict(model_presets.v4_flash())
    pro = ModelConfig.from_dict(model_presets.v4_pro())
    assert list(flash.compress_ratios) == FLASH_RATIOS
    assert list(pro.compress_ratios) == PRO_RATIOS


def test_schedule_pattern_recovered_from_ratio_list():
    prefix, cycle, tail = schedule_from_ratios(PRO_RATIOS[:-1])
    cfg = ModelConfig(num_layers=61, layer_prefix=prefix, layer_cycle=cycle, layer_tail=tail)
    assert list(cfg.compress_ratios) == PRO_RATIOS


def test_flash_layer_groups_scan_the_cycle_after_the_hash_layers():
    g = ModelConfig.from_dict(model_presets.v4_flash()).layer_groups
    assert [l.index for l in g.head] == [0, 1, 2, 3]
    assert [l.routing for l in g.head] == ["hash", "hash", "hash", "score"]
    assert [l.kind for l in g.cycle] == ["csa", "hca"] and g.num_cycles == 19
    assert [l.index for l in g.tail] == [42]
    assert all(l.routing == "score" for l in g.cycle)


@pytest.mark.parametrize("layers", [4, 5, 9, 43])
def test_any_layer_count_resolves(layers):
    cfg = ModelConfig.from_dict(model_presets.v4_flash()).replace(num_layers=layers)
    g = cfg.layer_groups
    n = len(g.head) + g.num_cycles * len(g.cycle) + len(g.tail)
    assert n == layers == len(cfg.compress_ratios) - 1
    assert cfg.layer_kinds[:2] == ("swa", "swa") and cfg.layer_kinds[-1] == "csa"


@pytest.mark.parametrize("field,value,needle", [
    ("layer_cycle", ("csa", "mla"), "layer kinds must be one of"),
    ("o_groups", 3, "must divide num_heads"),
    ("index_topk", 0, "index_topk"),
    ("rope_head_dim", 1024, "rope_head_dim"),
    ("num_layers", 2, "num_layers"),
    ("attention_impl", "flash", "allowed values"),
    ("n_shared_experts", 2, "allowed values: 0, 1"),
    ("compress_ratio_hca", 1, "compress_ratio_hca"),
])
def test_bad_config_names_field_and_allowed_values(field, value, needle):
    with pytest.raises(ConfigError) as e:
        ModelConfig.from_dict(model_presets.v4_flash()).replace(**{field: value})
    assert field in str(e.value) and needle in str(e.value)


def test_unknown_and_derived_fields_are_rejected():
    d = model_presets.v4_flash().to_dict()
    with pytest.raises(ConfigError, match="unknown model config field"):
        ModelConfig.from_dict({**d, "hiden_size": 3})
    with pytest.raises(ConfigError, match="compress_ratios is derived"):
        ModelConfig.from_dict({**d, "compress_ratios": FLASH_RATIOS})
