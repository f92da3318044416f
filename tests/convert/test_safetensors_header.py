"""Headers are read by safetensors' own reader (`safe_open`): offsets, dtypes and shapes agree
with the file's layout, FP8 tensors read exactly, and a truncated, empty or random file is one
CheckpointError naming the file."""
import json

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from sparse_lm.convert.safetensors_io import CheckpointError, SafetensorsDir, read_header


def _write(path, tensors, metadata=None):
    save_file(tensors, str(path), metadata=metadata)


def test_offsets_shapes_and_metadata_describe_the_file(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {"b": rng.standard_normal((3, 5)).astype(np.float32),
               "a": np.arange(7, dtype=np.int32),
               "c": rng.standard_normal((2, 2)).astype(ml_dtypes.bfloat16)}
    _write(tmp_path / "m.safetensors", tensors, {"format": "np"})
    header, meta = read_header(str(tmp_path / "m.safetensors"))
    assert meta == {"format": "np"}
    raw = (tmp_path / "m.safetensors").read_bytes()
    for name, arr in tensors.items():
        begin, end = header[name]["data_offsets"]
        assert tuple(header[name]["shape"]) == arr.shape
        assert raw[begin:end] == arr.tobytes(), name
    d = SafetensorsDir(tmp_path)
    assert all(d.read(n).tobytes() == a.tobytes() for n, a in tensors.items())


def test_fp8_tensor_is_read_from_its_byte_range(tmp_path):
    """safetensors' NumPy API has no FP8 dtype: the file is laid out by hand (the format's
    8-byte header length, JSON header, data), then read back."""
    w = np.linspace(-2, 2, 24, dtype=np.float32).reshape(4, 6).astype(ml_dtypes.float8_e4m3fn)
    x = np.ones(3, np.float32)
    header = json.dumps({"x": {"dtype": "F32", "shape": [3], "data_offsets": [0, 12]},
                         "w": {"dtype": "F8_E4M3", "shape": [4, 6], "data_offsets": [12, 36]}})
    header += " " * (-len(header) % 8)
    (tmp_path / "m.safetensors").write_bytes(len(header).to_bytes(8, "little") + header.encode()
                                             + x.tobytes() + w.tobytes())
    d = SafetensorsDir(tmp_path)
    got = d.read("w")
    assert got.dtype == ml_dtypes.float8_e4m3fn and got.tobytes() == w.tobytes()
    assert d.read("w", rows=slice(1, 3)).tobytes() == w[1:3].tobytes()


@pytest.mark.parametrize("damage,words", [
    (lambda raw: raw[:-5], "is truncated"),
    (lambda raw: b"", "is not a safetensors file"),
    (lambda raw: raw[:5], "is not a safetensors file"),
])
def test_damaged_file_is_one_error_naming_it(tmp_path, damage, words):
    _write(tmp_path / "m.safetensors", {"x": np.ones((4, 4), np.float32)})
    raw = (tmp_path / "m.safetensors").read_bytes()
    (tmp_path / "m.safetensors").write_bytes(damage(raw))
    with pytest.raises(CheckpointError, match=rf"m\.safetensors {words}"):
        SafetensorsDir(tmp_path)
