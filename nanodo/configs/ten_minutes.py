"""The lowest held-out bits per byte ten minutes of a 2-core CPU buy (README, "Ten minutes").

Each change from configs/default.py won an A/B at the same ten-minute budget on the held-out
plays; the README's table gives the numbers, and those of the changes that lost.
"""

import ml_collections

from nanodo.configs import default


def get_config() -> ml_collections.ConfigDict:
  """default.py's data and shape, for ten minutes: Muon, rotary positions, RMSNorm, QK-norm."""
  c = default.get_config()
  c.train_minutes = 10.0
  # Muon on the blocks' matrices, at 5× the learning rate AdamW has on the embedding and norms.
  c.opt.optimizer = 'muon'
  c.opt.lr_multipliers = 'blocks/.*/w=5'
  c.model.update(positions='rope', norm='rmsnorm', qk_norm=True)
  c.eval_every_steps = 1000
  return c
