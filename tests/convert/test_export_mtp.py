"""The exporter's config.json describes the model it wrote: `num_nextn_predict_layers` is kept
(MTP weights included), and dropped only when asked (`drop_mtp` / --drop-mtp)."""
import json
from pathlib import Path

from sparse_lm.convert import core
from sparse_lm.convert.hf_to_orbax import convert
from sparse_lm.convert.orbax_to_hf import export
from sparse_lm.convert.safetensors_io import SafetensorsDir
from tests.conftest import tiny_config
from tests.convert.test_roundtrip import random_state

DATA = Path(__file__).resolve().parents[1] / "parity_data"


def _nextn(d):
    return json.load(open(Path(d) / "config.json"))["num_nextn_predict_layers"]


def _mtp_names(d):
    return sorted(n for n in SafetensorsDir(d).names() if n.startswith("mtp."))


def test_model_with_mtp_exports_its_mtp_block_and_says_so(tmp_path):
    cfg = tiny_config(num_layers=3)           # swa, csa, hca + MTP: 3 layers are enough
    assert cfg.mtp_depth == 1
    core.save_checkpoint(str(tmp_path / "ckpt"), random_state(cfg, seed=5), cfg)
    for scheme in ("transformers", "official"):
        out = tmp_path / scheme
        export(str(tmp_path / "ckpt"), str(out), scheme=scheme, progress=False)
        assert _nextn(out) == 1 and _mtp_names(out)
        report = core.check_hf(out)
        assert report.config.mtp_depth == 1 and report.skipped == []
        dropped = tmp_path / f"{scheme}_dropped"
        export(str(tmp_path / "ckpt"), str(dropped), scheme=scheme, progress=False,
               drop_mtp=True)
        assert _nextn(dropped) == 0 and _mtp_names(dropped) == []
        back = core.check_hf(dropped).config
        assert back.mtp_depth == 0
        assert core.config_differences(back, cfg.replace(mtp_depth=0)) == []


def test_transformers_checkpoint_round_trip_keeps_the_declared_mtp_layer(tmp_path):
    """transformers checkpoints declare num_nextn_predict_layers=1 but hold no MTP weights (it
    drops them); HF -> ours -> HF writes the declaration back, as transformers' own
    save_pretrained does, and 0 only with drop_mtp."""
    src = DATA / "small_window"
    assert _nextn(src) == 1 and _mtp_names(src) == []
    cfg = convert(str(src), str(tmp_path / "ckpt"), progress=False)
    assert cfg.mtp_depth == 0
    export(str(tmp_path / "ckpt"), str(tmp_path / "hf"), progress=False)
    assert _nextn(tmp_path / "hf") == 1 and _mtp_names(tmp_path / "hf") == []
    assert core.check_hf(tmp_path / "hf").config.mtp_depth == 0
    export(str(tmp_path / "ckpt"), str(tmp_path / "hf0"), progress=False, drop_mtp=True)
    assert _nextn(tmp_path / "hf0") == 0
