"""Entry point: `nanodo [train] --config=...` trains; the other commands read runs."""

import os
import sys

import jax
from absl import app
from ml_collections import ConfigDict

from nanodo import train
from nanodo.infra import checkpoint, host, orbax_logs, workdir
from nanodo.tools import commands


def train_command(argv: list[str]) -> None:
  """`nanodo train` (the default): trains the run of --config, then prints its evaluation."""
  commands.no_arguments(argv)
  orbax_logs.quiet()
  c = commands.CONFIG.value
  if c is None:
    sys.exit('Give a config, e.g. --config=nanodo/configs/default.py')
  host.reuse_freed_memory(temporaries(c))  # before JAX starts its threads
  try:
    result = train.train_and_evaluate(c)
  except (ValueError, FloatingPointError, ConnectionError, checkpoint.SaveError) as e:
    sys.exit(f'error: {e}')
  except OSError as e:  # a full disk, wherever it is met
    line = workdir.no_room(e, os.path.join(c.workdir, workdir.CHECKPOINTS))
    if line is None:
      raise
    sys.exit(f'error: {line}')
  except KeyboardInterrupt:
    sys.exit('Interrupted; the checkpoints written so far are kept.')
  if result and 'variants' not in result and jax.process_index() == 0:  # a sweep's report: logged
    print('held-out ' + ', '.join(f'{k} {v:.4f}' for k, v in result.items()))


def temporaries(c: ConfigDict) -> int:
  """The bytes of a train step's temporaries, roughly; a sweep's stack or an imported model's
  step counts as large (host.ONE_ARENA_FROM)."""
  if c.sweep or c.hf_init_dir:
    return host.ONE_ARENA_FROM
  m, rows = c.model, c.batch_size // max(c.grad_accumulation_steps, 1)
  return host.step_bytes(rows, m.L, m.D, m.F, m.H, m.N, c.vocab_size, c.cross_entropy_block_size)


COMMANDS = {
  'train': train_command,
  'sample': commands.sample_command,
  'eval': commands.eval_command,
  'plot': commands.plot_command,
  'export': commands.export_command,
  'report': commands.report_command,
}


def main() -> None:
  """Console script `nanodo`: a first argument picks train (default) or another command."""
  argv = list(sys.argv)
  command = argv.pop(1) if len(argv) > 1 and argv[1] in COMMANDS else 'train'
  if command != 'train':  # train sets it by its config's step
    host.reuse_freed_memory()  # before JAX starts
  app.run(COMMANDS[command], argv=argv, flags_parser=commands.parse_flags)


if __name__ == '__main__':
  main()
