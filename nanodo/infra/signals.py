"""SIGINT and SIGTERM: the run stops after its current step, with a checkpoint."""

import os
import signal
import threading


class StopSignal:
  """On SIGINT or SIGTERM, records it so that the loop ends after its step with a checkpoint.

  A second signal acts at once. Ignored signals stay ignored; only the main thread can handle
  signals, elsewhere this is a no-op.
  """

  def __init__(self):
    self.name, self._previous = '', {}

  def __enter__(self) -> 'StopSignal':
    if threading.current_thread() is threading.main_thread():
      for s in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(s) is not signal.SIG_IGN:
          self._previous[s] = signal.signal(s, self._handle)
    return self

  def _handle(self, signum: int, frame: object) -> None:
    self.name = signal.Signals(signum).name
    signal.signal(signum, self._previous[signum])
    # os.write: print could re-enter a print the main thread was in.
    again = 'send it again to stop at once'
    os.write(2, f'{self.name}: stopping after this step with a checkpoint ({again}).\n'.encode())

  def __exit__(self, *exc: object) -> None:
    for s, handler in self._previous.items():
      signal.signal(s, handler)
