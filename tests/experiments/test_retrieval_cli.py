"""experiments.retrieval: bad settings are one clear error naming the flag; the projection that
enforces the wall budget follows the measured growth."""
import types

import pytest

from experiments import retrieval as rt
from sparse_lm.train.config_check import UserError


def _args(**kw):
    base = dict(arms="sparse,dense", sparse_workdir="/tmp/s", dense_workdir="/tmp/d",
                contexts="8192,32768", depths="0.1,0.9", chunk=1024, dense_chunk=256,
                train_examples=8, budget_s=100.0, dense_budget_s=100.0, stop_by="")
    return types.SimpleNamespace(**(base | kw))


@pytest.mark.parametrize("kw, flag", [
    (dict(arms="sparse,moe"), "--arms"), (dict(dense_workdir=None), "--dense-workdir"),
    (dict(contexts="32768,8192"), "--contexts"), (dict(contexts=str(2 << 20)), "--contexts"),
    (dict(depths="0.5,2"), "--depths"), (dict(chunk=0), "--chunk"),
    (dict(budget_s=0), "--budget-s"), (dict(stop_by="25:00"), "--stop-by"),
    (dict(stop_by="noon"), "--stop-by")])
def test_bad_settings_name_the_flag(kw, flag):
    with pytest.raises(UserError, match=flag):
        rt.check_args(_args(**kw))


def test_projection_follows_the_measured_power():
    one = [{"context": 1000, "prefill_s": 2.0}]
    assert rt.projected_s("sparse", [], 4000) is None
    assert rt.projected_s("sparse", one, 4000) == pytest.approx(8.0)       # linear
    assert rt.projected_s("dense", one, 4000) == pytest.approx(32.0)       # quadratic
    grew = one + [{"context": 2000, "prefill_s": 2.0 * 2 ** 1.5}]
    assert rt.projected_s("sparse", grew, 4000) == pytest.approx(2.0 * 4 ** 1.5)
    flat = one + [{"context": 4000, "prefill_s": 7.0}]       # near-linear short dense cells
    assert rt.projected_s("dense", flat, 16000) == pytest.approx(7.0 * 16)   # still quadratic
    assert rt.check_args(_args(stop_by="14:45"))["stop_by"] % 86400 == 14 * 3600 + 45 * 60
