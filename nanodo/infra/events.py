"""TensorBoard's event file, written in the calling thread.

tensorboardX's SummaryWriter writes from a thread of its own: a full disk there killed the thread,
printed its traceback, and left the training loop blocked on the thread's full queue. Here the
write that finds no room raises in the loop, naming the file.
"""

import os
import socket
import time

from tensorboardX import summary
from tensorboardX.proto import event_pb2, summary_pb2
from tensorboardX.record_writer import RecordWriter

from nanodo.ground import files


class Events:
  """A new events file in directory; with purge_step, TensorBoard hides the events of earlier
  files from that step on (a resumed run's steps after its checkpoint)."""

  def __init__(self, directory: str, purge_step: int | None):
    name = f'events.out.tfevents.{time.time():.0f}.{socket.gethostname()}.{os.getpid()}'
    self.path = os.path.join(directory, name)
    with files.naming(self.path):
      self._file = RecordWriter(self.path)
    self._write(event_pb2.Event(file_version='brain.Event:2'), 0)
    if purge_step is not None:
      start = event_pb2.SessionLog(status=event_pb2.SessionLog.START)
      self._write(event_pb2.Event(session_log=start), purge_step)

  def _write(self, event: event_pb2.Event, step: int) -> None:
    event.wall_time, event.step = time.time(), step
    with files.naming(self.path):
      self._file.write(event.SerializeToString())

  def scalars(self, values: dict[str, float], step: int) -> None:
    """A step's scalars, one event for all of them."""
    parts = [summary.scalar(tag, value).value[0] for tag, value in values.items()]
    self._write(event_pb2.Event(summary=summary_pb2.Summary(value=parts)), step)

  def text(self, tag: str, text: str, step: int) -> None:
    self._write(event_pb2.Event(summary=summary.text(tag, text)), step)

  def flush(self) -> None:
    with files.naming(self.path):
      self._file.flush()

  def close(self) -> None:
    with files.naming(self.path):
      self._file.close()
