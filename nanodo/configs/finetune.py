"""Fine-tuning an open model on the built-in plays (README, "Starting from an open model").

  python nanodo/main.py --config=nanodo/configs/finetune.py --config.hf_init_dir=DIR \
    --config.workdir=WORKDIR

DIR is a Hugging Face model directory (SmolLM2-135M here); its model keys, vocabulary and
tokenizer become the run's. Sized for a 2-core CPU and 24 GiB: 2,048 tokens a step, no remat.
"""

import ml_collections

from nanodo.configs import default


def get_config() -> ml_collections.ConfigDict:
  """default.py's data, with a fine-tune's schedule: a short warm-up, a small learning rate."""
  c = default.get_config()
  c.model.L = 256
  c.batch_size = 8
  c.opt.update(num_train_steps=50, warmup_steps=5, peak_learning_rate=1e-4)
  c.opt.update(final_learning_rate=1e-5, weight_decay=0.0)
  c.eval_at_start = True  # the imported model's held-out bits per byte, the baseline
  c.eval_every_steps = 50
  c.checkpoint_every_steps = 25
  return c
