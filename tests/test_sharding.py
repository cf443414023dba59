"""The mesh and shardings: many devices and processes train as one device does."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import VOCAB, finish, free_port, tiny_config, tiny_model_config, tiny_steps
from flax import nnx

from nanodo import sharding, train
from nanodo.data import as_batch, global_batch
from nanodo.model import TransformerDecoder

TESTS = os.path.dirname(__file__)
MAIN = os.path.join(os.path.dirname(train.__file__), 'main.py')
CONFIG = os.path.join(os.path.dirname(train.__file__), 'configs', 'default.py')


def train_steps(
  data: int, fsdp: int, grad_accumulation_steps: int = 1, num_steps: int = 3, B: int = 16, **model
) -> dict:
  """Losses of a few steps on one random batch, and each state array's per-device shape."""
  c = tiny_config('/unused', grad_accumulation_steps=grad_accumulation_steps)
  cfg = tiny_model_config(**model)
  mesh = sharding.make_mesh(data, fsdp)
  run = tiny_steps(cfg, c, mesh)
  state, step_fn = run.state, run.train_step
  batch_sharding = sharding.batch_sharding(mesh)
  in_BxL = np.random.default_rng(0).integers(1, cfg.V, (B, cfg.L), dtype=np.int32)
  losses = []
  with jax.set_mesh(mesh):
    for _ in range(num_steps):
      state, m = step_fn(state, global_batch(as_batch(in_BxL), batch_sharding))
      losses.append(float(m['loss']))
  shapes = {
    jax.tree_util.keystr(path, simple=True, separator='/'): (
      x.shape,
      x.addressable_shards[0].data.shape,
      len(x.sharding.device_set),
    )
    for path, x in jax.tree_util.tree_flatten_with_path(state)[0]
  }
  return {'losses': losses, 'shapes': shapes}


def _in_subprocess(code: str, num_devices: int) -> str:
  """Stdout of code run with num_devices fake CPU devices (the flag must not leak)."""
  env = {**os.environ, 'XLA_FLAGS': f'--xla_force_host_platform_device_count={num_devices}'}
  out = subprocess.run(
    [sys.executable, '-c', code], env=env, capture_output=True, text=True, cwd=TESTS, timeout=600
  )
  assert out.returncode == 0, out.stderr[-3000:]
  return out.stdout


EIGHT_DEVICES = """
import json, test_sharding
print(json.dumps({'fsdp8': test_sharding.train_steps(1, -1),
                  'data2_fsdp4': test_sharding.train_steps(2, 4)}))
print(test_sharding.wo_FxD_sharding(F=36))
"""


def wo_FxD_sharding(**model) -> str:
  """The first block's wo_FxD sharding on the default mesh (no compile: shapes only)."""
  abstract = nnx.state(
    nnx.eval_shape(lambda: TransformerDecoder(tiny_model_config(**model), nnx.Rngs(0)))
  )
  shardings = sharding.state_shardings(abstract, sharding.make_mesh(1, -1))
  return str(shardings['blocks'][0]['mlp']['wo_FxD'].value.spec)


@pytest.fixture(scope='module')
def eight_devices() -> dict:
  out = _in_subprocess(EIGHT_DEVICES, 8)
  lines = out.strip().splitlines()
  return {**json.loads(lines[0]), 'log': lines[1:]}


@pytest.fixture(scope='module')
def one_device() -> dict:
  return train_steps(1, -1)


def test_8_devices_train_as_1_device_does(eight_devices, one_device):
  one = one_device
  for run in ('fsdp8', 'data2_fsdp4'):
    np.testing.assert_allclose(eight_devices[run]['losses'], one['losses'], rtol=1e-5, err_msg=run)
  assert one['losses'][-1] < one['losses'][0]  # the steps learn


def test_each_device_holds_an_eighth_of_every_sharded_weight_and_its_optimizer_state(eight_devices):
  shapes = eight_devices['fsdp8']['shapes']
  sharded = {k: v for k, v in shapes.items() if len(v[0]) >= 2}
  # Every matrix (two embeddings; wq, wkv, wo, wi, wo in each of 2 blocks): the parameter and
  # both Adam moments.
  assert len(sharded) == 3 * (2 + 5 * 2)
  for name, (shape, local, num_devices) in shapes.items():
    assert num_devices == 8, name
    if len(shape) >= 2:
      assert np.prod(local) * 8 == np.prod(shape), name
      # Split along one dimension.
      assert sum(a != b for a, b in zip(shape, local, strict=True)) == 1, name
    else:  # LayerNorm scales, counters: replicated
      assert local == shape, name
  assert shapes['params/blocks/0/mlp/wi_DxF/value'][1] == [32 // 8, 64]
  assert shapes['opt_state/1/0/nu/blocks/0/mlp/wi_DxF/value'][1] == [32 // 8, 64]


def test_data_axis_replicates_what_fsdp_shards(eight_devices):
  for name, (shape, local, num_devices) in eight_devices['data2_fsdp4']['shapes'].items():
    assert num_devices == 8, name
    assert np.prod(local) * (4 if len(shape) >= 2 else 1) == np.prod(shape), name


def test_a_dimension_the_axis_does_not_divide_is_replicated_with_one_line(eight_devices):
  # F=36 does not divide by 8: wo_FxD, sharded along F, stays whole.
  assert eight_devices['log'] == [
    "Replicated, as a dimension does not divide its mesh axis {'data': 1, 'fsdp': 8}: "
    'wo_FxD (36, 32).',
    'P(None, None)',
  ]


def test_accumulating_4_micro_batches_equals_one_step_of_the_batch(one_device):
  accumulated = train_steps(1, -1, grad_accumulation_steps=4)
  np.testing.assert_allclose(accumulated['losses'], one_device['losses'], rtol=1e-5)


def _nanodo(workdir: str, num_devices: int, *args: str) -> subprocess.Popen:
  """`nanodo` training a tiny model on num_devices fake CPU devices."""
  env = {**os.environ, 'XLA_FLAGS': f'--xla_force_host_platform_device_count={num_devices}'}
  cmd = [
    sys.executable,
    MAIN,
    f'--config={CONFIG}',
    f'--config.workdir={workdir}',
    f'--config.vocab_path={VOCAB}',
    '--config.model.D=32',
    '--config.model.H=2',
    '--config.model.N=1',
    '--config.model.F=64',
    '--config.model.L=32',
    '--config.batch_size=8',
    '--config.eval_batch_size=64',
    '--config.log_every_steps=1',
    '--config.checkpoint_every_steps=2',
    '--config.opt.warmup_steps=0',
    '--config.opt.decay_type=constant',
    '--config.peak_tflops=1',
    *args,
  ]
  return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _two_processes(workdir: str, num_steps: int) -> list[str]:
  port = free_port()
  return finish(
    *(
      _nanodo(
        workdir,
        2,
        f'--config.opt.num_train_steps={num_steps}',
        f'--config.distributed.coordinator_address=localhost:{port}',
        '--config.distributed.num_processes=2',
        f'--config.distributed.process_id={i}',
      )
      for i in range(2)
    )
  )


def _losses(workdir: str) -> dict[int, float]:
  with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
    return {r['step']: r['loss'] for r in map(json.loads, f) if 'loss' in r}


@pytest.mark.slow
def test_two_processes_train_checkpoint_and_resume_as_one_process(tmp_path):
  two, one = str(tmp_path / 'two'), str(tmp_path / 'one')
  single = _nanodo(one, 4, '--config.opt.num_train_steps=6')
  first = _two_processes(two, 4)
  assert 'starting at step 0 of 4' in first[0]
  assert 'starting at' not in first[1] and 'loss' not in first[1]  # only process 0 logs
  assert sorted(os.listdir(os.path.join(two, 'checkpoints'))) == ['2', '4']
  # Each process saved its own data position.
  assert {'process_0-of-2.json', 'process_1-of-2.json'} <= set(
    os.listdir(os.path.join(two, 'checkpoints', '4', 'data'))
  )
  resumed = _two_processes(two, 6)
  assert 'starting at step 4 of 6' in resumed[0]
  finish(single)
  a, b = _losses(one), _losses(two)
  assert sorted(b) == list(range(1, 7))
  np.testing.assert_allclose([b[s] for s in range(1, 7)], [a[s] for s in range(1, 7)], rtol=1e-5)
