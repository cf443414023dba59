"""Host process settings: glibc's malloc tuned for XLA's CPU runtime."""

import ctypes
import os

# glibc's mallopt parameters (malloc.h).
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8
# A buffer this large or larger (bytes) is mapped when allocated and unmapped when freed.
HUGE = 1 << 30
# A step whose temporaries reach this many bytes gets one arena: glibc's other arenas grow by heaps
# of at most 64 MiB, and map anything larger afresh at every step.
ONE_ARENA_FROM = 64 << 20


def step_bytes(rows: int, L: int, D: int, F: int, H: int, N: int, V: int, block: int) -> int:
  """A rough upper bound on a float32 train step's temporaries: the activations its backward
  pass keeps for rows of L tokens, and three copies of the loss's block of logits."""
  per_token = N * (16 * D + 2 * F + 2 * H * L) + 2 * D
  return 4 * (rows * L * per_token + 3 * block * V)


def reuse_freed_memory(temporaries: int = ONE_ARENA_FROM) -> bool:
  """Makes glibc's malloc keep freed memory for reuse instead of returning it to the system.

  XLA on CPU allocates a step's buffers anew at every step, its temporaries as one buffer (0.96
  GB for benchmarks/train_throughput.py's M), on the thread that runs the step. By default glibc
  maps the large ones (from 128 KiB, a threshold it raises up to 32 MiB) afresh, paying their page
  faults at every step. Kept and never returned, they are reused: steps get 10-30% faster, and the
  process keeps its peak memory until it exits.
  Where they are kept matters. The step runs on a thread of XLA's, whose arena (one per thread, up
  to 8 per core) grows by heaps of at most 64 MiB: larger temporaries are mapped there whatever
  the threshold. So a step whose temporaries (bytes, e.g. step_bytes) reach ONE_ARENA_FROM gets
  one arena for all threads, the main one, which grows without that limit; a smaller one keeps
  glibc's arenas, as one arena serializes the threads' small allocations (10-20% on a 0.2M
  parameter model's 18 ms step). Buffers of HUGE bytes and more are still mapped: kept, they let
  a 135M model's fine-tune grow to 21 GB (9 GB mapped), as if smaller buffers split the hole one
  leaves and the next no longer fit. Call it before JAX starts its threads.
  Does nothing, and returns False, where malloc is not glibc's or the environment sets MALLOC_
  options itself.
  """
  if any(k.startswith('MALLOC_') for k in os.environ):
    return False
  try:
    mallopt = ctypes.CDLL(None).mallopt
  except (OSError, AttributeError):
    return False
  arenas = [mallopt(M_ARENA_MAX, 1) == 1] if temporaries >= ONE_ARENA_FROM else []
  return all(
    [*arenas, mallopt(M_MMAP_THRESHOLD, HUGE) == 1, mallopt(M_TRIM_THRESHOLD, 2**31 - 1) == 1]
  )
