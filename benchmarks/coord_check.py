"""The coordinate check: does the scale of every activation stay the same as the model widens?

  python benchmarks/coord_check.py [--parameterizations=sp,mup] [--widths=64,128,256,512,1024]
      [--steps=10] [--lr=1e-2] [--tied] [--png=coord_check.png]

Trains each parameterization (sp, mup, ntk, mfp) a few steps at each width (2 layers of 4 heads,
F = 4D, context 64, batch 8 of the built-in Shakespeare corpus with the shipped 1,024-piece
tokenizer, AdamW at a constant learning rate, base width the first width; an untied head,
which starts at zero under mup and mfp as µP prescribes, Tensor Programs V) on the same batches,
and prints, per layer kind, the rms of its output at each step and width: the attention and MLP
outputs and the residual stream (means over the layers), and the logits. Step t is the forward
pass after t - 1 updates. Ends with a line per parameterization: the largest ratio between two
widths' rms of one kind at one step, over the steps after the first update. --tied checks the
default model's tied head instead (not ntk's, whose head learns at another rate): mup's and mfp's
logits then start at m^-1/2 of the base width's, which the first updates do not yet outweigh.
Writes a PNG: rms against width, a line per step, a panel per kind and parameterization.
"""

import argparse
import os
import tempfile

import jax
import numpy as np
from train_throughput import cpu

from nanodo import model, sharding, step
from nanodo.configs import default
from nanodo.corpora.inputs import load_inputs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = os.path.join(ROOT, 'tests', 'testdata', 'shakespeare_1024.model')
KINDS = {'attention': '/attn/rms', 'mlp': '/mlp/rms', 'residual': None, 'logits': 'act/output/rms'}


def kind_rms(m: dict, kind: str) -> float:
  """The rms of one kind of layer output in a step's internal metrics (a mean over layers)."""
  if kind == 'residual':
    keys = [k for k in m if k.startswith('act/blocks/') and k.count('/') == 3]
  elif kind == 'logits':
    keys = [KINDS[kind]]
  else:
    keys = [k for k in m if k.startswith('act/blocks/') and k.endswith(KINDS[kind])]
  return float(np.mean([m[k] for k in keys]))


def run(parameterization: str, D: int, base: int, batches: list, args) -> np.ndarray:
  """rms of each kind (rows) at each step (columns) of one model."""
  c = default.get_config()
  c.model.update(D=D, H=4, N=2, F=4 * D, L=64, parameterization=parameterization, base_width=base)
  c.model.tied = args.tied and parameterization != 'ntk'
  c.model.zero_head = not c.model.tied and parameterization in ('mup', 'mfp')
  c.opt.update(warmup_steps=0, decay_type='constant', peak_learning_rate=args.lr, weight_decay=0)
  c.opt.clip_by_global_norm = 0.0  # a global norm grows with the width, and would couple the layers
  c.log_internal_metrics = True
  cfg = model.ModelConfig(V=1024, **c.model)
  mesh = sharding.make_mesh(1, -1)
  with jax.set_mesh(mesh):
    steps = step.build_steps(cfg, step.StepConfig.of(c), c.opt, c.seed, mesh)
    state, out = steps.state, []
    for batch in batches:
      state, m = steps.train_step(state, batch)
      out.append([kind_rms(jax.device_get(m), k) for k in KINDS])
  return np.array(out).T


def figure(results: dict, widths: list[int], file: str) -> None:
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  fig = Figure(figsize=(4 * len(KINDS), 3.2 * len(results)), dpi=100)
  for row, (name, rms) in enumerate(results.items()):
    for col, kind in enumerate(KINDS):
      ax = fig.add_subplot(len(results), len(KINDS), row * len(KINDS) + col + 1)
      for t in range(rms.shape[2]):
        color = (t / max(rms.shape[2] - 1, 1), 0.2, 1 - t / max(rms.shape[2] - 1, 1))
        ax.plot(widths, rms[:, col, t], 'o-', color=color, label=f'step {t + 1}')
      ax.set_xscale('log', base=2)
      ax.set_yscale('log')
      ax.set_title(f'{name}: {kind}', fontsize='small')
      ax.set_xlabel('width D', fontsize='small')
  fig.axes[0].legend(fontsize='xx-small')
  fig.tight_layout()
  FigureCanvasAgg(fig).print_png(file)


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument('--parameterizations', default='sp,mup')
  parser.add_argument('--widths', default='64,128,256,512,1024')
  parser.add_argument('--steps', type=int, default=10)
  parser.add_argument('--lr', type=float, default=1e-2)
  parser.add_argument('--tied', action='store_true', help='the head is the input embedding')
  parser.add_argument('--png', default='coord_check.png')
  args = parser.parse_args()
  widths = [int(w) for w in args.widths.split(',')]
  print(f'CPU: {cpu()}')
  print(f'widths {widths}, base width {widths[0]}, {args.steps} steps, AdamW at {args.lr:g}')
  print('head: ' + ('tied (ntk: untied)' if args.tied else 'untied (mup, mfp: starting at zero)'))
  c = default.get_config()
  c.model.L, c.batch_size, c.vocab_path = 64, 8, VOCAB
  with tempfile.TemporaryDirectory() as tmp:
    c.workdir = tmp
    inputs = load_inputs(c, sharding.make_mesh(1, -1))
    batches = [next(inputs.batches) for _ in range(args.steps)]
  results, summary = {}, []
  for name in args.parameterizations.split(','):
    rms = np.stack([run(name, D, widths[0], batches, args) for D in widths])  # width, kind, step
    results[name] = rms
    for k, kind in enumerate(KINDS):
      print(f'{name} {kind}: rms by step (rows) and width {widths} (columns)')
      for t in range(args.steps):
        print(f'  step {t + 1:2d}: ' + ' '.join(f'{x:9.3g}' for x in rms[:, k, t]))
    change = rms[:, :, 1:].max(axis=0) / rms[:, :, 1:].min(axis=0)
    worst = np.unravel_index(np.argmax(change), change.shape)
    summary.append(
      f"{name}: largest change of an activation's rms across widths {widths[0]}-{widths[-1]}: "
      f'{change.max():.1f}x ({list(KINDS)[worst[0]]}, step {worst[1] + 2})'
    )
  figure(results, widths, args.png)
  print('\n'.join(summary))
  print(f'figure: {args.png}')


if __name__ == '__main__':
  main()
