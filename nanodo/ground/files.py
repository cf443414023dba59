"""Files written whole or not at all, and where a path that does not exist yet would be made."""

import contextlib
import errno
import os
import shutil
from collections.abc import Iterator

# Errors of a write that found no room: a full disk, a quota, a file-size limit.
NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


@contextlib.contextmanager
def replaced(path: str) -> Iterator[str]:
  """A temporary path beside path, for a file or a directory: renamed to path if the block ends
  without an error, else removed. A crash or a full disk never leaves path half-written.
  """
  head, name = os.path.split(os.path.abspath(path))
  tmp = os.path.join(head, f'.{name}.tmp{os.getpid()}')
  try:
    with naming(path, tmp):
      yield tmp
      os.replace(tmp, path)  # a directory replaces only an empty one
  finally:
    if os.path.isdir(tmp) and not os.path.islink(tmp):
      shutil.rmtree(tmp, ignore_errors=True)
    else:
      with contextlib.suppress(FileNotFoundError):
        os.remove(tmp)


@contextlib.contextmanager
def naming(path: str, *aliases: str) -> Iterator[None]:
  """An OSError of the block names path: a file object's write errors name no file (and a
  temporary file, one of aliases, is not what the reader needs to know)."""
  try:
    yield
  except OSError as e:
    if e.errno is None or (e.filename is not None and e.filename not in aliases):
      raise  # an error without a number is not the system's: as it was raised
    raise OSError(e.errno, e.strerror, path) from None


def drop_torn_line(path: str) -> None:
  """Cuts a last line that a kill or a full disk left without its newline, if path has one."""
  with contextlib.suppress(FileNotFoundError), open(path, 'rb+') as f:
    data = f.read()
    if data and not data.endswith(b'\n'):
      f.truncate(data.rfind(b'\n') + 1)


def write_text(path: str, text: str) -> None:
  """Writes text (UTF-8) to path whole: a reader sees the old file or the new one."""
  with replaced(path) as tmp, open(tmp, 'w', encoding='utf-8') as f:
    f.write(text)


def write_bytes(path: str, data: bytes) -> None:
  """Writes data to path whole: a reader sees the old file or the new one."""
  with replaced(path) as tmp, open(tmp, 'wb') as f:
    f.write(data)


def existing_parent(path: str) -> str:
  """path itself if it exists, else its nearest ancestor that does: where it would be made."""
  path = os.path.abspath(path)
  while not os.path.exists(path):
    path = os.path.dirname(path)
  return path
