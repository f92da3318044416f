"""Checkpoints written by transformers' own `save_pretrained` load, in every naming scheme.

Fixtures (tools/parity/make_saved_checkpoints.py, transformers 5.23.0): the small_window
reference model (HCA, CSA, SWA layers; hash and score routing) saved by transformers
* freshly built (`saved_fresh`: release-style names under model.layers.*, head.weight,
  per-expert w1/w2/w3; four shards with transformers' index file), and
* loaded with from_pretrained, then saved (`saved_reloaded`: state-dict names except the KV
  norms, `self_attn.norm.weight` etc.).
Each must be detected as its scheme and give small_window's reference logits (io.npz), and the
state must equal the one loaded from the state-dict-named reference bit for bit. Mixed or
unknown names are errors that list the unmatched tensors and every scheme tried.
"""
import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from sparse_lm.convert import core
from sparse_lm.convert.mapping import SCHEMES, detect_scheme
from sparse_lm.convert.safetensors_io import CheckpointError

DATA = Path(__file__).resolve().parents[1] / "parity_data"
REF = DATA / "small_window"
TOLERANCE = 1e-4
CASES = {"saved_fresh": "transformers-saved", "saved_reloaded": "transformers-resaved",
         "small_window": "transformers"}


@pytest.fixture(scope="module")
def reference():
    model, cfg = core.load_hf(REF, dtype=jnp.float32, progress=False)
    return model, cfg, nnx.to_pure_dict(nnx.state(model))


def _flat(pure):
    return dict(nnx.traversals.flatten_mapping(pure))


@pytest.mark.parametrize("case", sorted(CASES))
def test_scheme_is_detected_from_the_names(case):
    report = core.check_hf(DATA / case)
    assert report.scheme == CASES[case]
    assert report.skipped == []
    names = json.load(open(DATA / case / "names.json")) if case != "small_window" else None
    if names is not None:      # the names transformers wrote, as listed next to the fixture
        assert detect_scheme(names).scheme.name == CASES[case]


@pytest.mark.parametrize("case", ["saved_fresh", "saved_reloaded"])
def test_transformers_saved_checkpoint_gives_the_reference_logits(case, reference):
    ref_model, ref_cfg, ref_pure = reference
    model, cfg = core.load_hf(DATA / case, dtype=jnp.float32, progress=False)
    assert core.config_differences(cfg, ref_cfg) == []
    a, b = _flat(nnx.to_pure_dict(nnx.state(model))), _flat(ref_pure)
    assert a.keys() == b.keys()
    for k in a:
        assert np.asarray(a[k]).tobytes() == np.asarray(b[k]).tobytes(), k
    io = np.load(REF / "io.npz")
    logits = np.asarray(jax.jit(lambda m, i: m(i))(model, jnp.asarray(io["input_ids"])))
    rel = np.abs(logits - io["logits"]).max() / np.abs(io["logits"]).max()
    print(f"{case}: max relative logit error {rel:.2e}")
    assert rel <= TOLERANCE


def test_short_inputs_match_transformers(reference):
    """S = 1, 2, 3, 5 (< CSA ratio, HCA ratio, window): transformers' logits (short_inputs.npz)."""
    model = reference[0]
    short = np.load(REF / "short_inputs.npz")
    fwd = jax.jit(lambda m, i: m(i))
    for s in (1, 2, 3, 5):
        ref = short[f"logits_s{s}"]
        got = np.asarray(fwd(model, jnp.asarray(short[f"input_ids_s{s}"])))
        assert got.shape == ref.shape
        rel = np.abs(got - ref).max() / np.abs(ref).max()
        print(f"S={s}: max relative logit error {rel:.2e}")
        assert rel <= TOLERANCE, (s, rel)


def _copy_with(tmp_path, src, rename):
    dst = tmp_path / "ckpt"
    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    tensors = load_file(str(src / "model.safetensors"))
    save_file({rename(k): v for k, v in tensors.items()}, str(dst / "model.safetensors"))
    return dst


def test_mixed_schemes_are_an_error_naming_the_tensors_and_schemes(tmp_path):
    # small_window with its layer-2 KV norm in the re-saved spelling: two schemes in one file.
    d = _copy_with(tmp_path, REF, lambda k: k.replace("layers.2.self_attn.kv_norm.",
                                                      "layers.2.self_attn.norm."))
    with pytest.raises(CheckpointError) as e:
        core.check_hf(d)
    msg = str(e.value)
    assert "mixes naming schemes" in msg and "model.layers.2.self_attn.norm.weight" in msg
    for s in SCHEMES:
        assert s.name in msg


def test_unknown_scheme_is_an_error_listing_every_scheme_tried(tmp_path):
    d = _copy_with(tmp_path, REF, lambda k: "backbone." + k)
    with pytest.raises(CheckpointError, match="fit no known naming scheme") as e:
        core.check_hf(d)
    for s in SCHEMES:
        assert f"{s.name}: " in str(e.value)
    assert "'backbone." in str(e.value)


def test_unused_tensors_load_only_when_asked_and_are_reported(tmp_path, reference, caplog):
    extra = ["model.layers.0.self_attn.rotary_extra", "mtp.1.self_attn.q_a_proj.weight"]
    d = _copy_with(tmp_path, REF, lambda k: k)
    tensors = load_file(str(d / "model.safetensors"))
    tensors.update({n: np.ones((2, 2), np.float32) for n in extra})
    save_file(tensors, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match="unknown tensor.*skip_unused"):
        core.load_hf(d, progress=False)
    assert core.check_hf(d, skip_unused=True).skipped == sorted(extra)
    with caplog.at_level("WARNING"):
        model, _ = core.load_hf(d, dtype=jnp.float32, progress=False, skip_unused=True)
    assert all(n in caplog.text for n in extra)
    a, b = _flat(nnx.to_pure_dict(nnx.state(model))), _flat(reference[2])
    assert a.keys() == b.keys()
    assert all(np.asarray(a[k]).tobytes() == np.asarray(b[k]).tobytes() for k in a)
