"""On-policy distillation from domain specialists into one student (DeepSeek-V4 post-training).

- `losses`: reverse / forward KL over the full vocabulary or the student's top-k, pure functions.
- `step`: the jitted update of the student on a batch of (prompt, completion) rows, each domain's
  teacher scoring its rows in inference mode.
- `data`: fixed-length prompt windows per domain; the docstring/comment corpus of the recipe.
- `loop`: `distill(config, workdir)`: sampling with the cached Decoder, checkpoints, exact
  resume, metrics; `evaluate_domains` for the per-domain validation table.
"""
