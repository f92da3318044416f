"""`inspect_model` prints the cache bytes measured on the decoder's arrays beside the analytic
figure, and says that the FP8-equivalent FLOP weighting is a reconstruction.

Specifications checked (V4-Flash, V4-Pro and a tiny schedule):
  * the measured section lists, per layer kind and in total, the figures of
    `measured_bytes_per_token` (bf16 cache) next to the analytic bf16 figures, and they agree;
  * `measure_cache=False` leaves the section out;
  * the FP8-equivalent row is labelled as a reconstructed weighting and a note names spec §12.2.
Runs in a few seconds (abstract shapes only).
"""
import jax.numpy as jnp
import pytest

from configs import model_presets
from experiments.inspect_model import inspect
from sparse_lm.analysis import accounting as acc
from sparse_lm.config import ModelConfig
from sparse_lm.inference.cache import measured_bytes_per_token


def _cfg(name, **kw):
    return ModelConfig.from_dict(getattr(model_presets, name)()).replace(**kw)


def _measured_rows(text):
    section = text.split("measured on the decoder's cache")[1]
    rows = {}
    for line in section.splitlines()[1:]:
        cells = line.split()
        if cells and cells[0] in ("swa", "csa", "hca", "total"):
            rows[cells[0]] = (int(cells[1]), float(cells[2].replace(",", "")),
                              float(cells[3].replace(",", "")))
    return rows


@pytest.mark.parametrize("name,kw", [("v4_flash", {}), ("v4_pro", {}),
                                     ("tiny", dict(num_layers=4))])
def test_measured_cache_bytes_are_printed_beside_the_analytic_ones(name, kw):
    cfg = _cfg(name, **kw)
    rows = _measured_rows(inspect(cfg, 1 << 16))
    measured = measured_bytes_per_token(cfg, dtype=jnp.bfloat16)
    kinds = set(cfg.layer_kinds)
    assert set(rows) == kinds | {"total"}
    for kind in kinds:
        layers, got, analytic = rows[kind]
        assert layers == cfg.layer_kinds.count(kind)
        assert got == pytest.approx(measured[kind], abs=0.005)
        assert got == analytic
    layers, got, analytic = rows["total"]
    assert layers == cfg.num_layers
    assert got == pytest.approx(measured["total"], abs=0.005)
    assert analytic == pytest.approx(acc.kv_cache_bytes_per_token(cfg, "bf16"), abs=0.005)
    assert got == analytic


def test_measured_section_can_be_switched_off_and_the_weighting_is_flagged():
    cfg = _cfg("v4_flash")
    off = inspect(cfg, 1 << 20, measure_cache=False)
    assert "measured on the decoder's cache" not in off
    row = next(line for line in off.splitlines() if "FP8-equivalent (reconstructed" in line)
    f, v = acc.flops_per_token(cfg, 1 << 20), acc.v32_flops_per_token(1 << 20)
    assert f"{100 * f.weighted / v.weighted:.2f}%" in row
    assert "reconstructed to reproduce the published ratios" in off and "§12.2" in off
