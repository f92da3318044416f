"""One CLI convention (absl flags + ml_collections config files): every field of the shipped
config files can be set from the command line, `model.attention_impl` included (it defaults to
None, which ml_collections can only override when it is a typed placeholder)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from ml_collections import config_dict

from sparse_lm.train.config_check import _load, check_overrides

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ["configs/train_base.py", "configs/demo.py", "configs/tiny.py", "configs/v4_flash.py",
           "configs/v4_pro.py"]

_PARSE = """
import json, sys
from absl import flags
import experiments.train as entry
flags.FLAGS(sys.argv)
c = entry._CONFIG.value
print(json.dumps({"attention_impl": c.model.attention_impl, "dtype": c.model.dtype,
                  "train_keys": sorted(c.train.keys())}))
"""


def _parse(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    p = subprocess.run([sys.executable, "-c", _PARSE, "train", "--workdir=/tmp/unused", *args],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("config", ["configs/train_base.py", "configs/demo.py"])
def test_attention_impl_from_the_command_line(config):
    """Through the real train entry point's flag definitions."""
    got = _parse(f"--config={config}", "--config.model.attention_impl=xla",
                 "--config.model.dtype=bfloat16")
    assert got["attention_impl"] == "xla" and got["dtype"] == "bfloat16"
    assert _parse(f"--config={config}")["attention_impl"] is None
    check_overrides(["train", f"--config={config}", "--config.model.attention_impl=xla"])


def test_one_knob_per_choice():
    """The compute dtype and the attention implementation are model fields, not train fields."""
    keys = _parse("--config=configs/train_base.py")["train_keys"]
    assert "implementation" not in keys and "compute_dtype" not in keys


def _leaves(c, prefix=""):
    for k in c.keys():
        v = c[k]
        if isinstance(v, config_dict.ConfigDict):
            yield from _leaves(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", c, k


@pytest.mark.parametrize("config", CONFIGS)
def test_no_field_is_an_untyped_none(config):
    """A plain None field cannot be overridden by config_flags; optional fields are placeholders."""
    c = _load(str(ROOT / config))
    untyped = [name for name, node, k in _leaves(c)
               if node[k] is None and not isinstance(node._fields[k], config_dict.FieldReference)]
    assert not untyped, f"{config}: fields that --config.<field>=... cannot set: {untyped}"
