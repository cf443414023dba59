"""The command line's flags and the commands that read runs: sample, eval, plot, export, report."""

import re
import sys

import grain
import jax
from absl import flags
from ml_collections import config_flags

from nanodo import data, sharding
from nanodo.corpora import sources, token_cache
from nanodo.evaluate import evaluate
from nanodo.ground.console import Progress
from nanodo.infra import orbax_logs, workdir
from nanodo.research import report
from nanodo.step import jit_eval_step
from nanodo.tools import gguf_export, hf_export, sample, trained

CONFIG = config_flags.DEFINE_config_file('config', None, 'A nanodo config file.', lock_config=True)
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
_VARIANT = flags.DEFINE_integer(
  'variant', None, "A sweep's variant to read (default: the one of lowest held-out loss)."
)
_OUT = flags.DEFINE_string('out', None, 'What to write: `plot` an image, `export` a directory.')
_FORMAT = flags.DEFINE_enum(
  'format', 'hf', ['hf', 'gguf'], '`export`: a Hugging Face directory, or one GGUF file.'
)
_DTYPE = flags.DEFINE_enum(
  'dtype', 'float32', list(gguf_export.DTYPES), '`export --format=gguf`: its weights.'
)


def no_arguments(argv: list[str]) -> None:
  """Exits if the command line has arguments beyond the flags."""
  if len(argv) > 1:
    sys.exit(f'Unexpected arguments: {argv[1:]}')


def _one_workdir(argv: list[str]) -> str:
  no_arguments(argv)
  orbax_logs.quiet()
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


def sample_command(argv: list[str]) -> None:
  """`nanodo sample`: continuations of prompts, streamed to stdout."""
  path = _one_workdir(argv)
  try:
    sampling = sample.Sampling(_TEMPERATURE.value, _TOP_K.value, _TOP_P.value)
    prompts = _prompts()
    sample.check_request(prompts, _MAX_NEW_TOKENS.value, _NUM_SAMPLES.value)
    model = trained.load(path, _STEP.value, _VARIANT.value)
    # Samples stream to stdout; on a terminal that is the progress, so stderr gets plain lines.
    with Progress(sys.stderr, bar=sys.stderr.isatty() and not sys.stdout.isatty()) as progress:
      sample.sample(
        model,
        prompts,
        max_new_tokens=_MAX_NEW_TOKENS.value,
        sampling=sampling,
        num_samples=_NUM_SAMPLES.value,
        seed=_SEED.value,
        printer=sample.Printer(model.sp),
        progress=progress,
      )
  except ValueError as e:
    sys.exit(f'error: {e}')


def evaluate_run(
  path: str, step: int | None = None, variant: int | None = None
) -> tuple[trained.Trained, dict[str, float]]:
  """A run's checkpoint (default: the latest) and its metrics on the run's held-out split."""
  run = trained.load(path, step, variant)
  c = run.config
  if c.eval_batch_size % jax.device_count():
    here = f'the {jax.device_count()} devices here'
    raise ValueError(f"The run's eval_batch_size={c.eval_batch_size} is not divisible by {here}.")
  split = sources.get_split(sources.Source.of(c), 'eval')
  cache_dir = workdir.cache_dir(c.cache_dir, c.workdir)
  tokens = token_cache.load_shared(split, run.sp, cache_dir, c.tokenize_workers)
  shard = grain.sharding.ShardByJaxProcess()
  eval_data = data.eval_data(tokens, run.cfg.L, c.eval_batch_size, shard)
  eval_step = jit_eval_step(run.graphdef, c.cross_entropy_block_size)
  batch_sharding = sharding.batch_sharding(sharding.make_mesh(1, jax.device_count()))
  with Progress() as progress:
    return run, evaluate(eval_step, run.params, eval_data, batch_sharding, progress)


def eval_command(argv: list[str]) -> None:
  """`nanodo eval`: a checkpoint's held-out loss, perplexity and bits per byte."""
  path = _one_workdir(argv)
  try:
    run, r = evaluate_run(path, _STEP.value, _VARIANT.value)
  except ValueError as e:
    sys.exit(f'error: {e}')
  loss = f'loss {r["loss"]:.4f} ± {r["loss_stderr"]:.4f}, perplexity {r["perplexity"]:.2f}'
  bpb = f'bits per byte {r["bits_per_byte"]:.4f}'
  print(f'step {run.step} held-out ({run.config.ds_name}): {loss}, {bpb}')


def plot_command(argv: list[str]) -> None:
  """`nanodo plot`: the curves of runs in one image."""
  no_arguments(argv)
  if not _WORKDIR.value:
    sys.exit('error: give a training workdir, e.g. --workdir=/tmp/nanodo (repeat to overlay runs)')
  if not _OUT.value:
    sys.exit('error: give the image to write, e.g. --out=run.png')
  try:
    from nanodo.tools import plot  # matplotlib is an optional dependency.
  except ImportError as e:
    sys.exit(f"error: nanodo plot needs matplotlib ({e}): pip install 'nanodo[plot]'")
  try:
    plot.plot(_WORKDIR.value, _OUT.value)
  except ValueError as e:
    sys.exit(f'error: {e}')
  print(f'wrote {_OUT.value}')


def export_command(argv: list[str]) -> None:
  """`nanodo export`: a checkpoint as a Hugging Face model directory."""
  path = _one_workdir(argv)
  gguf = _FORMAT.value == 'gguf'
  if not gguf and flags.FLAGS['dtype'].present:
    sys.exit('error: --dtype sets the weights of a GGUF file: give it with --format=gguf')
  if not _OUT.value:
    sys.exit(f'error: give what to write, e.g. --out=/tmp/{"nanodo.gguf" if gguf else "nanodo_hf"}')
  try:
    if gguf:
      name = gguf_export.export(path, _OUT.value, _DTYPE.value, _STEP.value, _VARIANT.value)
    else:
      name = hf_export.export(path, _OUT.value, _STEP.value, _VARIANT.value)
  except (ValueError, OSError) as e:
    sys.exit(f'error: {e}')
  if gguf:
    print(f'wrote {_OUT.value}: a {name} GGUF file ({_DTYPE.value}) for llama.cpp and Ollama')
  else:
    load = f'transformers.AutoModelForCausalLM.from_pretrained({_OUT.value!r})'
    print(f'wrote {_OUT.value}: a {name} model for {load}')


def report_command(argv: list[str]) -> None:
  """`nanodo report`: the table, report.json and figure of a sweep."""
  path = _one_workdir(argv)
  try:
    report.write(path)
  except ValueError as e:
    sys.exit(f'error: {e}')


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing; a config file or key that does not exist is one line, not a traceback."""
  try:
    args = flags.FLAGS(argv)
    _ = CONFIG.value  # loads the config file, which absl defers
  except flags.Error as e:  # a value that does not parse: absl's own line, without its usage hint
    sys.exit(f'error: {e}')
  except (AttributeError, KeyError) as e:
    # ml_collections names the missing key in its message: the only place it does.
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
