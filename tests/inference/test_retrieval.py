"""Needle retrieval through the cached decoder (issue 24's grid), and its training data.

Specifications checked:
  * `score_answer`: the value itself is exact with every digit right; one wrong digit is not
    exact and scores 5/6; a wrong length is refused;
  * `ask_needles` end to end on a tiny random model and a short prefix: a needle whose planted
    value is what the model decodes is scored correct, one with a digit changed wrong, and
    asking leaves the prefix's cache untouched (the same answer twice, the cache's arrays
    unchanged);
  * multi-needle examples: every needle present with a distinct key, the question asks one of
    them and the answer is that needle's value; one needle draws exactly as before;
  * the data settings are refused with the field named (filler, needles on another task).
"""
import jax
import ml_collections
import numpy as np
import pytest

from sparse_lm.data import pipeline, synthetic
from sparse_lm.data.tfds_source import DataError
from sparse_lm.inference import Decoder
from sparse_lm.inference.retrieval import ask_needles, question, score_answer, summarize
from sparse_lm.model import build_model
from tests.conftest import tiny_config


def test_score_answer_planted_right_and_wrong():
    right = score_answer(list(b"123456"), "123456")
    assert right["exact"] and right["digits"] == 1.0 and right["decoded"] == "123456"
    wrong = score_answer(list(b"123450"), "123456")
    assert not wrong["exact"] and wrong["digits"] == pytest.approx(5 / 6)
    with pytest.raises(ValueError, match="6-byte value"):
        score_answer(list(b"12345"), "123456")


def test_ask_needles_scores_planted_answers_and_keeps_the_prefix_cache():
    cfg = tiny_config(mtp_depth=0, num_layers=3, num_hash_layers=1)
    dec = Decoder(build_model(cfg, seed=0))
    rng = np.random.default_rng(0)
    prefix = rng.integers(97, 123, 300).astype(np.int32)
    prefix[100:120] = np.frombuffer(b"\n# key abcd = 314159", np.uint8)
    _, cache = dec.prefill(dec.init_cache(1, 340), [prefix], chunk_size=64)
    before = [np.asarray(x) for x in jax.tree.leaves(cache)]
    probe = ask_needles(dec, cache, [{"key": "abcd", "value": "000000", "depth": 0.3}])[0]
    planted = probe["decoded"]                      # what this random model answers
    wrong = ("1" if planted[0] != "1" else "2") + planted[1:]
    rows = ask_needles(dec, cache, [{"key": "abcd", "value": planted, "depth": 0.3},
                                    {"key": "abcd", "value": wrong, "depth": 0.3}])
    assert rows[0]["exact"] and rows[0]["digits"] == 1.0 and rows[0]["depth"] == 0.3
    assert not rows[1]["exact"] and rows[1]["digits"] == pytest.approx(5 / 6)
    assert summarize(rows) == {"exact": 0.5, "digits": pytest.approx((1 + 5 / 6) / 2)}
    for a, b in zip(before, jax.tree.leaves(cache)):
        np.testing.assert_array_equal(a, np.asarray(b))
    assert list(question("abcd")) == list(b"\n# key abcd = ")


def test_multi_needle_example_asks_one_of_its_needles():
    for i in range(5):
        toks, mask, start = synthetic.needle_example(np.random.default_rng(i), 400, needles=3)
        text = bytes(toks.astype(np.uint8).tolist())
        assert len(toks) == 400 and mask.sum() == 6
        found = dict(line[6:].split(b" = ") for line in text.split(b"\n")
                     if line.startswith(b"# key ") and len(line) == 19)
        assert len(found) == 3                      # three needles, distinct keys
        key = text[-13:-9]                          # "\n# key KEY = 123456" ends it
        assert text[-6:] == found[key]             # the answer is the asked needle's value
        assert text[start:start + 7] == b"\n# key " and text[start + 7:start + 11] == key
    one = synthetic.make_examples("needle", 4, 200, seed=3)
    assert np.array_equal(one["tokens"], synthetic.make_examples("needle", 4, 200, seed=3,
                                                                 needles=1)["tokens"])


@pytest.mark.parametrize("fields, name", [
    (dict(synthetic_filler="prose"), "data.synthetic_filler"),
    (dict(source="synthetic:recall", synthetic_needles=2), "data.synthetic_needles"),
    (dict(source="synthetic:recall", synthetic_filler="stdlib"), "data.synthetic_filler")])
def test_bad_needle_data_settings_name_the_field(fields, name):
    d = ml_collections.ConfigDict(dict(source="synthetic:needle", synthetic_docs=10,
                                       synthetic_length=100, synthetic_needles=1,
                                       synthetic_filler="words", seed=0, train_split="train"))
    d.update(fields)
    with pytest.raises(DataError, match=name):
        pipeline.make_source(d, "train")


def test_needle_lc_configs_are_lc_small_and_its_dense_twin():
    from configs import needle_lc, needle_lc_dense
    from sparse_lm import presets
    from sparse_lm.config import ModelConfig
    from sparse_lm.train.loop import DATA_POSITION_FIELDS
    s, d = needle_lc.get_config(), needle_lc_dense.get_config()
    assert ModelConfig.from_dict(s.model) == ModelConfig.from_dict(presets.lc_small())
    dense = ModelConfig.from_dict(d.model)
    assert set(dense.layer_kinds) == {"swa"} and dense.sliding_window == s.train.seq_len
    assert dense.replace(layer_cycle=("csa", "hca"), sliding_window=128) == \
        ModelConfig.from_dict(s.model)
    assert s.data.synthetic_length == s.train.seq_len + 1       # one example per packed row
    assert s.data.to_dict() == d.data.to_dict() and s.schedule.to_dict() == d.schedule.to_dict()
    assert {"data.synthetic_needles", "data.synthetic_filler"} <= set(DATA_POSITION_FIELDS)
