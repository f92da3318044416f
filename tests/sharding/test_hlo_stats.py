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


def test_kernel_calls_counted_by_backend():
    """Which attention path a compiled row ran: Mosaic (TPU) and Triton (GPU) custom calls are
    counted, other custom calls (e.g. a TopK) are not."""
    text = "\n".join([
        '  %a = bf16[1,64,128]{2,1,0} custom-call(%x), custom_call_target="tpu_custom_call"',
        '  %b = f32[1,64]{1,0} custom-call(%y), custom_call_target="tpu_custom_call"',
        '  %c = f32[8]{0} custom-call(%z), custom_call_target="__gpu$xla.gpu.triton"',
        '  %d = f32[8]{0} custom-call(%z), custom_call_target="TopK"'])
    assert hlo_stats.kernel_calls(text) == {"mosaic": 2, "triton": 1}
    assert hlo_stats.kernel_calls("  %d = f32[8]{0} add(%a, %b)") == {}


def test_index_score_shapes_found_with_at_most_one_dim_between():
    text = ("%s = f32[1,1024,256]{2,1,0} fusion(), %h = bf16[1,1024,16,256]{3,2,1,0} dot(), "
            "%w = f32[1024,8,8,256]{3,2,1,0} dot(), %t = f32[256,1024]{1,0} transpose(), "
            "%k = s32[1,1024,16]{2,1,0} custom-call()")
    assert hlo_stats.shapes_with_dims(text, (1024, 256)) == ["bf16[1,1024,16,256]",
                                                            "f32[1,1024,256]"]
    assert hlo_stats.shapes_with_dims(text, (1024, 256), max_gap=2) == [
        "bf16[1,1024,16,256]", "f32[1,1024,256]", "f32[1024,8,8,256]"]


def test_a_collective_split_into_pieces_inside_a_loop_is_counted_once():
    """The TPU compiler overlaps an all-gather with a loop by running it in pieces inside the
    body (each piece printed with the whole output shape, all with the collective's channel_id):
    one 4 KB all-gather, not 3 pieces x 10 iterations. A collective without a shared channel
    inside the loop still runs once per iteration."""
    gather = ('f32[8,128]{1,0} all-gather(%x), channel_id=7, replica_groups=[1,8]<=[8], '
              'dimensions={0}')
    text = f"""HloModule m
%body (p: (s32[], f32[1,128])) -> (s32[], f32[1,128]) {{
  %p = (s32[], f32[1,128]) parameter(0)
  %x = f32[1,128]{{1,0}} get-tuple-element(%p), index=1
  %g1 = {gather}
  %g2 = {gather}
  %g3 = {gather}
  %r = f32[1,128]{{1,0}} all-reduce(%x), channel_id=9, replica_groups=[1,8]<=[8], to_apply=%add
  ROOT %t = (s32[], f32[1,128]) tuple(%i, %r)
}}
%cond (c: (s32[], f32[1,128])) -> pred[] {{
  %c = (s32[], f32[1,128]) parameter(0)
  %n = s32[] constant(10)
  %i = s32[] get-tuple-element(%c), index=0
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}}
ENTRY %main (a: f32[1,128]) -> (s32[], f32[1,128]) {{
  %a = f32[1,128]{{1,0}} parameter(0)
  %z = s32[] constant(0)
  %init = (s32[], f32[1,128]) tuple(%z, %a)
  %final = f32[8,128]{{1,0}} all-gather(%a), channel_id=7, replica_groups=[1,8]<=[8], dimensions={{0}}
  ROOT %w = (s32[], f32[1,128]) while(%init), condition=%cond, body=%body
}}
"""
    table = hlo_stats.summarize(text, 8).collective_table()
    assert table["all-gather"]["count"] == 1 and table["all-gather"]["bytes"] == 8 * 128 * 4
    assert table["all-reduce"]["count"] == 10
