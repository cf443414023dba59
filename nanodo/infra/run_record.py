"""hparams.jsonl: a row per start of a run, with its config, package versions and git commit."""

import importlib.metadata
import json
import os
import platform
import subprocess
import time

from nanodo.ground import files
from nanodo.infra import workdir

PACKAGES = 'nanodo jax jaxlib flax optax orbax-checkpoint grain numpy sentencepiece'.split()


def versions() -> dict[str, str]:
  """Python's version and the installed versions of the packages a run depends on."""
  found = {'python': platform.python_version()}
  for name in PACKAGES:
    try:
      found[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      found[name] = 'not installed'
  return found


def git_commit() -> str | None:
  """The git commit of nanodo's source ('+dirty' with uncommitted changes); None outside git."""
  git = lambda *args: subprocess.run(
    ['git', *args], cwd=os.path.dirname(__file__), capture_output=True, text=True, timeout=10
  ).stdout.strip()
  try:
    commit, dirty = git('rev-parse', 'HEAD'), git('status', '--porcelain', '--untracked-files=no')
  except (OSError, subprocess.SubprocessError):
    return None
  return (commit + ('+dirty' if dirty else '')) or None


def append(path: str, step: int, config: dict) -> dict:
  """Appends this start's row to the workdir at path's hparams.jsonl; returns its record."""
  record = {'config': config, 'versions': versions(), 'git_commit': git_commit()}
  kept = os.path.join(path, workdir.HPARAMS)
  files.drop_torn_line(kept)  # every row whole: a start's row never joins a torn one
  with files.naming(kept), open(kept, 'a', encoding='utf-8') as f:
    f.write(json.dumps({'step': step, 'time': time.time(), **record}) + '\n')
  return record
