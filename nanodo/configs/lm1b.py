"""The original's accelerator settings: D512 H8 N6 F2048 L512, batch 256, 100k steps, bfloat16."""

import ml_collections

from nanodo.configs import default


def get_config() -> ml_collections.ConfigDict:
  """LM1B-sized run for accelerators."""
  c = default.get_config()
  c.vocab_size = 32768
  c.batch_size = 256
  c.eval_batch_size = 256
  c.model.update(D=512, H=8, N=6, F=2048, L=512, dtype='bfloat16')
  c.opt.update(
    num_train_steps=100_000,
    peak_learning_rate=0.0016,
    final_learning_rate=1.6e-5,
    warmup_steps=1000,
    b2=0.98,
  )
  c.log_every_steps = 100
  c.eval_every_steps = 1000
  c.checkpoint_every_steps = 1000
  return c
