"""Tokenizers (byte-level and a BPE trained here with `tokenizers`) and local file sources:

- a locally trained byte-level BPE round-trips any text, and frames documents with BOS/EOS;
- packed rows of BPE documents keep every document aligned, whole, in order and unleaked, each
  starting with BOS and ending with EOS; the grain iterator resumes mid-epoch bitwise;
- files / JSONL / parquet / ArrayRecord sources read documents and split them by name hash;
- bad inputs (missing file, empty source, wrong text key, bad tokenizer path, a tokenizer larger
  than the model's vocabulary) are errors naming the field.

~5 s on 2 cores (the BPE trains on a few kilobytes), plus one refused `experiments.train` start
(its imports, ~10-40 s on a busy machine).
"""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sparse_lm.data import grain_pipeline, packing, pipeline
from sparse_lm.data.file_sources import FileSource
from sparse_lm.data.tfds_source import DataError
from sparse_lm.data.tokenizer import (ByteTokenizer, TokenizerError, check_vocab,
                                      load_tokenizer, train_bpe)

TEXTS = [f"def f{i}(x):\n    return x * {i} + {i * i}  # café {i}\n" * (1 + i % 4)
         for i in range(40)]


@pytest.fixture(scope="module")
def bpe_path(tmp_path_factory):
    p = tmp_path_factory.mktemp("bpe") / "tokenizer.json"
    train_bpe(TEXTS, 300).save(str(p))
    return p


def test_trained_bpe_round_trips_text_and_frames_documents(bpe_path):
    tok = load_tokenizer(str(bpe_path))
    assert tok.vocab_size == 300 and (tok.bos_id, tok.eos_id) == (0, 1)
    for text in TEXTS[:5] + ["unseen: ünïcödé ∑ 漢字 \t\n", "x" * 3, "😀 emoji"]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        step = tok.stream_decoder()
        assert "".join(step(i) for i in ids) == text              # streaming, piece by piece
    doc = tok.encode_document(TEXTS[3].encode())
    assert doc[0] == 0 and doc[-1] == 1 and doc.dtype == np.int32
    assert len(doc) - 2 < len(TEXTS[3].encode()) / 2               # merges were learned
    assert tok.encode_documents([TEXTS[3].encode()])[0].tolist() == doc.tolist()
    b = ByteTokenizer()
    assert b.encode_document(b"ab").tolist() == [97, 98] and b.decode([0xC3, 0xA9]) == "é"


def _Bytes(texts):
    return packing.InMemoryDocuments(np.frombuffer(t.encode(), np.uint8) for t in texts)


def test_packed_bpe_documents_are_aligned_whole_and_framed(bpe_path):
    tok = load_tokenizer(str(bpe_path))
    src = _Bytes(TEXTS)
    want = tok.encode_documents(list(src))
    rows = grain_pipeline.PackedRows(grain_pipeline.documents(src, tok), seq_len=24, align=4,
                                     seed=0, shuffle=False, epochs=1)
    stream, pieces = [], 0
    for r in rows:
        toks, segs = r["tokens"], r["segment_ids"]
        for s in range(1, segs.max() + 1):
            where = np.flatnonzero(segs == s)
            assert where[0] % 4 == 0 and np.all(np.diff(where) == 1)    # aligned, contiguous
            stream.extend(toks[where].tolist())
            pieces += 1
        assert np.all(toks[segs == 0] == 0)
    assert stream == np.concatenate(want).tolist()        # every token once, in order
    assert pieces > len(want)                              # long documents continued in new rows
    # A document continued in the next row gets no second BOS: BOS only where documents start.
    assert stream.count(0) == stream.count(1) == len(want)


def test_grain_iterator_with_a_tokenizer_resumes_mid_epoch_bitwise(bpe_path):
    tok = load_tokenizer(str(bpe_path))
    mk = lambda: pipeline.TrainIterator(_Bytes(TEXTS), seq_len=16, local_batch=2, align=4,  # noqa: E731
                                        seed=3, chunk=True, tokenizer=tok, prefetch=3)
    a = mk()
    for _ in range(7):
        next(a)
    saved = json.loads(json.dumps(a.state()))            # as the checkpoint stores it
    rest = [next(a) for _ in range(80)]
    b = mk()
    b.restore(saved)
    for x, y in zip(rest, [next(b) for _ in range(80)]):
        np.testing.assert_array_equal(x["tokens"], y["tokens"])
        np.testing.assert_array_equal(x["segment_ids"], y["segment_ids"])
    assert saved["grain"]["epoch"] == 0 and b.state()["grain"]["epoch"] >= 1
    a.close(), b.close()


def _write_sources(d):
    (d / "txt").mkdir()
    for i in range(12):
        (d / "txt" / f"{i}.txt").write_text(f"document {i}\n" * (i + 1))
    (d / "c.jsonl").write_text("".join(json.dumps({"text": f"line {i}", "id": i}) + "\n"
                                       for i in range(30)) + "\n")
    return d


def test_file_sources_read_documents_and_split_by_name(tmp_path):
    d = _write_sources(tmp_path)
    tr = FileSource(f"files:{d}/txt/*.txt", "train", val_fraction=0.3)
    va = FileSource(f"files:{d}/txt/*.txt", "validation", val_fraction=0.3)
    assert len(tr) + len(va) == 12 and len(va) > 0 and set(tr.names).isdisjoint(va.names)
    assert bytes(tr[0]).startswith(b"document ")
    j = FileSource(f"jsonl:{d}/c.jsonl", "train", val_fraction=0.3)
    jv = FileSource(f"jsonl:{d}/c.jsonl", "validation", val_fraction=0.3)
    assert sorted(bytes(x).decode() for x in list(j) + list(jv)) == \
        sorted(f"line {i}" for i in range(30))
    assert j.fingerprint == jv.fingerprint and j.describe()["documents_all_splits"] == 30

    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"body": [f"row {i}" for i in range(20)]}), d / "t.parquet")
    p = FileSource(f"parquet:{d}/t.parquet", "train", text_key="body", val_fraction=0.3)
    assert all(bytes(x).startswith(b"row ") for x in p) and 0 < len(p) < 20

    from array_record.python.array_record_module import ArrayRecordWriter
    w = ArrayRecordWriter(str(d / "r.array_record"), "group_size:1")
    for i in range(10):
        w.write(f"record {i}".encode())
    w.close()
    a = FileSource(f"arrayrecord:{d}/*.array_record", "train", val_fraction=0.3)
    av = FileSource(f"arrayrecord:{d}/*.array_record", "validation", val_fraction=0.3)
    assert sorted(bytes(x) for x in list(a) + list(av)) == sorted(
        f"record {i}".encode() for i in range(10))


def test_bad_inputs_name_the_field(tmp_path, bpe_path):
    d = _write_sources(tmp_path)
    with pytest.raises(DataError, match=r"data.source=files:.*no file matches"):
        FileSource(f"files:{d}/nothing/*.txt")
    with pytest.raises(DataError, match=r"data.text_key='body' is not in line 1 .*\['id', 'text'\]"):
        FileSource(f"jsonl:{d}/c.jsonl", text_key="body")
    (d / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="data.source='jsonl:.*empty.jsonl' is empty"):
        FileSource(f"jsonl:{d}/empty.jsonl")
    (d / "bad.jsonl").write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(DataError, match="line 2 is not JSON"):
        FileSource(f"jsonl:{d}/bad.jsonl")
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"body": ["x"]}), d / "t.parquet")
    with pytest.raises(DataError, match=r"data.text_key='text' is not a column .*\['body'\]"):
        FileSource(f"parquet:{d}/t.parquet")
    with pytest.raises(DataError, match="data.source='csv:x' is invalid"):
        pipeline.make_source(_data_cfg("csv:x"), "train")
    with pytest.raises(TokenizerError, match=r"data.tokenizer='/no/such' is invalid: .* does not"):
        load_tokenizer("/no/such")
    with pytest.raises(TokenizerError, match=r"has 300 tokens but model.vocab_size=256"):
        check_vocab(load_tokenizer(str(bpe_path)), 256)
    with pytest.raises(TokenizerError, match="vocab_size=100 is invalid"):
        train_bpe(TEXTS, 100)


def _data_cfg(source):
    from sparse_lm.train.defaults import base
    c = base().data
    c.source = source
    return c


def test_eval_batches_with_a_tokenizer_cover_the_split_once(bpe_path):
    tok = load_tokenizer(str(bpe_path))
    src = _Bytes(TEXTS[:9])
    whole = pipeline.eval_batches(src, seq_len=16, local_batch=2, align=4, num_batches=0,
                                  tokenizer=tok)
    n = sum(int((w["segment_ids"] > 0).sum()) for w in whole)
    assert n == sum(len(t) for t in tok.encode_documents(list(src)))
    assert packing.packing_efficiency(whole[0]) > 0


def test_train_refuses_a_tokenizer_larger_than_the_model_before_starting(bpe_path, tmp_path):
    root = Path(__file__).resolve().parents[2]
    wd = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "experiments.train",
                        "--config=tests/train/tiny_train_config.py", f"--workdir={wd}",
                        f"--config.data.tokenizer={bpe_path}"], cwd=root, capture_output=True,
                       text=True, timeout=300, env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"})
    assert r.returncode == 2, r.stderr[-2000:]
    line, = [x for x in r.stderr.splitlines() if x.startswith("error:")]
    assert "has 300 tokens but model.vocab_size=256" in line and "data.tokenizer=" in line
    assert not wd.exists()                   # refused before anything was written
