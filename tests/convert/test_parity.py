"""Logit parity with transformers 5.23.0 `DeepseekV4ForCausalLM` (fp32 on both sides).

The reference data (tests/parity_data/<case>/: config.json, model.safetensors, io.npz with
transformers' logits) are tiny random models in which every parameter and buffer is random
(sinks, position biases, mHC statics, tid2eid, e_score_correction_bias), see
tools/parity/NOTES.md. Regenerate them with `make parity-refresh`.

What each case covers (meta.json has the details):
* flash_like: SWA, SWA, CSA, HCA, CSA; hash routing in layers 0-2; S=299 (2 HCA entries);
  index_topk=16 < visible entries with 16 indexer heads (the indexer really selects).
* pro_like: HCA first (HCA, HCA, CSA, HCA), score routing only; S=270; two scanned cycles here.
* topk_covers_all: index_topk=64 >= the 37 entries; non-default eps and Sinkhorn count.
* small_window: sliding_window=16 smaller than the HCA ratio.

Where transformers departs from the spec (spec §14): its default layer schedule (when a config
has neither layer_types nor compress_ratios) is one layer off from the Pro one; every case here
states layer_types explicitly, so both sides run the spec's schedule, and `from_hf_config`
reproduces transformers' default when asked (test_hf_config). No other departure affects these
cases: transformers clamps the shared expert as the spec does, keeps YaRN to the compressed
table and uses no fake quantisation, exactly like our model.

The relative error is max|ours - transformers| / max|transformers| over all logits.
"""
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparse_lm.convert import load_hf

DATA = Path(__file__).resolve().parents[1] / "parity_data"
CASES = ["flash_like", "pro_like", "topk_covers_all", "small_window"]
TOLERANCE = 1e-4


@pytest.mark.parametrize("case", CASES)
def test_logits_match_transformers(case):
    model, cfg = load_hf(DATA / case, dtype=jnp.float32, progress=False)
    assert cfg.mtp_depth == 0          # transformers checkpoints carry no MTP weights
    io = np.load(DATA / case / "io.npz")
    ref = io["logits"]
    # One jitted forward: compiling the whole model is faster here than op-by-op eager dispatch.
    logits = np.asarray(jax.jit(lambda m, ids: m(ids))(model, jnp.asarray(io["input_ids"])))
    assert logits.shape == ref.shape
    rel = np.abs(logits - ref).max() / np.abs(ref).max()
    print(f"{case}: max relative logit error {rel:.2e}")
    assert rel <= TOLERANCE, f"{case}: max relative logit error {rel:.3e} > {TOLERANCE}"
