"""The compiled sharded train step keeps the MoE and the stacked experts per device (a file of its
own, apart from tests/sharding/test_presets.py, so that the two workers of `make test` can run
the two long compiles side by side)."""
from __future__ import annotations

from tests.sharding.helpers import run_worker


def test_sharded_step_keeps_moe_and_stacked_experts_per_device():
    """The compiled fsdp / fsdp_tp train steps (Muon + AdamW, 16 experts, 2 stacked cycles on 8
    devices) sort only each device's own (token, expert) assignments (rows per device x k, not
    the global batch's: a global sort means every device runs the whole batch's MoE), and no
    instruction has the full shape of a stacked expert weight that the preset shards (the
    backward scan's gradient carry or Muon's Newton-Schulz left unsharded would)."""
    r = run_worker("step_layout", {"presets": ["fsdp", "fsdp_tp"]}, timeout=900)
    for name, v in r.items():
        assert v["longest_sort"] == v["rows_per_device"] * v["k"], (name, v["longest_sort"])
        assert v["longest_sort"] < v["global_rows"] * v["k"]
        experts = {p: h for p, h in v["full_shape_hits"].items() if "/moe/w_" in p}
        assert len(experts) == 6, sorted(v["full_shape_hits"])
        assert all(h["instructions"] == 0 for h in experts.values()), experts
