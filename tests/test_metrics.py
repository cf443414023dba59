"""The metrics file: a resumed run logs each step once."""

import json

from nanodo import metrics


def _steps(path) -> list[tuple[int, bool]]:
  with open(path, encoding='utf-8') as f:
    return [(r['step'], 'loss' in r) for r in map(json.loads, f)]


def test_rows_after_the_restored_step_and_a_torn_line_are_dropped(tmp_path):
  writer = metrics.Writer(str(tmp_path))
  for step in range(1, 8):
    writer.write(step, {'loss': 1.0 / step}, echo=False)
    if step % 3 == 0:
      writer.write(step, {'eval_loss': 2.0}, echo=False)
  writer.close()
  with open(tmp_path / 'metrics.jsonl', 'a', encoding='utf-8') as f:
    f.write('{"step": 8, "lo')
  metrics.drop_rows_after(str(tmp_path), 6)
  assert _steps(tmp_path / 'metrics.jsonl') == [
      (1, True), (2, True), (3, True), (3, False), (4, True), (5, True), (6, True), (6, False)]
  writer = metrics.Writer(str(tmp_path))
  writer.write(7, {'loss': 0.5}, echo=False)
  writer.close()
  assert [s for s, is_train in _steps(tmp_path / 'metrics.jsonl') if is_train] == list(range(1, 8))


def test_dropping_nothing_leaves_the_file_alone(tmp_path):
  metrics.drop_rows_after(str(tmp_path), 3)  # no file yet
  writer = metrics.Writer(str(tmp_path))
  writer.write(1, {'loss': 1.0}, echo=False)
  writer.close()
  before = (tmp_path / 'metrics.jsonl').stat()
  metrics.drop_rows_after(str(tmp_path), 3)
  assert (tmp_path / 'metrics.jsonl').stat().st_mtime_ns == before.st_mtime_ns
  metrics.drop_rows_after(str(tmp_path), 0)
  assert (tmp_path / 'metrics.jsonl').read_text() == ''
