"""The released tensor layouts validate: V4-Flash and V4-Pro inventories (names, dtypes, shapes).

tests/convert/release_inventories/{v4_flash,v4_pro}.json are derived from the spec (§2-§10,
§14a.10) by tools/parity/make_release_inventories.py, not read from the releases' index files
(see docs/hf_weights.md). `check_inventory` runs load_hf's own validation (naming scheme, every
tensor present with its shape, FP8/FP4 scale grids, nothing left over) on names and shapes only:
no array is allocated. Tensors the model does not use (a later release's extra MTP / drafter
blocks) are an error unless skip_unused, and then every one is reported.
"""
import importlib.util
import json
import math
from pathlib import Path

import pytest

from sparse_lm.convert import core
from sparse_lm.convert.safetensors_io import CheckpointError

ROOT = Path(__file__).resolve().parents[2]
INV = Path(__file__).resolve().parent / "release_inventories"
_spec = importlib.util.spec_from_file_location(
    "make_release_inventories", ROOT / "tools" / "parity" / "make_release_inventories.py")
gen = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gen)

# Spec §2.1: layer counts; derived parameter totals (without MTP, and for Pro with MTP), in 1e9.
EXPECT = {
    "v4_flash": dict(layers=43, kinds={"swa": 2, "csa": 21, "hca": 20}, experts=256,
                     params_no_mtp=284.3, params=None),
    "v4_pro": dict(layers=61, kinds={"swa": 0, "csa": 30, "hca": 31}, experts=384,
                   params_no_mtp=1573.0, params=1599.0),
}


def _load(key):
    doc = json.loads((INV / f"{key}.json").read_text())
    return doc, gen.expand(doc["tensors"])


@pytest.mark.parametrize("key", sorted(EXPECT))
def test_committed_inventory_is_what_the_script_derives(key):
    assert (INV / f"{key}.json").read_text() == gen.dumps(gen.document(key))


@pytest.mark.parametrize("key", sorted(EXPECT))
def test_release_inventory_validates(key):
    doc, inv = _load(key)
    want = EXPECT[key]
    report = core.check_inventory(inv, doc["config"], label=key)
    cfg = report.config
    assert report.scheme == "official" and report.skipped == [] and report.tensors == len(inv)
    assert cfg.num_layers == want["layers"] and cfg.mtp_depth == 1
    assert cfg.n_routed_experts == want["experts"]
    kinds = list(cfg.layer_kinds)
    assert {k: kinds.count(k) for k in ("swa", "csa", "hca")} == want["kinds"]
    _, _, flat = core.abstract_model(cfg)
    total = sum(math.prod(v.shape) for v in flat.values()) / 1e9
    mtp = sum(math.prod(v.shape) for p, v in flat.items() if p[0] == "mtp") / 1e9
    print(f"{key}: {len(inv)} tensors, {total - mtp:.1f}B params without MTP, {total:.1f}B with")
    assert abs((total - mtp) - want["params_no_mtp"]) / want["params_no_mtp"] < 5e-4
    if want["params"]:
        assert abs(total - want["params"]) / want["params"] < 5e-4


def test_a_broken_inventory_is_rejected_naming_the_tensor():
    doc, inv = _load("v4_flash")
    bad = dict(inv)
    bad["layers.5.attn.wq_a.scale"] = ("F8_E8M0", (8, 33))
    with pytest.raises(CheckpointError, match=r"layers.5.attn.wq_a.scale: scale grid"):
        core.check_inventory(bad, doc["config"])
    bad = dict(inv)
    del bad["layers.7.ffn.experts.100.w3.weight"], bad["layers.7.ffn.experts.100.w3.scale"]
    with pytest.raises(CheckpointError, match=r"missing tensor layers.7.ffn.experts.100.w3"):
        core.check_inventory(bad, doc["config"])
    bad = dict(inv)
    bad["layers.9.attn.wkv.weight"] = ("F8_E4M3", (512, 4096 + 128))
    bad["layers.9.attn.wkv.scale"] = ("F8_E8M0", (4, 33))
    with pytest.raises(CheckpointError, match=r"model.layers.9.self_attn.kv_proj.weight.*has "
                                              r"shape \(512, 4224\), expected \(512, 4096\)"):
        core.check_inventory(bad, doc["config"])


def test_extra_mtp_and_drafter_tensors_are_reported_and_skipped_only_when_asked():
    """A later release with a second MTP block and drafter tensors (hypothetical names: no
    public source gives a later release's names) still loads its depth-1 model, but only with
    skip_unused, and every extra tensor is reported."""
    doc, inv = _load("v4_flash")
    extra = {n.replace("mtp.0.", "mtp.1.", 1): v for n, v in inv.items() if n.startswith("mtp.0.")}
    extra["mtp.0.drafter.proj.weight"] = ("BF16", (4096, 4096))
    extra["mtp.1.drafter.proj.weight"] = ("BF16", (4096, 4096))
    later = {**inv, **extra}
    with pytest.raises(CheckpointError, match=r"unknown tensor\(s\).*skip_unused") as e:
        core.check_inventory(later, doc["config"])
    assert "mtp.0.drafter.proj.weight" in str(e.value)
    report = core.check_inventory(later, doc["config"], skip_unused=True)
    assert report.config.mtp_depth == 1
    assert report.skipped == sorted(extra)
