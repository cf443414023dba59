"""Entry point: `nanodo [train] --config=...` trains; sample, eval, plot and export read runs."""

import logging as std_logging
import os
import re
import sys
import traceback

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from nanodo import checkpoint, evaluate, hf, host, sample, sharding, train, validate, workdir
from nanodo.progress import Progress

_CONFIG = config_flags.DEFINE_config_file('config', None, 'A nanodo config file.', lock_config=True)
# `nanodo sample`, `eval`, `plot` and `export` flags.
_WORKDIR = flags.DEFINE_multi_string(
  'workdir', [], 'A training workdir; `plot` takes several (repeat the flag) to overlay runs.'
)
_STEP = flags.DEFINE_integer('step', None, 'The checkpoint step (default: the latest).')
_PROMPT = flags.DEFINE_multi_string('prompt', [], 'A prompt; repeat the flag for several.')
_PROMPT_FILE = flags.DEFINE_string('prompt_file', None, 'A file whose whole text is one prompt.')
_MAX_NEW_TOKENS = flags.DEFINE_integer('max_new_tokens', 200, 'Tokens to generate per sample.')
_TEMPERATURE = flags.DEFINE_float('temperature', 1.0, 'Softmax temperature; 0: greedy.')
_TOP_K = flags.DEFINE_integer('top_k', 0, 'Sample from the k most probable tokens; 0: all.')
_TOP_P = flags.DEFINE_float('top_p', 1.0, 'Sample from the smallest set with this mass; 1: all.')
_SEED = flags.DEFINE_integer('seed', 0, 'Random seed of the samples.')
_NUM_SAMPLES = flags.DEFINE_integer('num_samples', 1, 'Samples per prompt.')
_OUT = flags.DEFINE_string('out', None, 'What to write: `plot` an image, `export` a directory.')


def _train(argv: list[str]) -> None:
  if len(argv) > 1:
    sys.exit(f'Unexpected arguments: {argv[1:]}')
  logging.set_verbosity(logging.WARNING)  # Orbax logs every file it writes at INFO.
  _quiet_failed_saves(logging.get_absl_handler())
  c = _CONFIG.value
  if c is None:
    sys.exit('Give a config, e.g. --config=nanodo/configs/default.py')
  try:
    c = hf.import_config(c)  # hf_init_dir's model keys, before the model keys are checked
    validate.check(c)
    sharding.initialize_distributed(c.distributed)
    validate.check_devices(c, jax.device_count())
    result = train.train_and_evaluate(c)
  except (ValueError, FloatingPointError, ConnectionError, checkpoint.SaveError) as e:
    sys.exit(f'error: {e}')
  except KeyboardInterrupt:
    sys.exit('Interrupted; the checkpoints written so far are kept.')
  if result and jax.process_index() == 0:
    print('held-out ' + ', '.join(f'{k} {v:.4f}' for k, v in result.items()))


def _quiet_failed_saves(handler: std_logging.Handler) -> None:
  """Keeps Orbax's own reports of a failed save off the console: SaveError says it in a line.

  They are its errors logged through handler, with tracebacks, and those of the writes it left
  running, which end after their event loop has closed (Python calls them unraisable).
  """
  handler.addFilter(_not_from_orbax)
  report = sys.unraisablehook
  sys.unraisablehook = lambda u: None if str(u.exc_value) == 'Event loop is closed' else report(u)


def _not_from_orbax(record: std_logging.LogRecord) -> bool:
  """False for an error that Orbax logs or that an Orbax task raised (asyncio logs those)."""
  tb = record.exc_info[2] if record.exc_info else None
  files = [record.pathname, *(f.f_code.co_filename for f, _ in traceback.walk_tb(tb))]
  orbax = f'{os.sep}orbax{os.sep}checkpoint{os.sep}'
  return record.levelno < std_logging.ERROR or not any(orbax in f for f in files)


def _one_workdir(argv: list[str]) -> str:
  if len(argv) > 1:
    sys.exit(f'Unexpected arguments: {argv[1:]}')
  logging.set_verbosity(logging.WARNING)
  if len(_WORKDIR.value) != 1:
    sys.exit('error: give one training workdir, e.g. --workdir=/tmp/nanodo')
  return _WORKDIR.value[0]


def _prompts() -> list[str]:
  if not _PROMPT_FILE.value:
    return _PROMPT.value
  try:
    with open(_PROMPT_FILE.value, encoding='utf-8') as f:
      return [*_PROMPT.value, f.read()]
  except OSError as e:
    raise ValueError(f'prompt_file={_PROMPT_FILE.value!r} is not readable: {e}') from e


def _sample(argv: list[str]) -> None:
  path = _one_workdir(argv)
  try:
    sampling = sample.Sampling(_TEMPERATURE.value, _TOP_K.value, _TOP_P.value)
    prompts = _prompts()
    sample.check_request(prompts, _MAX_NEW_TOKENS.value, _NUM_SAMPLES.value)
    model = workdir.load(path, _STEP.value)
    # Samples stream to stdout; on a terminal that is the progress, so stderr gets plain lines.
    with Progress(sys.stderr, bar=sys.stderr.isatty() and not sys.stdout.isatty()) as progress:
      n, seed, printer = _NUM_SAMPLES.value, _SEED.value, sample.Printer(model.sp)
      kwargs = {'num_samples': n, 'seed': seed, 'printer': printer, 'progress': progress}
      sample.sample(
        model, prompts, max_new_tokens=_MAX_NEW_TOKENS.value, sampling=sampling, **kwargs
      )
  except ValueError as e:
    sys.exit(f'error: {e}')


def _eval(argv: list[str]) -> None:
  path = _one_workdir(argv)
  try:
    run, r = evaluate.evaluate_run(path, _STEP.value)
  except ValueError as e:
    sys.exit(f'error: {e}')
  loss = f'loss {r["loss"]:.4f} ± {r["loss_stderr"]:.4f}, perplexity {r["perplexity"]:.2f}'
  bpb = f'bits per byte {r["bits_per_byte"]:.4f}'
  print(f'step {run.step} held-out ({run.config.ds_name}): {loss}, {bpb}')


def _plot(argv: list[str]) -> None:
  if len(argv) > 1:
    sys.exit(f'Unexpected arguments: {argv[1:]}')
  if not _WORKDIR.value:
    sys.exit('error: give a training workdir, e.g. --workdir=/tmp/nanodo (repeat to overlay runs)')
  if not _OUT.value:
    sys.exit('error: give the image to write, e.g. --out=run.png')
  try:
    from nanodo import plot  # matplotlib is an optional dependency.
  except ImportError as e:
    sys.exit(f"error: nanodo plot needs matplotlib ({e}): pip install 'nanodo[plot]'")
  try:
    plot.plot(_WORKDIR.value, _OUT.value)
  except ValueError as e:
    sys.exit(f'error: {e}')
  print(f'wrote {_OUT.value}')


def _export(argv: list[str]) -> None:
  path = _one_workdir(argv)
  if not _OUT.value:
    sys.exit('error: give the directory to write, e.g. --out=/tmp/nanodo_hf')
  try:
    name = hf.export(path, _OUT.value, _STEP.value)
  except (ValueError, OSError) as e:
    sys.exit(f'error: {e}')
  load = f'transformers.AutoModelForCausalLM.from_pretrained({_OUT.value!r})'
  print(f'wrote {_OUT.value}: a {name} model for {load}')


_COMMANDS = {'train': _train, 'sample': _sample, 'eval': _eval, 'plot': _plot, 'export': _export}


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing; a config file or key that does not exist is one line, not a traceback."""
  try:
    args = app.parse_flags_with_usage(argv)
    _ = _CONFIG.value  # loads the config file, which absl defers
  except (AttributeError, KeyError) as e:
    name = re.search(r'\w+', str(e))[0]
    flag = next((a.split('=')[0] for a in argv if a.split('=')[0].endswith(f'.{name}')), name)
    hint = re.search(r'Did you mean "(\w+)"', str(e))
    sys.exit(
      f'error: {flag} is not a config key'
      + (f'; did you mean {hint[1]}?' if hint else '.')
      + ' The keys are those of nanodo/configs/default.py.'
    )
  except (OSError, SyntaxError) as e:
    sys.exit(f'error: the --config file cannot be loaded: {e}')
  return args


def run() -> None:
  """Console script `nanodo`: a first argument picks train (default), sample, eval, plot, export."""
  host.reuse_freed_memory()  # before JAX starts
  argv = list(sys.argv)
  command = argv.pop(1) if len(argv) > 1 and argv[1] in _COMMANDS else 'train'
  app.run(_COMMANDS[command], argv=argv, flags_parser=_parse_flags)


if __name__ == '__main__':
  run()
