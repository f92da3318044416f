"""Reading compiled HLO: loop trip counts multiply FLOPs (cost_analysis counts a loop body once),
collectives and their replica groups, XLA's convolution spelling of batched matmuls, and the
compile-time HBM OOM message."""
from __future__ import annotations

import math

import pytest

from sparse_lm.aot import hlo_stats
from sparse_lm.aot.compare import parse_oom
from tests.sharding.helpers import run_worker


@pytest.fixture(scope="module")
def scan_result():
    return run_worker("hlo_stats", {"trips": 37}, timeout=600)


def test_scan_flops_counted_trip_count_times(scan_result):
    r = scan_result
    per_iter = 2 * r["rows_per_device"] * r["d"] * r["d"]
    final = 2 * r["global_rows"] * r["d"] * r["d"]          # after the gather: replicated
    assert r["unknown_loops"] == []
    assert r["matmul_flops"] == r["trips"] * per_iter + final
    # ...while cost_analysis (and our body-once count) sees one iteration.
    assert r["matmul_flops_once"] == per_iter + final
    assert abs(r["cost_analysis_flops"] - r["matmul_flops_once"]) <= 0.01 * r["matmul_flops_once"]


def test_all_gather_found_with_its_bytes(scan_result):
    r = scan_result
    assert r["collectives"]["all-gather"]["count"] == 1
    assert r["collectives"]["all-gather"]["bytes"] == r["global_rows"] * r["d"] * 4


def test_batched_matmul_written_as_a_dilated_convolution_has_one_tap_per_output():
    # TPU HLO: bf16[16,32,64] x [16,32,32] batched over a "spatial" dim of size 16.
    assert hlo_stats._mean_valid_taps(16, 16, size=16, stride=15, lhs_dilate=16) == 1.0
    assert hlo_stats._mean_valid_taps(10, 8, size=3) == 3.0          # plain valid 1-D conv
    text = """HloModule m
ENTRY %main (a: f32[16,32,64], b: f32[16,64,32]) -> f32[16,32,32] {
  %a = f32[16,32,64]{2,1,0} parameter(0)
  %b = f32[16,32,64]{2,1,0} parameter(1)
  ROOT %c = f32[16,32,32]{2,1,0} convolution(%a, %b), window={size=16 stride=15 lhs_dilate=16}, dim_labels=0bf_0oi->0bf, metadata={op_name="jit(f)/jvp()/dot_general"}
}
"""
    s = hlo_stats.summarize(text, 1)
    assert s.flops == {"forward": 2 * 16 * 32 * 32 * 64}


@pytest.mark.parametrize("attr,groups", [
    ("replica_groups={{0,1},{2,3}}", [[0, 1], [2, 3]]),
    ("replica_groups=[2,2]<=[4]", [[0, 1], [2, 3]]),
    ("replica_groups=[2,2]<=[2,2]T(1,0)", [[0, 2], [1, 3]]),
    ("replica_groups=mesh['data'=2,'fsdp'=2] {'data'}", [[0, 2], [1, 3]]),
])
def test_replica_group_forms(attr, groups):
    ins = hlo_stats.Instr("x", "f32[4]", "all-reduce", f"%p), {attr}, to_apply=%add", "c")
    assert hlo_stats.replica_groups(ins, 4) == groups


def test_compile_time_hbm_oom_messages():
    req, avail = parse_oom("RESOURCE_EXHAUSTED: E1000: CompileTimeHbmOom: Ran out of memory on "
                           "HBM, the total memory required for HLO temporaries (96.00G) exceeds "
                           "available HBM (15.75G). HLO module: jit__lambda.")
    assert (req, avail) == (96 * 2 ** 30, 15.75 * 2 ** 30)
    req, avail = parse_oom("RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of "
                           "memory in memory space hbm. Used 150.00G of 95.74G hbm.")
    assert math.isclose(req, 150 * 2 ** 30) and math.isclose(avail, 95.74 * 2 ** 30)
    assert parse_oom("INVALID_ARGUMENT: shapes do not match") is None
