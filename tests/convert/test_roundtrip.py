"""HF -> ours -> HF round trips (bit-exact), official names, MTP weights and quantised tensors."""
import json
import os
from pathlib import Path

import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from sparse_lm.convert import core, quant
from sparse_lm.convert.hf_to_orbax import convert
from sparse_lm.convert.orbax_to_hf import export
from sparse_lm.convert.safetensors_io import SafetensorsDir
from sparse_lm.model.layers import HashTable
from tests.conftest import tiny_config

DATA = Path(__file__).resolve().parents[1] / "parity_data"


def assert_same_tensors(a_dir, b_dir):
    a, b = SafetensorsDir(a_dir), SafetensorsDir(b_dir)
    assert a.names() == b.names(), sorted(a.names() ^ b.names())[:5]
    for n in sorted(a.names()):
        x, y = a.read(n), b.read(n)
        assert x.dtype == y.dtype and x.shape == y.shape, n
        assert x.tobytes() == y.tobytes(), f"{n} differs"


def pure_state(model):
    return nnx.to_pure_dict(nnx.state(model))


def random_state(cfg, seed=0):
    """A random pure state of the model `cfg` describes, in NumPy (faster than initialising the
    model: nothing is compiled). Hash tables hold distinct valid expert ids per token."""
    rng = np.random.default_rng(seed)
    _, _, flat = core.abstract_model(cfg)
    pure = {}
    for path, var in flat.items():
        if isinstance(var, HashTable):
            v, k = var.shape
            table = np.argsort(rng.random((v, cfg.n_routed_experts)), axis=1)[:, :k]
            core._set(pure, path, table.astype(np.int32))
        else:
            core._set(pure, path, rng.standard_normal(var.shape).astype(np.float32))
    return pure


def assert_same_state(a, b):
    fa, fb = dict(nnx.traversals.flatten_mapping(a)), dict(nnx.traversals.flatten_mapping(b))
    assert fa.keys() == fb.keys()
    for k in fa:
        x, y = np.asarray(fa[k]), np.asarray(fb[k])
        assert x.dtype == y.dtype and x.tobytes() == y.tobytes(), k


def test_hf_to_orbax_to_hf_reproduces_every_tensor_bit_exactly(tmp_path):
    """pro_like has two scanned cycles, so stacking and unstacking are both exercised."""
    src = DATA / "pro_like"
    cfg = convert(str(src), str(tmp_path / "ckpt"), progress=False)
    assert cfg.layer_groups.num_cycles == 2
    export(str(tmp_path / "ckpt"), str(tmp_path / "hf"), max_shard_bytes=300_000, progress=False)
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()     # several shards
    assert_same_tensors(src, tmp_path / "hf")
    again = core.resolve_config(str(tmp_path / "hf"), core.LogicalCheckpoint(
        SafetensorsDir(tmp_path / "hf")))
    assert core.config_differences(again, cfg) == []


def test_official_names_round_trip_and_load_the_same_state(tmp_path):
    model, cfg = core.load_hf(DATA / "small_window", progress=False)
    pure = pure_state(model)
    os.makedirs(tmp_path / "official")
    core.write_hf(pure, cfg, str(tmp_path / "official"), scheme="official", progress=False)
    names = SafetensorsDir(tmp_path / "official").names()
    assert "embed.weight" in names and "layers.1.ffn.experts.7.w3.weight" in names
    model2, cfg2 = core.load_hf(tmp_path / "official", progress=False)
    assert core.config_differences(cfg, cfg2) == []
    assert_same_state(pure, pure_state(model2))


def test_mtp_weights_are_kept_in_both_naming_schemes(tmp_path):
    cfg = tiny_config()
    pure = random_state(cfg, seed=3)
    for scheme in ("transformers", "official"):
        out = tmp_path / scheme
        os.makedirs(out)
        core.write_hf(pure, cfg, str(out), scheme=scheme, progress=False)
        names = SafetensorsDir(out).names()
        assert any(n.startswith("mtp.0.") for n in names)
        loaded, cfg2 = core.load_hf(out, progress=False)
        assert cfg2.mtp_depth == 1 and core.config_differences(cfg, cfg2) == []
        assert_same_state(pure, pure_state(loaded))


def quantised_official_checkpoint(out: Path, seed: int = 0):
    """A tiny random model written with the release's storage formats: FP8 (128x128 ue8m0) for
    the main linears, packed FP4 (per-32 ue8m0) for routed experts, bf16 for the rest."""
    cfg = tiny_config(hidden_size=160, moe_intermediate_size=64)   # not multiples of 128
    pure = random_state(cfg, seed)
    os.makedirs(out)
    tensors, fp8, fp4 = {}, [], []
    for name, arr in core.state_to_hf(pure, cfg, scheme="official"):
        if ".experts." in name:
            tensors[name], tensors[name[:-len("weight")] + "scale"] = quant.quant_fp4(arr)
            fp4.append(name)
        elif name.endswith(("wq_a.weight", "wq_b.weight", "wkv.weight", "wo_b.weight",
                            "shared_experts.w1.weight", "shared_experts.w2.weight",
                            "shared_experts.w3.weight", "e_proj.weight", "h_proj.weight")) \
                and ".compressor." not in name and ".indexer." not in name:
            tensors[name], tensors[name[:-len("weight")] + "scale"] = quant.quant_fp8(arr)
            fp8.append(name)
        elif arr.dtype == np.float32:
            tensors[name] = arr.astype(ml_dtypes.bfloat16)
        else:
            tensors[name] = arr
    _save_with_fp8(tensors, out / "model.safetensors")
    with open(out / "config.json", "w") as f:
        json.dump(core.to_hf_config(cfg), f)
    return cfg, tensors, fp8, fp4


def _save_with_fp8(tensors, path):
    """safetensors.serialize_file with explicit dtype strings: safetensors' NumPy API cannot
    write FP8 (NumPy has no such dtype), the release files contain F8_E4M3 and F8_E8M0."""
    from safetensors import serialize_file
    names = {np.dtype(np.float32): "float32", np.dtype(np.int64): "int64",
             np.dtype(np.int8): "int8", np.dtype(ml_dtypes.bfloat16): "bfloat16",
             np.dtype(ml_dtypes.float8_e4m3fn): "float8_e4m3fn",
             np.dtype(ml_dtypes.float8_e8m0fnu): "float8_e8m0fnu"}
    serialize_file({k: {"dtype": names[v.dtype], "shape": v.shape,
                        "data": np.ascontiguousarray(v).tobytes()} for k, v in tensors.items()},
                   str(path), metadata={"format": "pt"})


def test_quantised_official_checkpoint_dequantises_exactly(tmp_path):
    cfg, tensors, fp8, fp4 = quantised_official_checkpoint(tmp_path / "q")
    assert fp8 and fp4
    model, cfg2 = core.load_hf(tmp_path / "q", dtype=jnp.float32, progress=False)
    assert cfg2.mtp_depth == 1
    back = dict(core.state_to_hf(pure_state(model), cfg2, scheme="official"))
    for name in fp8:
        want = quant.dequant_fp8(tensors[name], tensors[name[:-6] + "scale"])
        assert np.array_equal(back[name], want), name
    for name in fp4:
        want = quant.dequant_fp4(tensors[name], tensors[name[:-6] + "scale"])
        assert np.array_equal(back[name], want), name
    # With dtype=None the dequantised matrices become bfloat16, the rest keeps its stored dtype.
    kept, cfg3 = core.load_hf(tmp_path / "q", progress=False)
    assert cfg3.dtype == "bfloat16"
    assert kept.head_layers[0].attn.wq_a[...].dtype == jnp.bfloat16
    assert kept.head_layers[0].moe.tid2eid[...].dtype == jnp.int32
