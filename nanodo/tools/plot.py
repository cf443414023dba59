"""`nanodo plot`: the curves of one or more runs (their metrics.jsonl) in one image."""

import dataclasses
import json
import os

import numpy as np
from matplotlib import ticker
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from nanodo.infra.workdir import METRICS, run_config

# The image: inches at DPI dots per inch (1500 x 850 pixels).
WIDTH, HEIGHT, DPI = 15.0, 8.5, 100


@dataclasses.dataclass(frozen=True)
class Curves:
  """One workdir's metrics: each key's steps and values, and the tokens of one step."""

  name: str
  series: dict[str, tuple[np.ndarray, np.ndarray]]
  tokens_per_step: int

  def get(self, key: str) -> tuple[np.ndarray, np.ndarray]:
    return self.series.get(key, (np.zeros(0), np.zeros(0)))


def read_run(workdir: str, name: str) -> Curves:
  """A workdir's metrics; of a step logged twice (a resumed run repeats steps) the last wins."""
  path = os.path.join(workdir, METRICS)
  if os.path.isdir(workdir) and not os.path.exists(path):
    raise ValueError(f'workdir={workdir!r} has no {METRICS}: not a nanodo training directory.')
  c = run_config(workdir)
  values: dict[str, dict[int, float]] = {}
  with open(path, encoding='utf-8') as f:
    for line in f:
      try:
        row = json.loads(line)
      except json.JSONDecodeError:  # A line cut short by a crash.
        continue
      for k, v in row.items():
        if k not in ('step', 'time'):
          values.setdefault(k, {})[row['step']] = v
  if not values:
    raise ValueError(f'workdir={workdir!r} has no logged step yet.')
  series = {
    k: (np.asarray(sorted(v)), np.asarray([v[s] for s in sorted(v)])) for k, v in values.items()
  }
  return Curves(name, series, c.batch_size * c.model.L)


def _names(workdirs: list[str]) -> list[str]:
  """Each run's legend: its directory's name, or its whole path where names repeat."""
  names = [os.path.basename(os.path.abspath(w)) for w in workdirs]
  return [
    n if names.count(n) == 1 else os.path.abspath(w) for n, w in zip(names, workdirs, strict=True)
  ]


def _smooth(v: np.ndarray) -> np.ndarray:
  """Debiased exponential moving average over about a fiftieth of the points."""
  weight = 1 - 1 / max(1.0, len(v) / 50)
  out, acc = np.empty(len(v)), 0.0
  for i, x in enumerate(v):
    acc = weight * acc + (1 - weight) * x
    out[i] = acc / (1 - weight ** (i + 1))
  return out


def figure(workdirs: list[str]) -> Figure:
  """Train and held-out loss, bits per byte, learning rate, tokens/s and grad norm of the runs."""
  runs = [read_run(w, n) for w, n in zip(workdirs, _names(workdirs), strict=True)]
  fig = Figure(figsize=(WIDTH, HEIGHT), dpi=DPI, layout='constrained')
  FigureCanvasAgg(fig)
  axes = fig.subplots(2, 3)
  tokens = ticker.EngFormatter()
  colors = [f'C{i % 10}' for i in range(len(runs))]
  for run, color in zip(runs, colors, strict=True):
    steps, loss = run.get('loss')
    eval_steps, eval_loss = run.get('eval_loss')
    for ax, scale in ((axes[0, 0], 1), (axes[0, 1], run.tokens_per_step)):
      ax.plot(steps * scale, loss, color=color, alpha=0.2, linewidth=0.8)
      ax.plot(steps * scale, _smooth(loss), color=color, linewidth=1.5)
      ax.plot(eval_steps * scale, eval_loss, color=color, linestyle='--', marker='o')
    bpb_steps, bpb = run.get('eval_bits_per_byte')
    axes[0, 2].plot(bpb_steps * run.tokens_per_step, bpb, color=color, linestyle='--', marker='o')
    axes[1, 0].plot(*run.get('learning_rate'), color=color)
    rate_steps, rate = run.get('tokens_per_sec')
    axes[1, 1].plot(rate_steps, rate, color=color, alpha=0.2, linewidth=0.8)
    axes[1, 1].plot(rate_steps, _smooth(rate), color=color, linewidth=1.5)
    axes[1, 2].plot(*run.get('grad_norm'), color=color, linewidth=0.8)
  labels = [
    ('step', 'loss (nats per token)', 'Loss: train (smoothed) and held-out (dashed)'),
    ('tokens', 'loss (nats per token)', 'Loss against tokens seen'),
    ('tokens', 'bits per byte', 'Held-out bits per byte'),
    ('step', 'learning rate', 'Learning rate'),
    ('step', 'tokens per second', 'Throughput (smoothed)'),
    ('step', 'global L2 norm', 'Gradient norm (before clipping)'),
  ]
  for ax, (x, y, title) in zip(axes.flat, labels, strict=True):
    ax.set(xlabel=x, ylabel=y, title=title)
    ax.grid(alpha=0.3)
    if x == 'tokens':
      ax.xaxis.set_major_formatter(tokens)
  # Steps timed alone (before a checkpoint or evaluation) skip the host's work: keep their
  # spikes from flattening the rest.
  rates = np.concatenate([r.get('tokens_per_sec')[1] for r in runs])
  axes[1, 1].set_ylim(0, 1.2 * np.percentile(rates, 95) if len(rates) else None)
  axes[1, 2].set_ylim(bottom=0)
  handles = [axes[0, 0].plot([], [], color=c, linewidth=3)[0] for c in colors]
  fig.legend(handles, [r.name for r in runs], loc='outside upper center', ncols=min(len(runs), 6))
  return fig


def plot(workdirs: list[str], out: str) -> None:
  """Writes the figure of the runs in workdirs to the image file out."""
  fig = figure(workdirs)
  try:
    fig.savefig(out)
  except (OSError, ValueError) as e:
    raise ValueError(f'out={out!r} cannot be written: {e}') from e
