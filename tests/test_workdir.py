"""The workdir: one writer at a time, even after a crash; config.json replaced atomically."""

import json
import os
import subprocess
import sys

import pytest
from conftest import tiny_config

from nanodo.infra import workdir

HOLD = """
import sys, time
from nanodo.infra import workdir
with workdir.claim(sys.argv[1]):
  print('locked', flush=True)
  time.sleep(600)
"""


def test_a_second_lock_on_a_workdir_fails_at_once_naming_the_holder(tmp_path):
  with workdir.claim(str(tmp_path)):
    with pytest.raises(ValueError, match=rf'is in use by another nanodo run \(pid {os.getpid()} '):
      with workdir.claim(str(tmp_path)):
        pass
  with workdir.claim(str(tmp_path)):  # free again once released
    pass


def test_the_lock_of_a_killed_process_is_free_at_once(tmp_path):
  p = subprocess.Popen(
    [sys.executable, '-c', HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True
  )
  try:
    assert p.stdout.readline() == 'locked\n'
    with pytest.raises(ValueError, match=rf'in use by another nanodo run \(pid {p.pid} '):
      with workdir.claim(str(tmp_path)):
        pass
  finally:
    p.kill()
    p.wait()
  with workdir.claim(str(tmp_path)):
    pass


def test_config_round_trips_and_is_replaced_whole(tmp_path):
  c = tiny_config(str(tmp_path))
  assert workdir.read_config(str(tmp_path)) is None
  workdir.write_config(c)
  assert workdir.read_config(str(tmp_path)) == json.loads(c.to_json())
  c.opt.num_train_steps = 99
  workdir.write_config(c)
  assert workdir.read_config(str(tmp_path))['opt']['num_train_steps'] == 99
  assert os.listdir(tmp_path) == [workdir.CONFIG]


def test_an_unreadable_config_is_an_error_not_a_fresh_start(tmp_path):
  with open(tmp_path / workdir.CONFIG, 'w', encoding='utf-8') as f:
    f.write('{"model": {"D": 3')
  with pytest.raises(ValueError, match='config.json is unreadable'):
    workdir.read_config(str(tmp_path))


def test_a_run_made_before_a_key_existed_reads_with_its_default(tmp_path):
  c = tiny_config(str(tmp_path))
  workdir.write_config(c)
  with open(tmp_path / workdir.CONFIG, encoding='utf-8') as f:
    older = json.load(f)
  del older['model']['norm_eps'], older['hf_init_dir']
  with open(tmp_path / workdir.CONFIG, 'w', encoding='utf-8') as f:
    json.dump(older, f)
  assert workdir.run_config(str(tmp_path)) == c
