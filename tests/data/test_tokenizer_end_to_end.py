"""A BPE tokenizer trained here (tools/train_tokenizer.py, on a small tree of real stdlib files)
through the entry points: train -> evaluate -> generate on its tokens, and generate --hf-dir on
a converted Hugging Face checkpoint decoding with the directory's tokenizer.json.

~2 min on 2 cores (three compiles of a tiny model; a shared compilation cache).
"""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sparse_lm.data.stdlib_corpus import list_files, stdlib_root
from sparse_lm.data.tokenizer import load_tokenizer, train_bpe
from tests.conftest import subprocess_env

ROOT = Path(__file__).resolve().parents[2]
VOCAB = 320


def _run(env, *args):
    r = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, f"{args[:2]} failed ({r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    return r


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return subprocess_env(tmp_path_factory.mktemp("jax_cache"))


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """40 real stdlib modules of modest size (deterministic pick)."""
    root, out = stdlib_root(), tmp_path_factory.mktemp("stdlib_tree")
    picked = [f for f in list_files(root) if 2_000 < (root / f).stat().st_size < 12_000][:40]
    for f in picked:
        (out / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(root / f, out / f)
    return out


@pytest.mark.slow
def test_train_evaluate_generate_with_a_locally_trained_bpe(env, tree, tmp_path):
    tok_path = tmp_path / "bpe" / "tokenizer.json"
    r = _run(env, "tools/train_tokenizer.py", f"--out={tok_path}", f"--vocab_size={VOCAB}",
             f"--stdlib_root={tree}", "--val_fraction=0.2")
    assert f"{VOCAB} tokens (BOS 0, EOS 1)" in r.stdout
    text = (tree / sorted(p for p in tree.rglob("*.py"))[0].relative_to(tree)).read_text()
    tok = load_tokenizer(str(tok_path))
    assert tok.decode(tok.encode(text)) == text

    wd = tmp_path / "run"
    data = [f"--config.data.stdlib_root={tree}", f"--config.data.tokenizer={tok_path}",
            "--config.data.val_fraction=0.2"]
    r = _run(env, "-m", "experiments.train", "--config=tests/train/tiny_train_config.py",
             f"--workdir={wd}", *data, f"--config.model.vocab_size={VOCAB}",
             "--config.train.steps=3", "--config.train.checkpoint_every=0",
             "--config.schedule.warmup_steps=1", "--config.schedule.decay_steps=1")
    assert "[done] steps 0->3" in r.stdout
    assert (wd / "tokenizer.json").read_bytes() == tok_path.read_bytes()    # the workdir's copy
    recorded = json.loads((wd / "config.json").read_text())
    assert recorded["corpus"]["tokenizer"]["vocab_size"] == VOCAB

    _run(env, "-m", "experiments.evaluate", f"--workdir={wd}")
    ev = json.loads((wd / "eval.json").read_text())
    assert ev["tokenizer"]["tokenizer_fingerprint"] == tok.fingerprint
    assert ev["validation_bytes"] > ev["validation_tokens"] > 0    # BPE tokens span bytes
    for mode in ("sparse", "dense"):
        ratio = ev["bits_per_byte"][mode] / ev["bits_per_token"][mode]
        assert 0 < ratio < 1 and ev["needle"][mode] == {}

    tok_path.unlink()         # generate decodes with the workdir's copy
    r = _run(env, "-m", "experiments.generate", f"--workdir={wd}", "--prompt=def ",
             "--max-new-tokens=6", "--temperature=0")
    assert f"tokenizer: {(wd / 'tokenizer.json').resolve()}" in r.stderr
    assert r.stdout.startswith("def ")


@pytest.mark.slow
def test_generate_hf_dir_decodes_with_its_tokenizer(env, tmp_path):
    hf = tmp_path / "hf"
    shutil.copytree(ROOT / "tests" / "parity_data" / "saved_reloaded", hf)
    # The fixture's vocabulary is 256: a byte-level BPE with no merges and no special tokens
    # (BOS / EOS come from the checkpoint's config.json: 0 and 1).
    train_bpe(["hello world"], 256, special_tokens=()).save(str(hf / "tokenizer.json"))
    r = _run(env, "-m", "experiments.generate", f"--hf-dir={hf}", "--prompt=hello",
             "--max-new-tokens=4", "--temperature=0")
    assert f"tokenizer: {(hf / 'tokenizer.json').resolve()}" in r.stderr
    assert r.stdout.startswith("hello")
    (hf / "tokenizer.json").unlink()
    cfg = json.loads((hf / "config.json").read_text())
    cfg["vocab_size"] = 512
    (hf / "config.json").write_text(json.dumps(cfg))
    bad = subprocess.run([sys.executable, "-m", "experiments.generate", f"--hf-dir={hf}",
                          "--prompt=hi"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    assert bad.returncode == 2
    assert "has no tokenizer.json: its 512-token vocabulary cannot be decoded" in bad.stderr
