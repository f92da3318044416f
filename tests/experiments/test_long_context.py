"""experiments.long_context: bad settings are one clear error each, before any compute; the
prompt has the requested length with every needle where it says; the dense arm's decode on a
filled full-context cache runs its steps on top of the held rows."""
import types

import numpy as np
import pytest

from experiments import long_context as lc
from sparse_lm.train.config_check import UserError


def _args(**kw):
    base = dict(workdir="/tmp/w", model="lc_small", arms="sparse,dense", chunk=1024,
                dense_chunk=256, decode_tokens=32, part_positions=5, dense_budget_s=900.0,
                context=1 << 20, depths="0.1,0.5,0.9")
    return types.SimpleNamespace(**(base | kw))


@pytest.mark.parametrize("kw, flag", [
    (dict(workdir=None), "--workdir"), (dict(model="big"), "--model"),
    (dict(arms="sparse,moe"), "--arms"), (dict(chunk=0), "--chunk"),
    (dict(part_positions=1), "--part-positions"), (dict(dense_budget_s=0), "--dense-budget-s"),
    (dict(context=1000), "--context"), (dict(context=(1 << 20) + 1), "max_context"),
    (dict(depths="0.5,x"), "--depths"), (dict(depths="1.5"), "--depths")])
def test_bad_settings_name_the_flag(kw, flag):
    with pytest.raises(UserError, match=flag):
        lc.check_args(_args(**kw))


def test_prompt_has_the_length_and_the_needles():
    tokens, needles = lc.build_prompt(5000, [0.0, 0.5, 1.0], seed=1)
    assert tokens.shape == (5000,) and tokens.dtype == np.int32
    text = bytes(tokens.astype(np.uint8).tolist())
    for n in needles:
        needle = f"\n# key {n['key']} = {n['value']}\n".encode()
        assert text[n["position"]:n["position"] + len(needle)] == needle
    assert text.endswith(f"\n# key {needles[0]['key']} = ".encode())


def test_dense_decode_on_a_filled_cache_decodes_after_the_held_rows():
    from tests.conftest import tiny_config
    cfg = tiny_config(max_context=0)
    out = lc.dense_decode_on_filled_cache(cfg, 256, 3, seed=0)
    assert (out["held"], out["held_after"], len(out["decode_ms"])) == (253, 256, 3)
    assert out["cache_bytes"] == 256 * cfg.head_dim * 4 * cfg.num_layers
    assert out["decode_ms_per_token"] > 0
