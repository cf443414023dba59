"""glibc's malloc settings: applied by default, left alone when the environment sets its own."""

import os
import platform
import subprocess
import sys

import pytest

CODE = 'from nanodo.infra import host; print(host.reuse_freed_memory())'


def _run(env: dict[str, str]) -> str:
  env = {k: v for k, v in os.environ.items() if not k.startswith('MALLOC_')} | env
  return subprocess.run(
    [sys.executable, '-c', CODE], env=env, capture_output=True, text=True, check=True
  ).stdout.strip()


@pytest.mark.skipif(platform.libc_ver()[0] != 'glibc', reason='mallopt is glibc-specific')
def test_malloc_is_set_unless_the_environment_sets_it():
  assert _run({}) == 'True'
  assert _run({'MALLOC_ARENA_MAX': '8'}) == 'False'
