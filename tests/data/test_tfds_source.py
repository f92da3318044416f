"""tfds source on a tiny ArrayRecord dataset built here (never downloaded): reading without
TensorFlow, per-process shards, and the errors for TFRecord-only and missing datasets.

~5 s on 2 cores.
"""
import json
import shutil

import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")

from sparse_lm.data import pipeline  # noqa: E402
from sparse_lm.data.tfds_source import DataError, TfdsSource  # noqa: E402


class SparseLmTinyText(tfds.core.GeneratorBasedBuilder):
    """A 30 + 6 document text dataset, written as ArrayRecord."""
    VERSION = tfds.core.Version("1.0.0")
    # tfds locates a builder's source through importlib_resources when its module is in a
    # package (as tests are), a module tfds only declares for Python < 3.9: pretend __main__.
    __module__ = "__main__"

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
            {"text": tfds.features.Text(), "id": tfds.features.Scalar(np.int64)}))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(30, 0), "validation": self._generate_examples(6, 100)}

    def _generate_examples(self, n, start):
        for i in range(start, start + n):
            yield i, {"text": f"doc{i:03d} " + "x" * (i % 17), "id": i}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tfds")
    SparseLmTinyText(data_dir=str(d), file_format="array_record").download_and_prepare()
    return d


def test_reads_array_record_documents_as_bytes(data_dir):
    src = TfdsSource("sparse_lm_tiny_text", "train", str(data_dir))
    assert len(src) == 30
    texts = sorted(bytes(src[i]).decode() for i in range(len(src)))
    assert texts[3] == "doc003 xxx" and src[0].dtype == np.uint8
    assert "tfds:" in src.fingerprint and len(TfdsSource("sparse_lm_tiny_text", "validation", str(data_dir))) == 6


def test_each_process_reads_its_own_shard(data_dir):
    src = TfdsSource("sparse_lm_tiny_text", "train", str(data_dir))
    seen = []
    for pi in range(2):
        it = pipeline.TrainIterator(src, seq_len=16, local_batch=2, align=4, seed=0, chunk=False,
                                    process_index=pi, process_count=2)
        docs = set()
        for _ in range(40):
            b = next(it)
            for toks, segs in zip(b["tokens"], b["segment_ids"]):
                for s in range(1, segs.max() + 1):
                    piece = bytes(toks[segs == s].astype(np.uint8))
                    if piece.startswith(b"doc") and len(piece) >= 6:   # a whole id
                        docs.add(int(piece[3:6]))
        seen.append(docs)
    assert seen[0].isdisjoint(seen[1]) and seen[0] | seen[1] == set(range(30))


def test_tfrecord_only_dataset_names_the_conversion(data_dir, tmp_path):
    # Same files, described as TFRecord (what `tfds build` writes by default).
    src_dir = data_dir / "sparse_lm_tiny_text" / "1.0.0"
    dst = tmp_path / "legacy_text" / "1.0.0"
    shutil.copytree(src_dir, dst)
    info = json.loads((dst / "dataset_info.json").read_text())
    info["fileFormat"], info["name"] = "tfrecord", "legacy_text"
    (dst / "dataset_info.json").write_text(json.dumps(info))
    with pytest.raises(DataError, match=r"TensorFlow.*convert_format.*--out_file_format=array_record"):
        TfdsSource("legacy_text", "train", str(tmp_path))


def test_missing_dataset_or_data_dir_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="not found in data_dir"):
        TfdsSource("no_such_dataset_xyz", "train", str(tmp_path))
    with pytest.raises(DataError, match="not prepared"):
        TfdsSource("lm1b", "train", str(tmp_path))              # a known name, nothing on disk
    with pytest.raises(DataError, match="needs data.data_dir"):
        TfdsSource("lm1b", "train", "")


def test_wrong_split_or_feature(data_dir):
    with pytest.raises(DataError, match="split 'test' is not in"):
        TfdsSource("sparse_lm_tiny_text", "test", str(data_dir))
    with pytest.raises(DataError, match="text_key='body'"):
        TfdsSource("sparse_lm_tiny_text", "train", str(data_dir), text_key="body")
