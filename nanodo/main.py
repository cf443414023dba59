"""Entry point: `python nanodo/main.py --config=nanodo/configs/default.py --config.workdir=DIR`."""

import sys

from absl import app, logging
from ml_collections import config_flags

from nanodo import train, validate

_CONFIG = config_flags.DEFINE_config_file('config', None, 'A nanodo config file.', lock_config=True)


def _main(argv: list[str]) -> None:
  if len(argv) > 1:
    sys.exit(f'Unexpected arguments: {argv[1:]}')
  logging.set_verbosity(logging.WARNING)  # Orbax logs every file it writes at INFO.
  c = _CONFIG.value
  if c is None:
    sys.exit('Give a config, e.g. --config=nanodo/configs/default.py')
  try:
    validate.check(c)
    result = train.train_and_evaluate(c)
  except (ValueError, FloatingPointError) as e:
    sys.exit(f'error: {e}')
  print('held-out ' + ', '.join(f'{k} {v:.4f}' for k, v in result.items()))


def run() -> None:
  """Console script `nanodo`."""
  app.run(_main)


if __name__ == '__main__':
  run()
