"""Entry point: `nanodo [train] --config=...` trains; `nanodo sample --workdir=...` samples."""

import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from nanodo import sample, sharding, train, validate

_CONFIG = config_flags.DEFINE_config_file('config', None, 'A nanodo config file.', lock_config=True)
# `nanodo sample` flags.
_WORKDIR = flags.DEFINE_string('workdir', None, 'A training workdir to sample from.')
_STEP = flags.DEFINE_integer('step', None, 'The checkpoint step (default: the latest).')
_PROMPT = flags.DEFINE_multi_string('prompt', [], 'A prompt; repeat the flag for several.')
_PROMPT_FILE = flags.DEFINE_string('prompt_file', None, 'A file whose whole text is one prompt.')
_MAX_NEW_TOKENS = flags.DEFINE_integer('max_new_tokens', 200, 'Tokens to generate per sample.')
_TEMPERATURE = flags.DEFINE_float('temperature', 1.0, 'Softmax temperature; 0: greedy.')
_TOP_K = flags.DEFINE_integer('top_k', 0, 'Sample from the k most probable tokens; 0: all.')
_TOP_P = flags.DEFINE_float('top_p', 1.0, 'Sample from the smallest set with this mass; 1: all.')
_SEED = flags.DEFINE_integer('seed', 0, 'Random seed of the samples.')
_NUM_SAMPLES = flags.DEFINE_integer('num_samples', 1, 'Samples per prompt.')


def _train(argv: list[str]) -> None:
  if len(argv) > 1:
    sys.exit(f'Unexpected arguments: {argv[1:]}')
  logging.set_verbosity(logging.WARNING)  # Orbax logs every file it writes at INFO.
  c = _CONFIG.value
  if c is None:
    sys.exit('Give a config, e.g. --config=nanodo/configs/default.py')
  try:
    validate.check(c)
    sharding.initialize_distributed(c.distributed)
    validate.check_devices(c, jax.device_count())
    result = train.train_and_evaluate(c)
  except (ValueError, FloatingPointError, ConnectionError) as e:
    sys.exit(f'error: {e}')
  if jax.process_index() == 0:
    print('held-out ' + ', '.join(f'{k} {v:.4f}' for k, v in result.items()))


def _prompts() -> list[str]:
  if not _PROMPT_FILE.value:
    return _PROMPT.value
  try:
    with open(_PROMPT_FILE.value, encoding='utf-8') as f:
      return [*_PROMPT.value, f.read()]
  except OSError as e:
    raise ValueError(f'prompt_file={_PROMPT_FILE.value!r} is not readable: {e}') from e


def _sample(argv: list[str]) -> None:
  if len(argv) > 1:
    sys.exit(f'Unexpected arguments: {argv[1:]}')
  logging.set_verbosity(logging.WARNING)
  if not _WORKDIR.value:
    sys.exit('error: give the training workdir, e.g. --workdir=/tmp/nanodo')
  try:
    sampling = sample.Sampling(_TEMPERATURE.value, _TOP_K.value, _TOP_P.value)
    prompts = _prompts()
    sample.check_request(prompts, _MAX_NEW_TOKENS.value, _NUM_SAMPLES.value)
    model = sample.load(_WORKDIR.value, _STEP.value)
    sample.sample(model, prompts, max_new_tokens=_MAX_NEW_TOKENS.value, sampling=sampling,
                  num_samples=_NUM_SAMPLES.value, seed=_SEED.value,
                  printer=sample.Printer(model.sp))
  except ValueError as e:
    sys.exit(f'error: {e}')


_COMMANDS = {'train': _train, 'sample': _sample}


def run() -> None:
  """Console script `nanodo`: a first argument `train` (the default) or `sample` picks one."""
  argv = list(sys.argv)
  command = argv.pop(1) if len(argv) > 1 and argv[1] in _COMMANDS else 'train'
  app.run(_COMMANDS[command], argv=argv)


if __name__ == '__main__':
  run()
