"""Embedded corpus (split, fingerprint, entropies), packing with aligned segments, resumable and
per-process-sharded iteration, targets and masks, synthetic tasks.

~6 s on 2 cores.
"""
import numpy as np
import pytest

from sparse_lm.data import packing, pipeline, stdlib_corpus, synthetic


def _write_tree(root, files):
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(text)


@pytest.fixture
def small_tree(tmp_path):
    rng = np.random.default_rng(0)
    files = {f"pkg{i % 3}/mod{i}.py": bytes(rng.integers(32, 127, size=int(rng.integers(5, 400))).astype(np.uint8))
             for i in range(60)}
    files["site-packages/third_party.py"] = b"not stdlib"
    files["pkg0/data.txt"] = b"not python"
    _write_tree(tmp_path, files)
    return tmp_path


def test_split_is_by_path_hash_disjoint_and_complete(small_tree):
    tr = stdlib_corpus.StdlibCorpus("train", val_fraction=0.2, root=small_tree)
    va = stdlib_corpus.StdlibCorpus("validation", val_fraction=0.2, root=small_tree)
    assert set(tr.paths).isdisjoint(va.paths)
    assert sorted(tr.paths + va.paths) == sorted(f"pkg{i % 3}/mod{i}.py" for i in range(60))
    assert len(tr.paths) + len(va.paths) == 60          # site-packages and non-.py files skipped
    assert all(stdlib_corpus.split_of(p, 0.2) == "validation" for p in va.paths)
    # The split of a path does not depend on the other files.
    paths = [f"x/{i}.py" for i in range(4000)]
    share = np.mean([stdlib_corpus.split_of(p, 0.1) == "validation" for p in paths])
    assert 0.08 < share < 0.12
    assert tr[0].dtype == np.uint8 and tr.info.split_files["train"] == len(tr)


def test_fingerprint_records_the_file_list(small_tree):
    a = stdlib_corpus.StdlibCorpus("train", root=small_tree).fingerprint
    assert stdlib_corpus.StdlibCorpus("train", root=small_tree).fingerprint == a
    (small_tree / "pkg1" / "new.py").write_bytes(b"x = 1\n")
    assert stdlib_corpus.StdlibCorpus("train", root=small_tree).fingerprint != a


def test_real_stdlib_corpus_loads():
    c = stdlib_corpus.StdlibCorpus("validation")
    assert len(c) > 10 and c.info.num_files > 500 and len(c.fingerprint) == 16


def test_byte_entropies_of_known_sequences():
    h1, h2 = stdlib_corpus.byte_entropies([np.frombuffer(b"ab" * 500, np.uint8)])
    assert abs(h1 - 1.0) < 1e-9 and abs(h2) < 1e-9          # next byte determined by previous
    rng = np.random.default_rng(0)
    h1, h2 = stdlib_corpus.byte_entropies([rng.integers(0, 4, 200_000).astype(np.uint8)])
    assert abs(h1 - 2.0) < 0.01 and abs(h2 - 2.0) < 0.01


class ListSource:
    def __init__(self, docs):
        self.docs = [np.asarray(d, np.int32) for d in docs]

    def __len__(self):
        return len(self.docs)

    def __getitem__(self, i):
        return self.docs[i]

    def lengths(self):
        return np.asarray([len(d) for d in self.docs])


def _docs(n=40, seed=0):
    rng = np.random.default_rng(seed)
    # Token value encodes (document, position) so pieces can be traced back.
    return [1000 * (i + 1) + np.arange(int(rng.integers(1, 90))) for i in range(n)]


def test_packing_aligns_documents_and_loses_nothing():
    docs = _docs()
    p = packing.Packer(ListSource(docs), seq_len=32, align=8, shuffle=False, epochs=1)
    seen = {i: [] for i in range(len(docs))}
    while (b := p.next_batch(4)) is not None:
        for toks, segs in zip(b["tokens"], b["segment_ids"]):
            for s in range(1, segs.max() + 1):
                where = np.nonzero(segs == s)[0]
                assert where[0] % 8 == 0 and where[0] < 32              # aligned start
                assert np.all(np.diff(where) == 1)                      # contiguous
                piece = toks[where]
                seen[int(piece[0]) // 1000 - 1].extend(piece.tolist())
            assert np.all(toks[segs == 0] == 0)                         # padding
    for i, d in enumerate(docs):
        assert seen[i] == d.tolist(), i


def test_iterator_position_resumes_exactly_and_shards_by_process():
    src = ListSource(_docs(50, seed=1))
    mk = lambda **kw: pipeline.TrainIterator(src, seq_len=16, local_batch=3, align=4, seed=7,
                                             chunk=True, **kw)
    a = mk()
    for _ in range(5):
        next(a)
    saved = a.state()
    rest = [next(a) for _ in range(60)]           # crosses epochs
    b = mk()
    b.restore(saved)
    for x, y in zip(rest, [next(b) for _ in range(60)]):
        np.testing.assert_array_equal(x["tokens"], y["tokens"])
        np.testing.assert_array_equal(x["segment_ids"], y["segment_ids"])
    assert b.state()["grain"]["epoch"] >= 1
    # Two processes read disjoint documents and together all of them.
    docs_of = []
    for pi in range(2):
        p = packing.Packer(src, seq_len=16, align=4, shuffle=True, process_index=pi,
                           process_count=2, epochs=1)
        ids = set()
        while (bb := p.next_batch(2)) is not None:
            ids |= {int(t) // 1000 - 1 for t in bb["tokens"][bb["segment_ids"] > 0]}
        docs_of.append(ids)
    assert docs_of[0].isdisjoint(docs_of[1]) and docs_of[0] | docs_of[1] == set(range(50))
    with pytest.raises(ValueError, match="processes"):
        mk(process_index=0, process_count=2).restore(saved)


def test_targets_stay_inside_documents():
    toks = np.array([[5, 6, 7, 0, 9, 10, 11, 12, 13]])
    segs = np.array([[1, 1, 1, 0, 2, 2, 2, 2, 3]])
    t1, m1 = packing.targets_and_masks(toks, segs, 1)
    assert np.asarray(t1).tolist() == [[6, 7, 0, 9, 10, 11, 12, 13]]
    assert np.asarray(m1).tolist() == [[True, True, False, False, True, True, True, False]]
    t2, m2 = packing.targets_and_masks(toks, segs, 2)
    assert np.asarray(t2)[0, :3].tolist() == [7, 0, 9]
    assert np.asarray(m2).tolist() == [[True, False, False, False, True, True, False, False]]


def test_answer_only_synthetic_rows_mark_exactly_the_answer_bytes_as_targets():
    from sparse_lm.data import grain_pipeline, tokenizer
    src = synthetic.SyntheticSource("needle", 5, 48, seed=3, loss="answers")
    docs = grain_pipeline.documents(src, tokenizer.ByteTokenizer())
    b = packing.Packer(docs, seq_len=48, align=16, shuffle=False, epochs=1).next_batch(6)
    assert set(b) == {"tokens", "segment_ids", "target_mask"}
    for r in range(5):      # one 48-byte document per row (align 16): its answer is bytes 42..47
        toks, answers = src.example(r)
        assert b["tokens"][r, :48].tolist() == toks.tolist()
        assert b["target_mask"][r].tolist() == answers.tolist() + [False]
    assert not b["target_mask"][5].any()                        # the padding row
    _, mask = packing.batch_targets(b, 1)
    assert np.asarray(mask).sum(axis=1).tolist() == [6] * 5 + [0]
    assert np.flatnonzero(np.asarray(mask)[0]).tolist() == list(range(41, 47))
    # The same documents with every byte a target: no mask in the rows, 47 targets each.
    plain = grain_pipeline.documents(synthetic.SyntheticSource("needle", 5, 48, seed=3),
                                     tokenizer.ByteTokenizer())
    b2 = packing.Packer(plain, seq_len=48, align=16, shuffle=False, epochs=1).next_batch(6)
    assert set(b2) == {"tokens", "segment_ids"}
    assert np.array_equal(b2["tokens"], b["tokens"])
    assert np.asarray(packing.batch_targets(b2, 1)[1]).sum() == 5 * 47


def test_target_masks_need_every_document_masked_and_a_byte_tokenizer(tmp_path):
    class Mixed(ListSource):
        def __getitem__(self, i):
            d = self.docs[i]
            return {"tokens": d, "target_mask": np.ones(len(d), bool)} if i == 0 else d
    p = packing.Packer(Mixed(_docs(3, seed=0)), seq_len=8, align=1, shuffle=False, epochs=1)
    with pytest.raises(ValueError, match="every document with a target_mask or none"):
        while p.next_batch(2) is not None:
            pass
    with pytest.raises(ValueError, match="synthetic_loss='bogus' is invalid"):
        pipeline.make_source(_needle_cfg(synthetic_loss="bogus"), "train")
    with pytest.raises(ValueError, match="loss='x' is invalid"):
        synthetic.SyntheticSource("needle", 2, 48, loss="x")


def _needle_cfg(**kw):
    import ml_collections
    return ml_collections.ConfigDict(dict(dict(
        source="synthetic:needle", synthetic_docs=4, synthetic_length=48, seed=0,
        train_split="train", synthetic_needles=1, synthetic_filler="words"), **kw))


def test_chunked_pieces_reassemble_documents():
    src = ListSource(_docs(10, seed=2))
    ch = packing.Chunked(src, 7)
    for i, d in enumerate(src.docs):
        pieces = [ch[j] for j in range(len(ch)) if ch.doc[j] == i]
        assert all(len(p) <= 7 for p in pieces)
        np.testing.assert_array_equal(np.concatenate(pieces), d)


def test_synthetic_tasks_have_their_answers_where_the_mask_says():
    ex = synthetic.make_examples("needle", 4, 200, seed=3)
    for toks, mask in zip(ex["tokens"], ex["answer_mask"]):
        text = bytes(toks.astype(np.uint8))
        answer = bytes(toks[mask].astype(np.uint8))
        key = text.rsplit(b"# key ", 1)[1].split(b" = ")[0]
        assert len(toks) == 200 and text.count(b"# key " + key + b" = " + answer) == 2
    ex = synthetic.make_examples("recall", 4, 120, seed=4)
    for toks, mask in zip(ex["tokens"], ex["answer_mask"]):
        text = bytes(toks.astype(np.uint8))
        body, query = text.split(b"? ")
        k, v = query.split(b"=")
        assert bytes(toks[mask].astype(np.uint8)) == v
        assert k + b"=" + v + b" " in body and len(toks) == 120


def test_eval_batches_are_fixed_and_the_same_count_on_every_process():
    src = ListSource(_docs(7, seed=3))
    a = pipeline.eval_batches(src, seq_len=16, local_batch=2, align=4, num_batches=5,
                              process_index=0, process_count=2)
    b = pipeline.eval_batches(src, seq_len=16, local_batch=2, align=4, num_batches=5,
                              process_index=1, process_count=2)
    again = pipeline.eval_batches(src, seq_len=16, local_batch=2, align=4, num_batches=5,
                                  process_index=0, process_count=2)
    assert len(a) == len(b) == 5
    for x, y in zip(a, again):
        np.testing.assert_array_equal(x["tokens"], y["tokens"])
    whole = pipeline.eval_batches(src, seq_len=16, local_batch=2, align=4, num_batches=0)
    n_tokens = sum(int((w["segment_ids"] > 0).sum()) for w in whole)
    assert n_tokens == sum(len(d) for d in src.docs)          # one pass, nothing twice
    with pytest.raises(pipeline.DataError, match="one process"):
        pipeline.eval_batches(src, seq_len=16, local_batch=2, align=4, num_batches=0,
                              process_count=2)
