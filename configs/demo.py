"""`make demo`: a small DeepSeek-V4 trained on the embedded stdlib corpus on 2 CPU cores.

Every layer type is present: layer 0 SWA-only with hash routing, then CSA (ratio 4, lightning
indexer top-16), HCA (ratio 32), CSA, all score-routed; mHC residual streams; MTP depth 1. The
first `sparse_start_step` steps run CSA dense (the indexer warm-up), the rest sparse.
"""
import ml_collections

from configs.train_base import base
from sparse_lm import presets


def demo_model() -> ml_collections.ConfigDict:
    return presets.four_layer(hidden_size=192, head_dim=64, q_lora_rank=96, sliding_window=64,
                              compress_ratio_hca=32, index_head_dim=32, index_topk=16,
                              moe_intermediate_size=256, yarn_original_max_position=512)


def get_config() -> ml_collections.ConfigDict:
    c = base()
    c.model = demo_model()
    # 100 steps x 16 rows x 512 bytes = 0.82M training tokens; validation is measured once,
    # after training, by experiments.evaluate (sparse and dense).
    c.train.update(dict(steps=100, batch_size=16, seq_len=512, sparse_start_step=30,
                        log_every=5, eval_every=0, eval_batches=8, checkpoint_every=25,
                        keep_checkpoints=2))
    c.schedule.update(dict(peak_lr=3e-3, warmup_steps=10, decay_steps=40, final_lr=3e-4))
    c.eval.update(dict(batches=24, needle_lengths=(256, 512), needle_examples=8,
                       sample_prompt="def ", sample_bytes=200))
    return c
