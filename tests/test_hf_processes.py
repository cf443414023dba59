"""A run started from a Hugging Face model by two processes, then exported, as one process does."""

import json
import os
import subprocess
import sys

import numpy as np
from conftest import CONFIG, MAIN, finish, free_port, text_config
from safetensors import numpy as safetensors_numpy

EXPORT_IN_TWO_PROCESSES = """
import sys
import jax
jax.distributed.initialize(f'localhost:{sys.argv[1]}', 2, int(sys.argv[2]))
from nanodo.tools import gguf_export, hf_export
for export in (hf_export.export, gguf_export.export):
  try:
    export(sys.argv[3], sys.argv[4])
  except ValueError as e:
    print(e)
"""


def _start(args: list[str], num_devices: int) -> subprocess.Popen:
  env = {**os.environ, 'XLA_FLAGS': f'--xla_force_host_platform_device_count={num_devices}'}
  return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _nanodo(path: str, hf: str, *args: str) -> list[str]:
  """`nanodo` training 2 steps from the model in hf, on two short texts beside path."""
  c = text_config(path, {})
  return [
    sys.executable,
    MAIN,
    f'--config={CONFIG}',
    f'--config.workdir={path}',
    f'--config.hf_init_dir={hf}',
    '--config.vocab_path=',
    '--config.ds_name=text',
    f'--config.train_split={c.train_split}',
    f'--config.eval_split={c.eval_split}',
    '--config.batch_size=8',
    '--config.eval_batch_size=8',
    '--config.opt.num_train_steps=2',
    '--config.opt.warmup_steps=0',
    '--config.opt.decay_type=constant',
    '--config.log_every_steps=1',
    '--config.checkpoint_every_steps=2',
    '--config.peak_tflops=1',
    *args,
  ]


def _losses(path: str) -> list[float]:
  with open(os.path.join(path, 'metrics.jsonl'), encoding='utf-8') as f:
    return [r['loss'] for r in map(json.loads, f) if 'loss' in r]


def _export(path: str, out: str) -> dict[str, np.ndarray]:
  """`nanodo export` of the run in path, as one process; its weights."""
  done = subprocess.run(
    [sys.executable, MAIN, 'export', f'--workdir={path}', f'--out={out}'],
    capture_output=True,
    text=True,
  )
  assert done.returncode == 0, done.stderr[-3000:]
  return safetensors_numpy.load_file(os.path.join(out, 'model.safetensors'))


def test_two_processes_import_train_and_export_as_one_process(hf_exports, tmp_path):
  """2 processes of 2 devices against 1 process of 4: about a minute (five processes)."""
  _, hf = hf_exports('llama')
  one, two = str(tmp_path / 'one'), str(tmp_path / 'two')
  single = _start(_nanodo(one, hf), 4)
  port = free_port()
  first, second = finish(
    *(
      _start(
        _nanodo(
          two,
          hf,
          f'--config.distributed.coordinator_address=localhost:{port}',
          '--config.distributed.num_processes=2',
          f'--config.distributed.process_id={i}',
        ),
        2,
      )
      for i in range(2)
    )
  )
  finish(single)
  assert 'step 0 parameters: the weights of' in first and 'step 0' not in second
  np.testing.assert_allclose(_losses(two), _losses(one), rtol=1e-5)
  assert len(_losses(two)) == 2
  # The model's own files were kept once, by process 0.
  kept = sorted(os.listdir(os.path.join(two, 'hf_files')))
  assert 'tokenizer.model' in kept and 'model.safetensors' not in kept
  a, b = _export(one, str(tmp_path / 'one_hf')), _export(two, str(tmp_path / 'two_hf'))
  source = safetensors_numpy.load_file(os.path.join(hf, 'model.safetensors'))
  assert sorted(a) == sorted(b) == sorted(source)
  for k in a:
    np.testing.assert_allclose(b[k], a[k], rtol=1e-4, atol=1e-6, err_msg=k)
  assert any(not np.allclose(a[k], source[k]) for k in a)  # trained, not the import's copy
  # Either export inside a program of two processes is refused in one line, writing nothing.
  port, out = free_port(), str(tmp_path / 'in_two')
  code = [sys.executable, '-c', EXPORT_IN_TWO_PROCESSES, str(port)]
  said = finish(*(_start([*code, str(i), two, out], 2) for i in range(2)))
  for line in said:
    refused = 'nanodo export runs as one process; this program has 2 (jax.process_count()): run '
    assert line.strip().splitlines() == [
      f'{refused}`nanodo export --workdir={two} --out={out}` once, on one host.',
      f'{refused}`nanodo export --workdir={two} --out={out} --format=gguf --dtype=float32` once, '
      'on one host.',
    ]
  assert not os.path.exists(out)
