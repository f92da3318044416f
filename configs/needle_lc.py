"""`lc_small` (sparse_lm/presets.py, the 1M-token model of experiments/long_context.py) trained
on synthetic needle retrieval at 512 bytes, for the retrieval-by-context-length grid
(experiments/retrieval.py, issue 24).

Each 513-byte example (one packed row) holds 3 needles `# key XXXX = 123456` with distinct keys
at random depths in slices of the stdlib corpus (the long-context prompt's filler) and asks for
one of them, so the answer needs the key matched. The loss counts the 6 answer bytes alone
(`data.synthetic_loss="answers"`). The first `sparse_start_step` steps run CSA dense while its
indexer learns by KL (the warm-up), the rest top-16. configs/needle_lc_dense.py is the same
model with every layer full causal attention over the row: the dense arm.

Trained from scratch at 513 bytes the model does not learn the lookup (the answer loss stayed
at the digit prior for 3000 steps sparse, 1000 dense; docs/logs/retrieval_training.md). A
two-stage curriculum does: stage 1 at 129 bytes (the whole row inside the 128-byte window, 32
rows a step), stage 2 here at 513 bytes from stage 1's weights (both ~12 minutes on 2 CPU cores
for the sparse arm):

    python -m experiments.train --config=configs/needle_lc.py --workdir=/tmp/retrieval/short \
        --config.data.synthetic_length=129 --config.train.seq_len=128 \
        --config.train.batch_size=32 --config.train.steps=800 --config.schedule.decay_steps=750 \
        --config.eval.needle_lengths="(129,)" --config.train.sparse_start_step=200
    python -m experiments.train --config=configs/needle_lc.py --workdir=/tmp/retrieval/sparse \
        --config.train.init_from=/tmp/retrieval/short --config.train.sparse_start_step=100 \
        --config.train.steps=1000 --config.schedule.decay_steps=950

The dense arm runs the same two commands with --config=configs/needle_lc_dense.py (and without
the sparse_start_step overrides).
"""
import ml_collections

from configs.train_base import base
from sparse_lm import presets

SEQ_LEN = 512


def get_config() -> ml_collections.ConfigDict:
    c = base()
    c.model = presets.lc_small()
    c.data.update(dict(source="synthetic:needle", synthetic_length=SEQ_LEN + 1,
                       synthetic_needles=3, synthetic_filler="stdlib", synthetic_docs=50000,
                       synthetic_loss="answers"))
    # ~1 s a step on 2 CPU cores: the 20-minute budget of an arm
    c.train.update(dict(steps=1000, batch_size=8, seq_len=SEQ_LEN, sparse_start_step=250,
                        log_every=25, eval_every=0, eval_batches=8, checkpoint_every=250,
                        keep_checkpoints=2, tensorboard=False))
    c.schedule.update(dict(peak_lr=3e-3, warmup_steps=50, decay_steps=950, final_lr=3e-4))
    c.eval.update(dict(batches=8, needle_lengths=(SEQ_LEN + 1,), needle_examples=32,
                       sample_prompt="", sample_bytes=0))
    return c
