"""Console progress: plain lines off a terminal, live bars on one."""

import io
import re

from nanodo.ground.console import Progress


class _Terminal(io.StringIO):
  """Captured output that says it is a terminal."""

  def isatty(self) -> bool:
    return True


def test_plain_lines_off_a_terminal_at_the_first_update_every_n_steps_and_the_end():
  out = io.StringIO()
  with Progress(out) as progress:
    assert not progress.bar
    train = progress.add('step', 12, done=2, every=5)
    quiet = progress.add('eval', 3)
    for step in range(3, 13):
      progress.update(train, step, {'loss': 10.0 / step, 'tokens_per_sec': 1234.5})
      progress.update(quiet, step % 3 + 1)
    progress.log('eval at step 12 | loss 0.5')
  lines = out.getvalue().splitlines()
  shown = [int(re.match(r'step +(\d+)/12 \| ', line).group(1)) for line in lines[:-1]]
  assert shown == [3, 5, 10, 12]
  assert lines[1].startswith('step  5/12 | loss 2 | tokens_per_sec 1234 | elapsed 0m00s | eta ')
  assert lines[-1] == 'eval at step 12 | loss 0.5'
  assert '\x1b' not in out.getvalue() and '\r' not in out.getvalue()


def test_a_terminal_gets_a_live_bar_with_count_numbers_and_eta():
  out = _Terminal()
  with Progress(out) as progress:
    assert progress.bar
    task = progress.add('step', 10, every=5)
    progress.log('model: 1 parameter')
    for step in range(1, 8):
      progress.update(task, step, {'loss': 2.5})
  text = out.getvalue()
  assert '\x1b[' in text  # cursor control of the live display
  assert 'model: 1 parameter' in text
  final = re.sub(r'\x1b\[[0-9;?]*[A-Za-z]', '', text.split('\r')[-1])
  assert re.search(r'step .* 7/10 loss 2\.5 +\d:\d\d:\d\d eta \d:\d\d:\d\d', final), final
