"""`tensorflow_datasets` text datasets read from a `data_dir` in the ArrayRecord format.

`tfds.data_source` style random access (ArrayRecord) needs no TensorFlow, so the same code runs
on a laptop and on every host of a TPU slice (data_dir may be a `gs://` bucket). Datasets stored
as TFRecord need TensorFlow to read; they get an error naming the one-time conversion. Nothing is
ever downloaded: the dataset must already be prepared in `data_dir`.

Documents are the UTF-8 bytes of one text feature (byte-level tokens, vocab 256).
"""
from __future__ import annotations

import numpy as np


class DataError(ValueError):
    """A data source cannot be used as configured; the message says what to do."""


def _conversion_hint(name: str, data_dir: str, version_dir: str | None) -> str:
    where = version_dir or f"{data_dir}/{name}/<version>"
    return (f"convert it once, on a machine with TensorFlow installed, with `tfds convert_format "
            f"--dataset_version_dir={where} --out_file_format=array_record` (or prepare it with "
            f"`tfds build {name} --data_dir={data_dir} --file_format=array_record`)")


class TfdsSource:
    """Random-access documents (uint8 arrays) of one split of a prepared tfds dataset.

    name: a tfds name, optionally with config and version (`lm1b`, `c4/en:3.1.0`, or the name of
    a dataset directory in data_dir); text_key: the feature holding the text.
    """

    def __init__(self, name: str, split: str, data_dir: str, *, text_key: str = "text"):
        import tensorflow_datasets as tfds
        from tensorflow_datasets.core import file_adapters

        if not data_dir:
            raise DataError(f"data.source=tfds:{name} needs data.data_dir (the directory that "
                            f"holds the prepared dataset); nothing is downloaded")
        try:
            builder = tfds.builder(name, data_dir=data_dir)
        except tfds.core.registered.DatasetNotFoundError as e:
            raise DataError(f"dataset {name!r} was not found in data_dir={data_dir!r} (looked for "
                            f"{data_dir}/{name.split(':')[0]}/<version>/dataset_info.json); "
                            f"prepare it there first, e.g. `tfds build {name} --data_dir={data_dir} "
                            f"--file_format=array_record`") from e
        version_dir = str(builder.data_dir)
        prepared = builder.is_prepared() if hasattr(builder, "is_prepared") else True
        if not prepared:
            raise DataError(f"dataset {name!r} is not prepared in data_dir={data_dir!r} "
                            f"({version_dir} has no dataset_info.json); prepare it there first, "
                            f"e.g. `tfds build {name} --data_dir={data_dir} "
                            f"--file_format=array_record`")
        fmt = builder.info.file_format
        if fmt != file_adapters.FileFormat.ARRAY_RECORD:
            raise DataError(f"dataset {name!r} in {version_dir} is stored as "
                            f"{getattr(fmt, 'value', fmt)}, which needs TensorFlow to read; "
                            + _conversion_hint(name, data_dir, version_dir))
        splits = list(builder.info.splits.keys())
        if split not in splits:
            raise DataError(f"split {split!r} is not in dataset {name!r}: available {splits}")
        features = builder.info.features
        keys = list(features.keys()) if hasattr(features, "keys") else []
        if text_key not in keys:
            raise DataError(f"data.text_key={text_key!r} is not a feature of {name!r}: "
                            f"features are {keys}")
        self._ds = builder.as_data_source(split=split)
        self.name, self.split, self.text_key = name, split, text_key
        self.version_dir = version_dir
        self.num_examples = len(self._ds)

    def __len__(self) -> int:
        return self.num_examples

    def __getitem__(self, i: int) -> np.ndarray:
        v = self._ds[int(i)][self.text_key]
        if isinstance(v, str):
            v = v.encode("utf-8")
        elif isinstance(v, np.ndarray):
            v = v.tobytes() if v.dtype != object else v.item()
        return np.frombuffer(bytes(v), np.uint8)

    @property
    def fingerprint(self) -> str:
        return f"tfds:{self.version_dir}:{self.split}:{self.num_examples}"

    def describe(self) -> dict:
        return {"source": f"tfds:{self.name}", "split": self.split, "documents": len(self),
                "dir": self.version_dir, "fingerprint": self.fingerprint}
