"""glibc's malloc settings: applied by default, left alone when the environment sets its own."""

import os
import platform
import subprocess
import sys

import pytest
from conftest import tiny_config

from nanodo.configs import default
from nanodo.infra import host
from nanodo.main import temporaries

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


MALLOC_CODE = """
import ctypes
from nanodo.infra import host
libc = ctypes.CDLL(None)
class Info(ctypes.Structure):
  _fields_ = [(n, ctypes.c_size_t) for n in 'a b c hblks d e f g h i'.split()]
libc.mallinfo2.restype, libc.malloc.restype = Info, ctypes.c_void_p
print(host.reuse_freed_memory())
for size in (64 << 20, host.HUGE):
  mapped = -libc.mallinfo2().hblks
  first = libc.malloc(size)
  mapped += libc.mallinfo2().hblks
  libc.free(ctypes.c_void_p(first))
  again = libc.malloc(size)
  print(size, mapped, first == again)
  libc.free(ctypes.c_void_p(again))
"""


@pytest.mark.skipif(platform.libc_ver()[0] != 'glibc', reason='mallopt is glibc-specific')
def test_freed_buffers_are_reused_from_one_heap_and_only_huge_ones_mapped():
  env = {k: v for k, v in os.environ.items() if not k.startswith('MALLOC_')}
  out = subprocess.run(
    [sys.executable, '-c', MALLOC_CODE], env=env, capture_output=True, text=True, check=True
  ).stdout.split('\n')
  assert out[0] == 'True'
  # 64 MiB, which glibc alone maps: from the heap, and the same memory again once freed.
  assert out[1] == f'{64 << 20} 0 True'
  assert out[2].split()[1] == '1'  # a huge one (host.HUGE) is mapped


THREAD_CODE = """
import ctypes, sys, threading
from nanodo.infra import host
libc = ctypes.CDLL(None)
class Info(ctypes.Structure):
  _fields_ = [(n, ctypes.c_size_t) for n in 'a b c hblks d e f g h i'.split()]
libc.mallinfo2.restype, libc.malloc.restype = Info, ctypes.c_void_p
print(host.reuse_freed_memory(int(sys.argv[1])))
def step():  # as XLA's thread allocates a step's temporaries
  mapped = -libc.mallinfo2().hblks
  buffer = libc.malloc(100 << 20)
  print(mapped + libc.mallinfo2().hblks)
  libc.free(ctypes.c_void_p(buffer))
thread = threading.Thread(target=step)
thread.start()
thread.join()
"""


@pytest.mark.skipif(platform.libc_ver()[0] != 'glibc', reason='mallopt is glibc-specific')
@pytest.mark.parametrize('temporaries, mapped', [(1 << 20, '1'), (64 << 20, '0')])
def test_a_large_steps_temporaries_are_kept_in_one_heap_a_small_ones_threads_keep_arenas(
  temporaries, mapped
):
  env = {k: v for k, v in os.environ.items() if not k.startswith('MALLOC_')}
  out = subprocess.run(
    [sys.executable, '-c', THREAD_CODE, str(temporaries)],
    env=env,
    capture_output=True,
    text=True,
    check=True,
  ).stdout.split()
  # A thread's own arena maps 100 MiB whatever the threshold; the one arena keeps it in its heap.
  assert out == ['True', mapped]


def test_the_step_temporaries_estimate_picks_one_arena_for_the_default_run_not_a_tiny_one():
  assert temporaries(default.get_config()) >= host.ONE_ARENA_FROM
  assert temporaries(tiny_config('')) < host.ONE_ARENA_FROM
  assert temporaries(tiny_config('', sweep='seed=0,1')) == host.ONE_ARENA_FROM
