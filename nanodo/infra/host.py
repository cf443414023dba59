"""Host process settings: glibc's malloc tuned for XLA's CPU runtime."""

import ctypes
import os

# glibc's mallopt parameters (malloc.h).
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8
# A buffer this large or larger (bytes) is mapped when allocated and unmapped when freed.
HUGE = 1 << 30


def reuse_freed_memory() -> bool:
  """Makes glibc's malloc keep freed memory for reuse instead of returning it to the system.

  XLA on CPU allocates a step's buffers anew at every step, its temporaries as one buffer (0.96
  GB for benchmarks/train_throughput.py's M). By default glibc maps the large ones (from 128 KiB,
  a threshold it raises up to 32 MiB) afresh, paying their page faults at every step, and spreads
  the others over one arena per thread. Kept in one arena and never returned, they are reused:
  steps get 10-30% faster, and the process keeps its peak memory until it exits. Buffers of HUGE
  bytes and more are still mapped: kept, they let a 135M model's fine-tune grow to 21 GB (9 GB
  mapped), as if smaller buffers split the hole one leaves and the next no longer fit, growing
  the heap by its size at every such step. Call it before JAX starts.
  Does nothing, and returns False, where malloc is not glibc's or the environment sets MALLOC_
  options itself.
  """
  if any(k.startswith('MALLOC_') for k in os.environ):
    return False
  try:
    mallopt = ctypes.CDLL(None).mallopt
  except (OSError, AttributeError):
    return False
  return all(
    [
      mallopt(M_ARENA_MAX, 1) == 1,
      mallopt(M_MMAP_THRESHOLD, HUGE) == 1,
      mallopt(M_TRIM_THRESHOLD, 2**31 - 1) == 1,
    ]
  )
