#!/usr/bin/env python
"""Write checkpoints with transformers' own `save_pretrained`, in each naming scheme it produces.

Run through `bash tools/parity/refresh.sh` (after make_references.py; it needs
tests/parity_data/small_window, whose model has an HCA, a CSA and a SWA layer, hash and score
routing, so every kind of tensor name occurs). transformers 5.23.0 writes two different schemes
for `DeepseekV4ForCausalLM` (sparse_lm/convert/mapping.py has one table for each):

  saved_fresh/      a freshly built model (`DeepseekV4ForCausalLM(config)`, weights copied in with
                    `load_state_dict`) saved with `save_pretrained`: its weight-conversion
                    machinery writes the release's per-layer names under `model.layers.{i}.`
                    (`attn.wq_a.weight`, `attn.norm.weight`, `ffn.experts.{e}.w1.weight`, ...),
                    `head.weight`, `model.embed_tokens.weight`. Sharded (max_shard_size=300KB), so
                    the index file is transformers' too. A model loaded from this directory and
                    saved again writes the same names (checked here).
  saved_reloaded/   the small_window reference loaded with `from_pretrained` (state-dict names)
                    and saved with `save_pretrained`: state-dict names except the KV norms
                    (`self_attn.norm.weight`, `self_attn.compressor.norm.weight`,
                    `self_attn.compressor.indexer.norm.weight` instead of `kv_norm`).

Each directory holds transformers' config.json and safetensors files as save_pretrained wrote
them, plus names.json (the tensor names and shapes, for review) and meta.json. The script checks
that loading each directory back into transformers reproduces small_window's reference logits
(io.npz) exactly. It also writes small_window/short_inputs.npz: transformers' logits for
S = 1, 2, 3, 5 (shorter than the CSA ratio, the HCA ratio and the window).
"""
from __future__ import annotations

import argparse
import glob
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
import transformers
from safetensors import safe_open
from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

SOURCE = "small_window"
SHORT_LENGTHS = (1, 2, 3, 5)


def names_and_shapes(d: Path) -> dict:
    out = {}
    for f in sorted(glob.glob(str(d / "*.safetensors"))):
        with safe_open(f, "pt") as g:
            for k in g.keys():
                sl = g.get_slice(k)
                out[k] = {"dtype": sl.get_dtype(), "shape": list(sl.get_shape()),
                          "file": Path(f).name}
    return dict(sorted(out.items()))


def logits_of(model, ids):
    model.config._attn_implementation = "eager"
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits.float()


def load(path):
    return DeepseekV4ForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def write(dst: Path, model, scheme: str, how: str, ref, ids, **save_kw):
    if dst.exists():
        shutil.rmtree(dst)
    model.save_pretrained(str(dst), **save_kw)
    inv = names_and_shapes(dst)
    back = load(dst)
    diff = float((logits_of(back, ids) - ref).abs().max())
    assert diff == 0.0, f"{dst.name}: reloaded logits differ by {diff}"
    with open(dst / "names.json", "w") as f:
        json.dump(inv, f, indent=1)
        f.write("\n")
    meta = {"source": f"tests/parity_data/{SOURCE}", "scheme": scheme, "how": how,
            "transformers_version": transformers.__version__, "torch_version": torch.__version__,
            "tensors": len(inv), "reload_logits_max_abs_diff_vs_source_io": diff,
            "reference": f"tests/parity_data/{SOURCE}/io.npz"}
    with open(dst / "meta.json", "w") as f:
        json.dump(meta, f, indent=2)
        f.write("\n")
    print(f"{dst.name}: {len(inv)} tensors, scheme {scheme}, reload diff {diff}", flush=True)
    return inv


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="tests/parity_data", help="parity data folder")
    args = ap.parse_args(argv)
    assert transformers.__version__ == "5.23.0", transformers.__version__
    torch.use_deterministic_algorithms(True)
    out = Path(args.out)
    src = out / SOURCE
    io = np.load(src / "io.npz")
    ids = torch.from_numpy(io["input_ids"].astype(np.int64))
    ref_np = io["logits"]

    reloaded = load(src)
    ref = logits_of(reloaded, ids)
    assert float((ref - torch.from_numpy(ref_np)).abs().max()) == 0.0, "source drifted"

    # 1. loaded with from_pretrained (state-dict names), saved again.
    inv_re = write(out / "saved_reloaded", reloaded, "transformers-resaved",
                   f"DeepseekV4ForCausalLM.from_pretrained('{SOURCE}').save_pretrained()", ref, ids)

    # 2. freshly built, weights copied in, saved (sharded).
    cfg = DeepseekV4Config.from_pretrained(str(src))
    torch.manual_seed(0)
    fresh = DeepseekV4ForCausalLM(cfg).float().eval()
    missing, unexpected = fresh.load_state_dict(reloaded.state_dict(), strict=True)
    assert not missing and not unexpected
    inv_fresh = write(out / "saved_fresh", fresh, "transformers-saved",
                      "DeepseekV4ForCausalLM(config) + load_state_dict(small_window) + "
                      "save_pretrained(max_shard_size='300KB')", ref, ids, max_shard_size="300KB")
    assert (out / "saved_fresh" / "model.safetensors.index.json").exists()

    # 3. loaded from the fresh save, saved again: the same names (no fixture needed).
    tmp = out / ".saved_fresh_again"
    if tmp.exists():
        shutil.rmtree(tmp)
    load(out / "saved_fresh").save_pretrained(str(tmp))
    again = {k: (v["dtype"], v["shape"]) for k, v in names_and_shapes(tmp).items()}
    shutil.rmtree(tmp)
    assert again == {k: (v["dtype"], v["shape"]) for k, v in inv_fresh.items()}, \
        "loaded-from-fresh-then-saved names differ from the fresh save"
    assert set(inv_re) != set(inv_fresh)

    # 4. transformers' logits on short inputs (S < CSA ratio 4, < HCA ratio 128, < window 16).
    short = {}
    for s in SHORT_LENGTHS:
        x = ids[:, :s]
        short[f"input_ids_s{s}"] = x.numpy().astype(np.int32)
        short[f"logits_s{s}"] = logits_of(reloaded, x).numpy().astype(np.float32)
    np.savez_compressed(src / "short_inputs.npz", **short)
    print(f"{SOURCE}/short_inputs.npz: S = {SHORT_LENGTHS}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
