"""Sweeps: the grid, its groups, each variant trained exactly as alone, divergence, the report."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import MAIN, cli, tiny_config
from tensorboard.backend.event_processing import event_accumulator

from nanodo import train
from nanodo.research import report, sweep


def _rows(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
    return [json.loads(line) for line in f]


def _losses(workdir: str, variant: int | None = None) -> dict[int, float]:
  rows = _rows(workdir)
  return {r['step']: r['loss'] for r in rows if 'loss' in r and r.get('variant') == variant}


def _nanodo(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, MAIN, *args], capture_output=True, text=True, timeout=600)


def _config(workdir: str, spec: str, **overrides):
  c = tiny_config(workdir, sweep=spec, **overrides)
  c.opt.update(warmup_steps=2, decay_type='cosine')
  return c


def test_the_grid_is_the_product_grouped_by_program():
  found = sweep.variants('opt.peak_learning_rate=1e-3,1e-2 model.qk_norm=False,True z_loss=0,1e-4')
  assert len(found) == 8
  assert found[1].values == {'opt.peak_learning_rate': 1e-3, 'model.qk_norm': False, 'z_loss': 1e-4}
  # qk_norm changes the program: two groups of four, each stacked.
  assert [v.group for v in found] == [0, 0, 1, 1, 0, 0, 1, 1]
  assert [v.index for v in found] == [0, 1, 0, 1, 2, 3, 2, 3]
  assert [len(g) for g in sweep.groups(found)] == [4, 4]


@pytest.mark.parametrize(
  'spec, message',
  [
    ('opt.nope=1,2', 'opt.nope is not a config key'),
    ('opt=1,2', 'opt is not a config key'),
    ('workdir=a,b', 'workdir cannot be swept'),
    ('mesh.fsdp=1,2', 'mesh.fsdp cannot be swept'),
    ('opt.b1=', "opt.b1='' is not valid: give one value or more"),
    ('opt.b1=0.9,', "opt.b1='0.9,' is not valid"),
    ('opt.b1', "'opt.b1': each item is key=v1,v2"),
    ('model.qk_norm=yes', "model.qk_norm='yes' is not valid: give True or False"),
    ('opt.b1=high', "opt.b1='high' is not valid: must be a float"),
    ('seed=1 seed=2', 'seed is given twice'),
    ('opt.b1=0.8,0.9,0.95 sweep_vmap=2', 'sweep_vmap cannot be swept'),
  ],
)
def test_a_bad_sweep_is_one_clear_line_before_any_work(tmp_path, spec, message):
  workdir = str(tmp_path / 'run')
  with pytest.raises(ValueError, match='^sweep') as e:
    train.train_and_evaluate(_config(workdir, spec))
  assert message in str(e.value)
  assert not os.path.exists(workdir)


def test_sweep_vmap_must_divide_every_group(tmp_path):
  c = _config(str(tmp_path / 'run'), 'opt.b1=0.8,0.9,0.95', sweep_vmap=2)
  with pytest.raises(ValueError, match=r'^sweep_vmap=2 is not valid: .* every group \(3\)'):
    train.train_and_evaluate(c)


def test_a_group_too_large_for_memory_is_refused_before_any_work(tmp_path):
  workdir = str(tmp_path / 'run')
  c = _config(workdir, 'opt.peak_learning_rate=' + ','.join(['1e-3'] * 64))
  c.model.update(D=4096, F=16384, N=24, H=32)
  with pytest.raises(ValueError, match=r'a group of 64 variants needs about \d+\.\d GiB'):
    train.train_and_evaluate(c)
  assert not os.path.exists(workdir)


def test_each_variant_trains_exactly_as_it_would_alone(tmp_path):
  spec = (
    'opt.peak_learning_rate=3e-3,3e-2 z_loss=0,1e-3 opt.b2=0.95,0.99 opt.decay_type=cosine,linear'
  )
  swept = str(tmp_path / 'sweep')
  result = train.train_and_evaluate(_config(swept, spec + ' label_smoothing=0.1'))
  found = sweep.read(swept)
  assert len(found) == 16 and {v.group for v in found} == {0}  # one stack of sixteen
  group = os.path.join(swept, 'groups', '0')
  for v in found[::5]:  # 0, 5, 10 and 15: every swept key at each of its values
    alone = str(tmp_path / f'alone{v.id}')
    expected = train.train_and_evaluate(sweep.with_values(_config(alone, ''), v.values))
    a, b = _losses(alone), _losses(group, v.id)
    assert sorted(b) == list(range(1, 7))
    np.testing.assert_allclose([b[s] for s in a], list(a.values()), rtol=1e-5)
    line = result['variants'][v.id]
    np.testing.assert_allclose(line['eval_loss'], expected['loss'], rtol=1e-5)
    np.testing.assert_allclose(line['bits_per_byte'], expected['bits_per_byte'], rtol=1e-5)
  # The variants did differ: the stack is not one run copied sixteen times.
  assert len({round(v['eval_loss'], 6) for v in result['variants']}) == 16


def test_variants_computed_two_at_a_time_train_the_same(tmp_path):
  spec = 'opt.warmup_steps=0,3 opt.weight_decay=0,0.1'
  runs = {
    n: train.train_and_evaluate(_config(str(tmp_path / str(n)), spec, sweep_vmap=n)) for n in (0, 2)
  }
  for v in range(4):
    a, b = (_losses(os.path.join(tmp_path, str(n), 'groups', '0'), v) for n in (0, 2))
    assert sorted(a) == list(range(1, 7))
    np.testing.assert_allclose([b[s] for s in a], list(a.values()), rtol=1e-5)
  assert [v['eval_loss'] for v in runs[0]['variants']] == pytest.approx(
    [v['eval_loss'] for v in runs[2]['variants']], rel=1e-5
  )


def test_a_diverging_variant_is_frozen_and_the_others_go_on(tmp_path, capsys):
  swept, alone = str(tmp_path / 'sweep'), str(tmp_path / 'alone')
  spec = 'opt.peak_learning_rate=1e-2,1e30'
  c = _config(swept, spec, checkpoint_every_steps=2, log_stability_metrics=True)
  result = train.train_and_evaluate(c)
  good, bad = result['variants']
  assert good['diverged_at'] is None and bad['diverged_at'] is not None
  assert f'variant 1 diverged at step {bad["diverged_at"]}' in capsys.readouterr().out
  # The diverged variant has no rows after its divergence; the good one is as if alone.
  group = os.path.join(swept, 'groups', '0')
  assert max(_losses(group, 1)) == bad['diverged_at']
  # Each variant's rows carry the stability metrics, the diverged one's up to its divergence.
  first = [r for r in _rows(group) if r['step'] == 1]
  assert sorted(r['variant'] for r in first) == [0, 1]
  assert all(r['stability/blocks/1/max_attention_logit'] > 0 for r in first)
  expected = train.train_and_evaluate(sweep.with_values(_config(alone, ''), good['values']))
  np.testing.assert_allclose(good['eval_loss'], expected['loss'], rtol=1e-5)
  # It counts as its loss at initialisation: the sensitivity is its distance from the best.
  (g,) = result['groups']
  assert g['best']['id'] == 0
  assert g['lr_sensitivity'] == pytest.approx((bad['initial_loss'] - good['eval_loss']) / 2)
  assert np.isfinite(bad['eval_loss'])  # frozen at its last finite state, which evaluates


@pytest.mark.slow
def test_a_stopped_sweep_resumes_with_the_same_losses(tmp_path, capsys):
  def run(workdir: str, num_steps: int) -> dict:
    c = _config(workdir, 'opt.peak_learning_rate=1e-2,3e-2 model.qk_norm=False,True')
    c.opt.update(num_train_steps=num_steps, warmup_steps=0, decay_type='constant')
    return train.train_and_evaluate(c)

  straight, interrupted = str(tmp_path / 'straight'), str(tmp_path / 'interrupted')
  run(straight, 9)
  run(interrupted, 6)
  capsys.readouterr()
  run(interrupted, 9)
  assert capsys.readouterr().out.count('resumed from checkpoint 6 in') == 2
  for g in ('0', '1'):
    for v in range(4):
      a = _losses(os.path.join(straight, 'groups', g), v)
      b = _losses(os.path.join(interrupted, 'groups', g), v)
      assert a == b and (sorted(a) == list(range(1, 10)) or not a)


def test_another_sweep_in_the_same_workdir_is_refused(tmp_path):
  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(_config(workdir, 'opt.peak_learning_rate=1e-3,1e-2'))
  with pytest.raises(ValueError, match='holds another sweep'):
    train.train_and_evaluate(_config(workdir, 'opt.peak_learning_rate=1e-3,3e-2'))


def test_the_command_trains_six_variants_in_two_groups_and_reports(tmp_path):
  workdir = str(tmp_path / 'run')
  spec = 'opt.peak_learning_rate=1e-3,1e-2,1e-1 model.qk_norm=False,True'
  tiny = tiny_config(workdir)
  args = [f'--config.workdir={workdir}', f'--config.vocab_path={tiny.vocab_path}']
  args += [f'--config.sweep={spec}', '--config.opt.num_train_steps=4', '--config.batch_size=4']
  args += [f'--config.model.{k}={v}' for k, v in dict(D=32, L=32, N=2, F=64).items()]
  args += ['--config.peak_tflops=1']
  out = cli(*args, cwd=str(tmp_path))
  assert out.returncode == 0, out.stderr[-3000:]
  assert sorted(os.listdir(os.path.join(workdir, 'groups'))) == ['0', '1']
  with open(os.path.join(workdir, report.REPORT), encoding='utf-8') as f:
    r = json.load(f)
  assert len(r['variants']) == 6 and len(r['groups']) == 2
  for v in r['variants']:
    assert v['eval_loss'] > 0 and v['bits_per_byte'] > 0 and v['diverged_at'] is None
  for g in r['groups']:
    assert set(g['fixed']) == {'model.qk_norm'} and g['lr_sensitivity'] >= 0
    assert g['best']['values']['opt.peak_learning_rate'] in (1e-3, 1e-2, 1e-1)
  assert os.path.getsize(os.path.join(workdir, report.FIGURE)) > 1000
  # TensorBoard holds each variant's rows under its own tag, as the jsonl does.
  group = os.path.join(workdir, 'groups', '1')
  events = event_accumulator.EventAccumulator(group, size_guidance={'scalars': 0})
  events.Reload()
  for v in {r['variant'] for r in _rows(group) if 'loss' in r}:
    read = {e.step: e.value for e in events.Scalars(f'v{v}/loss')}
    assert read == pytest.approx(_losses(group, v), rel=1e-6) and len(read) == 4
  assert 'LR sensitivity' in out.stdout
  # The report again, from the workdir; and one variant read back by eval.
  again = _nanodo('report', f'--workdir={workdir}')
  assert again.returncode == 0 and 'LR sensitivity' in again.stdout, again.stderr[-2000:]
  best = min(r['variants'], key=lambda v: v['eval_loss'])
  for variant in (3, None):
    flags = [f'--variant={variant}'] if variant is not None else []
    evaluated = _nanodo('eval', f'--workdir={workdir}', *flags)
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    expected = r['variants'][3] if variant is not None else best
    assert f'loss {expected["eval_loss"]:.4f}' in evaluated.stdout
  short = ['--max_new_tokens=10']
  sampled = _nanodo('sample', f'--workdir={workdir}', '--variant=5', '--prompt=ROMEO:', *short)
  sampled = sampled.stdout + sampled.stderr
  assert 'ROMEO:' in sampled and 'error' not in sampled, sampled[-2000:]
  out_dir = str(tmp_path / 'hf')
  exported = _nanodo('export', f'--workdir={workdir}', '--variant=2', f'--out={out_dir}')
  assert exported.returncode == 0, exported.stderr[-2000:]
  assert os.path.exists(os.path.join(out_dir, 'config.json'))
  bad = _nanodo('eval', f'--workdir={workdir}', '--variant=6')
  assert bad.returncode == 1
  assert bad.stderr.strip().splitlines() == [
    'error: variant=6 is not valid: the sweep has variants 0-5.'
  ]
