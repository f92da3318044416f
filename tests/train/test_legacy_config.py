"""Configs written by older runs (config.json with train.implementation / train.compute_dtype)
still resolve: the old keys map onto model.attention_impl / model.dtype with one warning each."""
from __future__ import annotations

import json
import warnings

import jax
import ml_collections
import pytest

from sparse_lm.train.defaults import base
from sparse_lm.train.loop import resolve_model_config


def _old_run_config(**train):
    """A config as an older run's config.json holds it (plain JSON, no placeholders)."""
    c = json.loads(base().to_json_best_effort())
    c["train"].update(train)
    return ml_collections.ConfigDict(c)


def test_base_has_one_knob_per_choice():
    t = base().train
    assert "implementation" not in t and "compute_dtype" not in t
    cfg = resolve_model_config(base())
    assert cfg.attention_impl is None and cfg.dtype == "float32" and cfg.param_dtype == "float32"


def test_old_keys_map_onto_the_model_config():
    with pytest.warns(FutureWarning) as caught:
        cfg = resolve_model_config(_old_run_config(implementation="xla", compute_dtype="model"))
    assert [str(w.message).split()[0] for w in caught] == ["train.implementation", "train.compute_dtype"]
    assert cfg.attention_impl == "xla" and cfg.dtype == "float32"
    with pytest.warns(FutureWarning, match="train.compute_dtype is deprecated"):
        cfg = resolve_model_config(_old_run_config(compute_dtype="bfloat16"))
    assert cfg.dtype == "bfloat16"


def test_old_defaults_resolve_as_before():
    """The old defaults ("" and "auto") keep what they meant: the model's implementation, and
    float32 on CPU (bfloat16 on accelerators)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cfg = resolve_model_config(_old_run_config(implementation="", compute_dtype="auto"))
    assert len(caught) == 2 and all(w.category is FutureWarning for w in caught)
    assert cfg.attention_impl is None
    assert cfg.dtype == ("float32" if jax.default_backend() == "cpu" else "bfloat16")
