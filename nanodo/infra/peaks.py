"""The devices' peak FLOP/s for the MFU: a known chip's datasheet figure, else a timed matmul."""

import os
import re
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp


class Chip(NamedTuple):
  """A chip's dense (not sparse) peak TFLOP/s: bfloat16, and float32 at XLA's default precision."""

  kind: str  # a regular expression searched in jax.Device.device_kind
  name: str
  bfloat16: float
  float32: float
  source: str


# Per chip, which is one JAX device on each of these. NVIDIA's datasheets give the tensor-core
# rates with 2:4 sparsity; these are half of them (the dense rates).
# float32 is the rate of a float32 matmul at XLA's default precision, which is what a float32 model
# runs at: TF32 on NVIDIA's tensor cores (jax-ml/jax#4873, #18934), one bfloat16 pass on TPUs
# (jax-ml/jax#1856). Against the plain float32 rate (H100 SXM: 67) such a run's MFU would exceed 1.
# A precision set by jax_default_matmul_precision or NVIDIA_TF32_OVERRIDE=0 is measured instead.
H100_SXM, H100_NVL = (989.5, 494.5), (835.5, 417.5)
CHIPS = (
  Chip(r'\bA100\b', 'NVIDIA A100', 312, 156, 'NVIDIA A100 Tensor Core GPU datasheet'),
  Chip(r'\bH100 PCIe', 'NVIDIA H100 PCIe', 756.5, 378, 'NVIDIA H100 Tensor Core GPU datasheet'),
  Chip(r'\bH100 NVL', 'NVIDIA H100 NVL', *H100_NVL, 'NVIDIA H100 Tensor Core GPU datasheet'),
  Chip(r'\bH100\b', 'NVIDIA H100 SXM', *H100_SXM, 'NVIDIA H100 Tensor Core GPU datasheet'),
  Chip(r'\bH200 NVL', 'NVIDIA H200 NVL', *H100_NVL, 'NVIDIA H200 Tensor Core GPU datasheet'),
  Chip(r'\bH200\b', 'NVIDIA H200 SXM', *H100_SXM, 'NVIDIA H200 Tensor Core GPU datasheet'),
  Chip(r'\bGH200\b', 'NVIDIA GH200', *H100_SXM, 'NVIDIA GH200 Grace Hopper Superchip datasheet'),
  Chip(r'\bB200\b', 'NVIDIA B200', 2250, 1100, 'NVIDIA HGX B200 datasheet (per GPU)'),
  Chip(r'\bL40S\b', 'NVIDIA L40S', 362.05, 183, 'NVIDIA L40S GPU datasheet'),
  Chip(r'\bL4\b', 'NVIDIA L4', 121, 60, 'NVIDIA L4 Tensor Core GPU datasheet'),
  # Cloud TPU's system architecture pages: peak compute per chip (bf16).
  Chip(r'^TPU v4$', 'TPU v4', 275, 275, 'Cloud TPU v4 documentation'),
  Chip(r'^TPU v5( lite|e)$', 'TPU v5e', 197, 197, 'Cloud TPU v5e documentation'),
  Chip(r'^TPU v5p?$', 'TPU v5p', 459, 459, 'Cloud TPU v5p documentation'),
  Chip(r'^TPU v6( lite|e)$', 'TPU v6e', 918, 918, 'Cloud TPU v6e documentation'),
)

# How each maker's chips run a float32 matmul at XLA's default precision.
FLOAT32_AS = {'NVIDIA': 'TF32', 'TPU': 'one bfloat16 pass'}


def chip(kind: str) -> Chip | None:
  """The first chip whose pattern a device kind matches; None for CPUs and unknown devices."""
  return next((c for c in CHIPS if re.search(c.kind, kind)), None)


def matmul_flops_per_sec(dtype: str, seconds: float = 0.5) -> tuple[float, int]:
  """FLOP/s of a jitted n x n matmul in dtype on the default device, timed over >= seconds; n."""
  # Large enough to keep an accelerator busy; a CPU takes ~20 ms for n = 1024.
  n = 1024 if jax.devices()[0].platform == 'cpu' else 8192
  a, b = (jax.random.normal(jax.random.key(i), (n, n), dtype) for i in range(2))
  dot = jax.jit(jnp.dot)
  dot(a, b).block_until_ready()  # compiles
  # Rounds of twice as many matmuls, each round waited for once: no per-call synchronisation.
  reps = 1
  while True:
    start = time.perf_counter()
    for _ in range(reps):
      out = dot(a, b)
    out.block_until_ready()
    elapsed = time.perf_counter() - start
    if elapsed >= seconds:
      return 2 * n**3 * reps / elapsed, n
    reps *= 2


def _default_float32_precision() -> bool:
  """Whether float32 matmuls run at XLA's default precision (what CHIPS' float32 assumes)."""
  unset = jax.config.jax_default_matmul_precision is None
  return unset and os.environ.get('NVIDIA_TF32_OVERRIDE') != '0'


def devices_peak(peak_tflops: float, dtype: str) -> tuple[float, str]:
  """Peak FLOP/s of all devices for matmuls in dtype, and where it comes from, for the log.

  peak_tflops > 0 is taken as given; else a known chip's figure; else a matmul timed at once.
  """
  if peak_tflops > 0:
    return peak_tflops * 1e12, f'{peak_tflops:.4g} TFLOP/s, all devices (config peak_tflops)'
  device, count = jax.devices()[0], jax.device_count()
  found = chip(device.device_kind)
  if found and (dtype == 'bfloat16' or _default_float32_precision()):
    tflops = found.bfloat16 if dtype == 'bfloat16' else found.float32
    runs_as = '' if dtype == 'bfloat16' else f' as {FLOAT32_AS[found.name.split()[0]]}'
    how = f'{dtype}{runs_as}, {found.name}: {found.source}'
    return tflops * 1e12 * count, f'{tflops:.4g} TFLOP/s per chip x {count} ({how})'
  flops, n = matmul_flops_per_sec(dtype)
  how = f'{dtype} {n}x{n} matmul on {device.platform}'
  return flops * count, f'{flops / 1e12:.3g} TFLOP/s per device x {count}, measured ({how})'
