"""Train a byte-level BPE tokenizer (Hugging Face `tokenizers`) on a data source and write its
tokenizer.json, for `--config.data.tokenizer=PATH` (nothing is downloaded).

    python tools/train_tokenizer.py --out=runs/bpe/tokenizer.json [--vocab_size=1024] \
        [--source=stdlib | --source=jsonl:corpus.jsonl --text_key=text] [--max_documents=0]

The source is read as a training run reads it (`data.source`, its train split); special tokens
<s> (BOS, id 0) and </s> (EOS, id 1) come first. Prints the vocabulary size and the bytes per
token on the validation split.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run as a script from anywhere

from absl import app, flags  # noqa: E402

from sparse_lm.data import pipeline  # noqa: E402
from sparse_lm.data.tfds_source import DataError  # noqa: E402
from sparse_lm.data.tokenizer import HFTokenizer, train_bpe  # noqa: E402
from sparse_lm.train.config_check import exit_with, run_main  # noqa: E402
from sparse_lm.train.defaults import base  # noqa: E402
from sparse_lm.train.loop import USER_ERRORS  # noqa: E402

_OUT = flags.DEFINE_string("out", None, "Where to write tokenizer.json.", required=True)
_VOCAB = flags.DEFINE_integer("vocab_size", 1024, "Vocabulary size, special tokens included.")
_SOURCE = flags.DEFINE_string("source", "stdlib", "A data.source (stdlib, files:, jsonl:, ...).")
_TEXT_KEY = flags.DEFINE_string("text_key", "text", "data.text_key (jsonl, parquet, tfds).")
_STDLIB_ROOT = flags.DEFINE_string("stdlib_root", "", "data.stdlib_root (another .py tree).")
_VAL = flags.DEFINE_float("val_fraction", 0.02, "data.val_fraction (files, jsonl, stdlib).")
_MAX_DOCS = flags.DEFINE_integer("max_documents", 0, "Train on the first N documents (0 = all).")


def _open(data, split):
    try:
        return pipeline.make_source(data, split)
    except DataError:
        raise
    except (OSError, ValueError) as e:
        raise DataError(f"the {split} split of --source={data.source!r} cannot be read: "
                        f"{e}") from None


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}: flags are --name=value")
    data = base().data
    data.source, data.text_key, data.stdlib_root = _SOURCE.value, _TEXT_KEY.value, _STDLIB_ROOT.value
    data.val_fraction = _VAL.value
    t0 = time.perf_counter()
    try:
        train = _open(data, data.train_split)
        n = len(train) if _MAX_DOCS.value <= 0 else min(len(train), _MAX_DOCS.value)
        tok = train_bpe((train[i] for i in range(n)), _VOCAB.value)
        out = Path(_OUT.value)
        out.parent.mkdir(parents=True, exist_ok=True)
        tok.save(str(out))
        loaded = HFTokenizer(out)
        try:
            val, where = _open(data, data.eval_split), "validation"
        except DataError:              # no validation split: the statistic on training documents
            val, where = train, "training"
        docs = [val[i] for i in range(min(len(val), 200))]
        n_bytes = sum(len(d) for d in docs)
        n_tokens = sum(len(t) - 2 for t in loaded.encode_documents(docs))
    except USER_ERRORS as e:
        exit_with(e)
    print(f"[tokenizer] {out}: {loaded.vocab_size} tokens (BOS {loaded.bos_id}, EOS "
          f"{loaded.eos_id}) from {n} documents of {_SOURCE.value} in "
          f"{time.perf_counter() - t0:.1f} s; {n_bytes / max(n_tokens, 1):.2f} bytes per token "
          f"over {len(docs)} {where} documents")


if __name__ == "__main__":
    run_main(main)
