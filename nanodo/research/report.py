"""A sweep's report: each variant's final held-out loss, and each setting's LR sensitivity.

The LR sensitivity of a setting (Wortsman et al. 2023, "Small-scale proxies for large-scale
Transformer training instabilities") is the mean over its learning rates η of
min(ℓ(η), ℓ0) − ℓ*: ℓ(η) the final held-out loss at peak learning rate η (ℓ0 if the variant
diverged), ℓ0 the loss at initialisation (here: the training loss of step 1, taken before the
first update), ℓ* the setting's best final loss. A setting is a combination of every swept value
but the peak learning rate.
"""

import json
import math
import os

from nanodo.ground import files
from nanodo.ground.console import log
from nanodo.infra import workdir
from nanodo.research import sweep

REPORT, FIGURE = 'report.json', 'report.png'
LR = 'opt.peak_learning_rate'


def _rows(path: str) -> dict[int, list[dict]]:
  """The metrics rows of a group's workdir by variant, in order (a resumed step's last wins)."""
  found: dict[int, dict[int, dict]] = {}
  file = os.path.join(path, workdir.METRICS)
  if os.path.exists(file):
    with open(file, encoding='utf-8') as f:
      for line in f:
        try:
          row = json.loads(line)
        except ValueError:  # a line cut short by a kill
          continue
        if 'variant' in row:
          found.setdefault(row['variant'], {}).setdefault(row['step'], {}).update(row)
  return {v: [steps[s] for s in sorted(steps)] for v, steps in found.items()}


def _variant(v: sweep.Variant, rows: list[dict]) -> dict:
  """A variant's line of the report."""
  evals = [r for r in rows if 'eval_loss' in r]
  first = next((r['loss'] for r in rows if r['step'] == 1 and 'loss' in r), None)
  diverged = next((int(r['diverged_at']) for r in rows if 'diverged_at' in r), None)
  last = evals[-1] if evals else {}
  return {
    'id': v.id,
    'values': v.values,
    'eval_loss': last.get('eval_loss'),
    'bits_per_byte': last.get('eval_bits_per_byte'),
    'step': last.get('step'),
    'initial_loss': first,
    'diverged_at': diverged,
  }


def sensitivity(lines: list[dict]) -> float | None:
  """The LR sensitivity of one setting's variants; None until each has its losses."""
  if any(v['initial_loss'] is None or v['eval_loss'] is None for v in lines):
    return None
  final = [v['initial_loss'] if v['diverged_at'] else v['eval_loss'] for v in lines]
  capped = [min(f, v['initial_loss']) for f, v in zip(final, lines, strict=True)]
  best = min(capped)
  return sum(f - best for f in capped) / len(capped)


def build(path: str) -> dict:
  """The report of the sweep in the workdir at path."""
  found = sweep.read(path)
  if found is None:
    raise ValueError(f'workdir={path!r} holds no sweep ({sweep.SWEEP_FILE}).')
  lines = []
  for g in sweep.groups(found):
    rows = _rows(os.path.join(path, sweep.GROUPS, str(g[0].group)))
    lines += [_variant(v, rows.get(v.id, [])) for v in g]
  lines.sort(key=lambda line: line['id'])
  settings: dict[str, list[dict]] = {}
  for line in lines:
    fixed = {k: x for k, x in line['values'].items() if k != LR}
    settings.setdefault(json.dumps(fixed, sort_keys=True), []).append(line)
  groups = []
  for key, members in settings.items():
    done = [m for m in members if m['eval_loss'] is not None and not m['diverged_at']]
    best = min(done, key=lambda m: m['eval_loss'], default=None)
    best = best and {k: best[k] for k in ('id', 'values', 'eval_loss')}
    groups.append(
      {
        'fixed': json.loads(key),
        'variants': [m['id'] for m in members],
        'lr_sensitivity': sensitivity(members),
        'best': best,
      }
    )
  return {'variants': lines, 'groups': groups}


def table(report: dict) -> str:
  """The report as lines of text."""
  out = ['variant | values | eval loss | bits/byte | diverged at']
  num = lambda x: '-' if x is None else f'{x:.4f}'
  for v in report['variants']:
    values = ' '.join(f'{k}={x}' for k, x in v['values'].items())
    out.append(
      f'{v["id"]} | {values} | {num(v["eval_loss"])} | {num(v["bits_per_byte"])} | '
      f'{v["diverged_at"] or "-"}'
    )
  for g in report['groups']:
    fixed = ' '.join(f'{k}={x}' for k, x in g['fixed'].items()) or 'all variants'
    best = g['best'] and g['best']['values'].get(LR)
    out.append(f'{fixed}: LR sensitivity {num(g["lr_sensitivity"])}, best learning rate {best}')
  return '\n'.join(out)


def figure(report: dict, file: str) -> bool:
  """Final held-out loss against the learning rate, a line per setting; False without
  matplotlib (the plot extra)."""
  try:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
  except ImportError:
    return False
  fig = Figure(figsize=(8, 5), dpi=100)
  ax = fig.add_subplot()
  by_id = {v['id']: v for v in report['variants']}
  for g in report['groups']:
    points = sorted(
      (by_id[i]['values'].get(LR, math.nan), by_id[i]['eval_loss'])
      for i in g['variants']
      if by_id[i]['eval_loss'] is not None and not by_id[i]['diverged_at']
    )
    label = ' '.join(f'{k}={x}' for k, x in g['fixed'].items()) or 'sweep'
    ax.plot([p[0] for p in points], [p[1] for p in points], 'o-', label=label)
  ax.set_xscale('log')
  ax.set_xlabel('peak learning rate')
  ax.set_ylabel('final held-out loss')
  ax.legend(fontsize='small')
  ax.grid(alpha=0.3)
  canvas = FigureCanvasAgg(fig)
  with files.replaced(file) as tmp:
    canvas.print_png(tmp)
  return True


def write(path: str) -> dict:
  """Builds the report of the sweep at path, writes report.json and its figure, logs the table."""
  report = build(path)
  files.write_text(os.path.join(path, REPORT), json.dumps(report, indent=1))
  drawn = figure(report, os.path.join(path, FIGURE))
  log(table(report))
  picture = FIGURE if drawn else "no figure: pip install 'nanodo[plot]'"
  log(f'report: {os.path.join(path, REPORT)} ({picture})')
  return report
