"""Parameterizations in runs: the refusals, export, resume, several devices and sampling."""

import json
import os

import numpy as np
import pytest
from conftest import tiny_config, tiny_model_config
from test_sharding import _in_subprocess, train_steps

from nanodo import train
from nanodo.infra import validate
from nanodo.tools import hf_families, sample, trained


def _set(c, overrides: dict):
  for k, v in overrides.items():
    c[k.split('.')[0]][k.split('.')[1]] = v
  return c


def _losses(workdir: str) -> dict[int, float]:
  with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
    return {r['step']: r['loss'] for r in map(json.loads, f) if 'loss' in r}


@pytest.mark.parametrize(
  'overrides, key, message',
  [
    ({'model.parameterization': 'spp'}, 'model.parameterization', "('sp', 'mup', 'ntk', 'mfp')"),
    ({'model.parameterization': 'ntk'}, 'model.base_width', 'ntk needs the width'),
    ({'model.parameterization': 'mfp'}, 'model.base_width', 'mfp needs the width'),
    (
      {'model.parameterization': 'mfp', 'model.base_width': 16, 'opt.optimizer': 'lion'},
      'opt.optimizer',
      "must be 'adamw' or 'adam_atan2' with mfp",
    ),
    (
      {'model.parameterization': 'mup', 'model.base_width': 16, 'opt.optimizer': 'muon'},
      'opt.optimizer',
      'lion, muon: none published',
    ),
    (
      {'model.parameterization': 'mup', 'model.base_width': 16, 'opt.optimizer': 'adafactor'},
      'opt.optimizer',
      "adafactor's is not built here",
    ),
    (
      {'model.parameterization': 'ntk', 'model.base_width': 16},
      'model.tied',
      'must be False with ntk: its head and embedding learn at different rates',
    ),
  ],
)
def test_a_bad_parameterization_is_refused_by_name(overrides, key, message):
  c = _set(tiny_config('/unused'), overrides)
  with pytest.raises(validate.ConfigError) as e:
    validate.check(c)
  assert str(e.value).startswith(f'{key}=') and message in str(e.value), str(e.value)
  assert '\n' not in str(e.value)


@pytest.mark.parametrize('name', ['mup', 'ntk', 'mfp'])
def test_export_and_import_refuse_every_parameterization_but_sp_by_name(name):
  keys = dict(tiny_model_config(parameterization=name, base_width=16, tied=False).__dict__)
  with pytest.raises(ValueError, match=rf"model.parameterization='{name}' has no Hugging Face"):
    hf_families.family(keys)
  c = _set(tiny_config('/unused'), {'model.parameterization': name, 'model.base_width': 16})
  c.model.tied, c.hf_init_dir = False, '/some/hf/model'
  with pytest.raises(validate.ConfigError, match=f'trained without {name}'):
    validate.check(c)


def test_an_ntk_run_resumes_with_the_same_numbers_restores_and_samples(tmp_path):
  def run(workdir: str, num_steps: int) -> None:
    c = tiny_config(workdir, checkpoint_every_steps=3)
    c.model.update(D=64, parameterization='ntk', base_width=16, tied=False)  # m = 4
    c.opt.update(num_train_steps=num_steps, warmup_steps=0, decay_type='constant')
    train.train_and_evaluate(c)

  straight, interrupted = str(tmp_path / 'straight'), str(tmp_path / 'interrupted')
  run(straight, 6)
  run(interrupted, 3)
  run(interrupted, 6)
  assert _losses(straight) == _losses(interrupted)  # float32 on CPU: bit-identical
  restored = trained.load(interrupted)
  greedy = sample.Sampling(temperature=0.0)
  texts = sample.sample(restored, ['ROMEO:'], max_new_tokens=8, sampling=greedy)
  assert texts == sample.sample(restored, ['ROMEO:'], max_new_tokens=8, sampling=greedy)
  assert len(texts) == 1 and texts[0]


def test_mfp_on_two_devices_trains_as_on_one():
  model = "parameterization='mfp', base_width=16, D=64"
  code = f'import json, test_sharding\nprint(json.dumps(test_sharding.train_steps(1, -1, {model})))'
  two = json.loads(_in_subprocess(code, 2).strip().splitlines()[-1])
  one = train_steps(1, -1, parameterization='mfp', base_width=16, D=64)
  np.testing.assert_allclose(two['losses'], one['losses'], rtol=1e-5)
  assert one['losses'][-1] < one['losses'][0]
