"""The MFU's peak: a known GPU's or TPU's datasheet figure for the compute dtype, else measured."""

import time
import types

import jax
import pytest
from conftest import tiny_config

from nanodo.ground.console import Progress
from nanodo.infra import metrics, peaks

H100 = 'NVIDIA H100 80GB HBM3'  # the device kind of an H100 SXM


def _devices(monkeypatch, kind: str, platform: str, count: int) -> None:
  """What jax says of the devices: count of them, of a kind, on a platform."""
  device = types.SimpleNamespace(device_kind=kind, platform=platform)
  monkeypatch.setattr(jax, 'devices', lambda *_: [device] * count)
  monkeypatch.setattr(jax, 'device_count', lambda *_: count)


def _no_measuring(monkeypatch) -> None:
  def measure(dtype, seconds=0.5):
    raise AssertionError('a known chip or a given peak needs no matmul')

  monkeypatch.setattr(peaks, 'matmul_flops_per_sec', measure)


@pytest.mark.parametrize(
  'kind, name',
  [
    (H100, 'NVIDIA H100 SXM'),
    ('NVIDIA H100 PCIe', 'NVIDIA H100 PCIe'),
    ('NVIDIA H100 NVL', 'NVIDIA H100 NVL'),
    ('NVIDIA A100-SXM4-80GB', 'NVIDIA A100'),
    ('NVIDIA A100 80GB PCIe', 'NVIDIA A100'),
    ('NVIDIA H200', 'NVIDIA H200 SXM'),
    ('NVIDIA H200 NVL', 'NVIDIA H200 NVL'),
    ('NVIDIA GH200 480GB', 'NVIDIA GH200'),
    ('NVIDIA B200', 'NVIDIA B200'),
    ('NVIDIA L4', 'NVIDIA L4'),
    ('NVIDIA L40S', 'NVIDIA L40S'),
    ('NVIDIA L40', None),
    ('TPU v4', 'TPU v4'),
    ('TPU v4 lite', None),
    ('TPU v5 lite', 'TPU v5e'),
    ('TPU v5', 'TPU v5p'),
    ('TPU v5p', 'TPU v5p'),
    ('TPU v6 lite', 'TPU v6e'),
    ('cpu', None),
  ],
)
def test_device_kinds_find_their_chip(kind, name):
  found = peaks.chip(kind)
  assert (found and found.name) == name


# Dense TFLOP/s per chip as the datasheets print them, (bfloat16, TF32) for NVIDIA; half the
# figures they print with 2:4 sparsity where they print only those.
PUBLISHED = {
  'NVIDIA A100-SXM4-80GB': (312, 156),  # A100 datasheet: BF16 312, TF32 156 (dense)
  H100: (1979 / 2, 989 / 2),  # H100 SXM: BF16 1,979*, TF32 989*
  'NVIDIA H100 PCIe': (1513 / 2, 756 / 2),  # H100 PCIe: BF16 1,513*, TF32 756*
  'NVIDIA H100 NVL': (1671 / 2, 835 / 2),  # H100 NVL: BF16 1,671*, TF32 835*
  'NVIDIA H200': (1979 / 2, 989 / 2),  # H200 SXM: as the H100 SXM
  'NVIDIA H200 NVL': (1671 / 2, 835 / 2),  # H200 NVL: BF16 1,671*, TF32 835*
  'NVIDIA GH200 480GB': (1979 / 2, 989 / 2),  # GH200: BF16 1,979*, TF32 989*
  'NVIDIA B200': (4500 / 2, 2200 / 2),  # HGX B200, per GPU: BF16 4.5 PF*, TF32 2.2 PF*
  'NVIDIA L40S': (362.05, 183),  # L40S: BF16 362.05 | 733*, TF32 183 | 366*
  'NVIDIA L4': (242 / 2, 120 / 2),  # L4: BF16 242*, TF32 120*
  'TPU v4': (275, 275),  # Cloud TPU docs, bf16 per chip; float32 matmuls at that rate
  'TPU v5 lite': (197, 197),
  'TPU v5p': (459, 459),
  'TPU v6 lite': (918, 918),
}


@pytest.mark.parametrize('kind', PUBLISHED)
@pytest.mark.parametrize('dtype', ['bfloat16', 'float32'])
def test_each_chip_has_its_published_dense_peak(monkeypatch, kind, dtype):
  _devices(monkeypatch, kind, 'tpu' if kind.startswith('TPU') else 'gpu', 2)
  _no_measuring(monkeypatch)
  flops, _ = peaks.devices_peak(0.0, dtype)
  assert flops == pytest.approx(PUBLISHED[kind][dtype == 'float32'] * 1e12 * 2, rel=1e-9)


@pytest.mark.parametrize('dtype', ['bfloat16', 'float32'])
def test_a_known_gpu_gives_its_datasheet_peak_for_the_compute_dtype(monkeypatch, dtype):
  _devices(monkeypatch, H100, 'gpu', 8)
  _no_measuring(monkeypatch)
  flops, line = peaks.devices_peak(0.0, dtype)
  h100 = peaks.chip(H100)
  published = PUBLISHED[H100][dtype == 'float32']
  assert flops == published * 1e12 * 8
  assert line.startswith(f'{published:.4g} TFLOP/s per chip x 8 ({dtype}')
  assert h100.source in line and ('TF32' in line) == (dtype == 'float32')


@pytest.mark.parametrize('dtype', ['bfloat16', 'float32'])
def test_a_known_tpu_runs_float32_matmuls_at_its_bfloat16_peak(monkeypatch, dtype):
  _devices(monkeypatch, 'TPU v5 lite', 'tpu', 4)
  _no_measuring(monkeypatch)
  flops, line = peaks.devices_peak(0.0, dtype)
  assert flops == 197e12 * 4
  assert 'per chip x 4' in line and 'TPU v5e' in line
  assert ('one bfloat16 pass' in line) == (dtype == 'float32')


@pytest.mark.parametrize('dtype', ['bfloat16', 'float32'])
def test_an_unknown_device_times_a_matmul_in_the_compute_dtype(monkeypatch, dtype):
  _devices(monkeypatch, 'Some Future Chip', 'cpu', 2)
  dot, dtypes = jax.numpy.dot, set()
  monkeypatch.setattr(jax.numpy, 'dot', lambda a, b: dtypes.add(a.dtype) or dot(a, b))
  start = time.perf_counter()
  flops, line = peaks.devices_peak(0.0, dtype)
  assert time.perf_counter() - start >= 0.5  # long enough to mean something
  assert dtypes == {jax.numpy.dtype(dtype)}
  assert flops > 0 and f'TFLOP/s per device x 2, measured ({dtype} ' in line
  assert line.endswith('matmul on cpu)')


def test_a_float32_precision_other_than_the_default_is_measured(monkeypatch):
  _devices(monkeypatch, H100, 'gpu', 1)
  monkeypatch.setattr(peaks, 'matmul_flops_per_sec', lambda dtype: (7e12, 64))
  with jax.default_matmul_precision('highest'):
    assert peaks.devices_peak(0.0, 'float32')[0] == 7e12
    assert peaks.devices_peak(0.0, 'bfloat16')[0] == 989.5e12
  monkeypatch.setenv('NVIDIA_TF32_OVERRIDE', '0')
  assert peaks.devices_peak(0.0, 'float32')[0] == 7e12


def test_a_given_peak_overrides_the_device(monkeypatch):
  _devices(monkeypatch, H100, 'gpu', 8)
  _no_measuring(monkeypatch)
  flops, line = peaks.devices_peak(2.5, 'bfloat16')
  assert flops == 2.5e12 and 'peak_tflops' in line


@pytest.mark.parametrize('dtype', ['bfloat16', 'float32'])
def test_the_step_logger_logs_the_peak_of_the_model_dtype_once(tmp_path, monkeypatch, dtype):
  _devices(monkeypatch, H100, 'gpu', 8)
  _no_measuring(monkeypatch)
  lines = []
  monkeypatch.setattr(metrics, 'log', lines.append)
  c = tiny_config(str(tmp_path), peak_tflops=0.0)
  c.model.dtype = dtype
  with Progress(bar=False) as progress:
    writer = metrics.Writer(c.workdir, 0, c.to_dict())
    logger = metrics.StepLogger(writer, progress, 0, 6, 1, 64, 1.0, c.peak_tflops, c.model.dtype)
    logger.close()
  assert logger.peak_flops == PUBLISHED[H100][dtype == 'float32'] * 1e12 * 8
  [line] = [line for line in lines if line.startswith('MFU peak: ')]
  assert f'per chip x 8 ({dtype}' in line
