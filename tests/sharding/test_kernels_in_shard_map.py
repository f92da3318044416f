"""The Pallas kernels on the sharded train step: every `pallas_call` of every preset's step sits
inside a `shard_map` (what a CPU host can check: interpreted kernels would also run without
one); with interpreted kernels on 8 fake CPU devices the sharded loss and gradients equal the
unsharded "xla" model (fp32); presets that split queries along the sequence refuse an explicit
kernel with an error naming the preset and the split."""
from __future__ import annotations

import pytest

from sparse_lm.sharding.presets import PRESETS
from tests.sharding.helpers import run_worker

RUN = [p + (":moe_dispatch=a2a_padded" if p in ("fsdp_ep", "ep_as_cp") else "") for p in PRESETS]
SEQUENCE_SPLIT = ("cp", "ep_as_cp")


def _worker(task: str, args: dict) -> dict:
    return run_worker(task, args, module="tests.sharding.kernel_worker", timeout=1800)


def test_every_kernel_of_the_sharded_train_step_sits_inside_a_shard_map():
    r = _worker("jaxpr", {"presets": RUN})
    for name in RUN:
        if name.split(":")[0] in SEQUENCE_SPLIT:
            assert "splits the queries along the sequence" in r[name]["refused"], r[name]
            assert "attention_impl='xla'" in r[name]["refused"]
            continue
        # forward + backward attention kernels and the fused indexer of the CSA layer, ...
        assert r[name]["pallas_calls"] >= 6, (name, r[name])
        assert r[name]["inside_shard_map"] == r[name]["pallas_calls"], (name, r[name])


@pytest.mark.slow
def test_sharded_kernels_give_the_unsharded_loss_and_gradients():
    """Heads over `tensor` (fsdp_tp) and batch over every axis with expert-parallel MoE
    (fsdp_ep); dp and fsdp split only the batch, which both of these do too."""
    r = _worker("equal", {"presets": ["fsdp_tp", "fsdp_ep:moe_dispatch=a2a_padded"]})
    for name, p in r["presets"].items():
        assert p["loss_diff"] < 1e-5 * max(1.0, abs(r["reference_loss"])), (name, p)
        assert p["grad_max_abs_err"] < 1e-5 * max(1.0, r["grad_scale"]), (name, p)
