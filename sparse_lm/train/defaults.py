"""The base training config: every field the training loop reads, with its default.

    c = base()                       # model section: the `tiny` preset (sparse_lm/presets.py)
    c = base("v4_flash")

configs/train_base.py is `base()` as a config file; experiment files (configs/demo.py, ...) start
from it and override. Each choice has one knob: the compute dtype is `model.dtype` and the
attention implementation `model.attention_impl` (None = the platform's default); both are stored
with the model config in checkpoints.
"""
from __future__ import annotations

import ml_collections

from sparse_lm import presets


def base(model_preset: str = "tiny") -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.model = presets.model_preset(model_preset)
    c.seed = 0
    # Sharding preset of sparse_lm/sharding/presets.py (e.g. "fsdp", "fsdp_ep:expert=16") or a
    # preset file; "" = data parallel over all devices with replicated state (no preset).
    c.sharding = ""

    c.data = ml_collections.ConfigDict(dict(
        # "stdlib" | "tfds:<name>" | "synthetic:needle|recall|repeat" | "files:<glob>" |
        # "jsonl:<path>" | "parquet:<path>" | "arrayrecord:<glob>" (sparse_lm/data/pipeline.py)
        source="stdlib",
        data_dir="",                # tfds: directory (or gs:// bucket) holding the prepared dataset
        text_key="text",            # tfds feature / JSONL key / parquet column with the text
        tokenizer="bytes",          # "bytes" (vocab 256) or the path of a HF tokenizer.json
        prefetch=2,                 # training batches packed ahead in a worker thread (0 = none)
        train_split="train",
        eval_split="validation",
        val_fraction=0.02,          # stdlib: share of files (by path hash) in validation
        stdlib_root="",             # stdlib: another directory of .py files instead (tests)
        align=0,                    # document start alignment; 0 = largest compress ratio
        chunk_docs=True,            # in-memory sources: cut documents into seq_len+1 pieces
        synthetic_docs=20000,
        synthetic_length=512,
        synthetic_needles=1,        # synthetic:needle: needles per example (distinct keys)
        synthetic_filler="words",   # synthetic:needle filler: "words" (random) | "stdlib" (code)
        synthetic_loss="all",       # "all" bytes are targets | "answers" only (a target mask)
        seed=0,
    ))

    c.train = ml_collections.ConfigDict(dict(
        steps=1000,
        batch_size=16,              # global rows per step
        seq_len=256,
        sparse_start_step=0,        # steps before it: CSA dense (indexer learns by KL); then top-k
        indexer_warmup_steps=0,     # last dense steps that train only the indexers (V3.2 recipe)
        log_every=10,
        eval_every=200,             # 0 = only at the end
        eval_batches=20,
        checkpoint_every=200,
        keep_checkpoints=3,
        async_checkpoint=True,
        peak_flops=0.0,             # per device, for MFU; 0 = datasheet table / measured on CPU
        progress=True,
        tensorboard=True,
        inject_nan_at_step=-1,      # test hook: poison the parameters before this step
        restore_step=-1,            # resume from this checkpoint step; -1 = the newest readable
        allow_data_change=False,    # resume although batch size / seq_len / data source changed
        # Fine-tuning: start from the model weights of a training workdir (its newest checkpoint,
        # or init_from_step) or of a converted Hugging Face checkpoint; fresh optimizer, step 0.
        init_from="",
        init_from_step=-1,
    ))

    c.schedule = ml_collections.ConfigDict(dict(
        peak_lr=2e-3, warmup_steps=50, decay_steps=300, final_lr=2e-4,
        mtp_weight=0.3, mtp_weight_decay=0.1,
    ))

    c.optimizer = ml_collections.ConfigDict(dict(
        muon_momentum=0.95, muon_rms_scale=0.18, muon_weight_decay=0.1,
        adam_b1=0.9, adam_b2=0.95, adam_eps=1e-20, adam_weight_decay=0.1,
        grad_clip=1.0, muon_lr_scale=1.0,
    ))

    c.loss = ml_collections.ConfigDict(dict(
        balance_alpha=1e-4, indexer_weight=1.0, router_bias_rate=1e-3,
    ))

    c.eval = ml_collections.ConfigDict(dict(
        batches=0,                  # validation batches for experiments.evaluate; 0 = whole split
        needle_lengths=(256, 512, 1024),
        needle_examples=32,
        sample_prompt="def ",
        sample_bytes=300,
    ))
    return c
