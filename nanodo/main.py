"""Entry point: `nanodo [train] --config=...` trains; the other commands read runs."""

import os
import sys

import jax
from absl import app

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
  host.reuse_freed_memory()  # before JAX starts
  argv = list(sys.argv)
  command = argv.pop(1) if len(argv) > 1 and argv[1] in COMMANDS else 'train'
  app.run(COMMANDS[command], argv=argv, flags_parser=commands.parse_flags)


if __name__ == '__main__':
  main()
