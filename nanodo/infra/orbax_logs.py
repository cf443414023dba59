"""Orbax's own console output: its file-by-file logs and the tracebacks of a failed save.

A failed save is reported by checkpoint.SaveError in one line; these keep Orbax's reports of the
same failure off the console.
"""

import logging
import os
import sys
import traceback

from absl import logging as absl_logging


def quiet() -> None:
  """Orbax's INFO logs (every file it writes) and its reports of a failed save left out."""
  absl_logging.set_verbosity(absl_logging.WARNING)
  quiet_failed_saves(absl_logging.get_absl_handler())


def quiet_failed_saves(handler: logging.Handler) -> None:
  """Keeps Orbax's own reports of a failed save off the console: SaveError says it in a line.

  They are its errors logged through handler, with tracebacks, and those of the writes it left
  running, which end after their event loop has closed (Python calls them unraisable).
  """
  handler.addFilter(_not_from_orbax)
  report = sys.unraisablehook
  sys.unraisablehook = lambda u: None if str(u.exc_value) == 'Event loop is closed' else report(u)


def _not_from_orbax(record: logging.LogRecord) -> bool:
  """False for an error that Orbax logs or that an Orbax task raised (asyncio logs those)."""
  tb = record.exc_info[2] if record.exc_info else None
  files = [record.pathname, *(f.f_code.co_filename for f, _ in traceback.walk_tb(tb))]
  orbax = f'{os.sep}orbax{os.sep}checkpoint{os.sep}'
  return record.levelno < logging.ERROR or not any(orbax in f for f in files)
