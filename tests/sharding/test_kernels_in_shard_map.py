"""The Pallas kernels on the sharded train step: every `pallas_call` of every preset's step sits
inside a `shard_map` (what a CPU host can check: interpreted kernels would also run without
one), the sequence-split presets (`cp`, `ep_as_cp`) included; with interpreted kernels on 8 fake
CPU devices the sharded loss and gradients equal the unsharded "xla" model (fp32), and one
attention layer split along the sequence (window halo from the previous shards; HCA and the dense
stage through the block-sparse kernel at the shard's query offset, CSA's picks through a list)
equals the unsplit call, output and VJP."""
from __future__ import annotations

import pytest

from sparse_lm.sharding.presets import PRESETS
from tests.sharding.helpers import run_worker

RUN = [p + (":moe_dispatch=a2a_padded" if p in ("fsdp_ep", "ep_as_cp") else "") for p in PRESETS]


def _worker(task: str, args: dict) -> dict:
    return run_worker(task, args, module="tests.sharding.kernel_worker", timeout=1800)


def test_every_kernel_of_the_sharded_train_step_sits_inside_a_shard_map():
    r = _worker("jaxpr", {"presets": RUN})
    for name in RUN:
        assert "refused" not in r[name], (name, r[name])
        # forward + backward attention kernels and the fused indexer of the CSA layer, ...
        assert r[name]["pallas_calls"] >= 6, (name, r[name])
        assert r[name]["inside_shard_map"] == r[name]["pallas_calls"], (name, r[name])


def test_attention_split_along_the_sequence_equals_the_unsplit_call():
    """Rows split over 4 shards (halo from one shard) for SWA, HCA, dense-stage CSA (both through
    the block-sparse kernel with the shard's query offset) and CSA (the indexer's picks), and
    over 8 shards of 4 rows (halo over two shards, W = 8) for SWA and HCA; two documents, the
    boundary inside a shard's window. HCA and the dense stage hold no [B, T, N] int / bool array
    (the old every-visible-entry list and its mask), which the listed CSA case shows the walk
    finds. A kernel without a sequence form is refused there with an error naming the preset
    and the split."""
    r = _worker("halo", {})
    refused = r.pop("refused without a sequence form")
    assert "preset cp splits the queries along the sequence" in refused, refused
    assert "context=4" in refused and "attention_impl='xla'" in refused, refused
    assert set(r) == {"cp:fsdp=1,context=4 " + k for k in ("swa", "hca", "csa", "csa_listed")} | {
        "cp:fsdp=1,context=8 " + k for k in ("swa", "hca")}, sorted(r)
    for name, c in r.items():
        assert max(c["out"], c["lse"]) < 1e-5 and c["grad"] < 1e-5, (name, c)
        inside, calls = c["pallas_calls_in_shard_map"]
        assert calls >= 2 and inside == calls, (name, c)
        if name.endswith(("hca", " csa")):
            assert c["row_entry_arrays"] == [], (name, c)
    assert r["cp:fsdp=1,context=4 csa_listed"]["row_entry_arrays"], r


@pytest.mark.slow
def test_sharded_kernels_give_the_unsharded_loss_and_gradients():
    """Heads over `tensor` (fsdp_tp); the sequence over `context` with the batch over `fsdp`
    (cp); the sequence over `expert` in 8 shards of 4 rows, halo over two shards, with
    expert-parallel MoE (ep_as_cp: fsdp_ep's parameter layout and dispatch). dp, fsdp and
    fsdp_ep split only the batch, which these do too (docs/logs/sharded_equivalence.md)."""
    r = _worker("equal", {"presets": ["fsdp_tp", "cp", "ep_as_cp:moe_dispatch=a2a_padded"]})
    for name, p in r["presets"].items():
        assert p["loss_diff"] < 1e-5 * max(1.0, abs(r["reference_loss"])), (name, p)
        assert p["grad_max_abs_err"] < 1e-5 * max(1.0, r["grad_scale"]), (name, p)
