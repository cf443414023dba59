"""Stability metrics: the largest attention logit of each layer, the output logits, log Z²."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_model_config
from flax import nnx

from nanodo import data, model, step
from nanodo.loss import Options

OPTS = Options(label_smoothing=0.0, z_loss=0.0, squares=False, block_size=64)


def _batch(cfg, seed=0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(1, cfg.V, (3, cfg.L), dtype=np.int32)
  ids[1, 7:] = 0  # padding: attends to nothing, no target
  return {k: jnp.asarray(v) for k, v in data.as_batch(ids).items()}


def _by_hand(decoder, batch, cfg) -> dict[str, float]:
  """Each block's largest q·k/√K over its visible positions, from the block's normed input."""
  capture = nnx.capture(decoder.hidden, nnx.Intermediate, method_outputs=nnx.Intermediate)
  _, outputs = capture(batch['x'], batch['segment_ids'], batch['positions'])
  flat = {'/'.join(map(str, p)): x for p, x in nnx.to_flat_state(outputs)}
  seg = batch['segment_ids']
  visible = jnp.tril(jnp.ones((cfg.L, cfg.L), bool)) & (seg[:, :, None] == seg[:, None, :])
  found = {}
  for n, block in enumerate(decoder.blocks):
    x = next(v for k, v in flat.items() if k.startswith(f'blocks/{n}/ln1/'))
    x = x.get_value() if hasattr(x, 'get_value') else x
    x = x[0] if isinstance(x, tuple) else x
    q = jnp.einsum('BLD,DHK->BHLK', x, block.attn.wq_DxHxK[...])
    k = jnp.einsum('BLD,DHK->BHLK', x, block.attn.wkv_2xDxGxK[...][0])
    att = jnp.einsum('BHLK,BHMK->BHLM', q, k) / np.sqrt(q.shape[-1])
    found[f'blocks/{n}'] = float(jnp.max(jnp.where(visible[:, None], att, -jnp.inf)))
  return found


@pytest.mark.parametrize('remat', [False, True])
def test_the_largest_attention_logit_of_each_layer(remat):
  cfg = tiny_model_config(N=3, remat=remat)
  decoder = model.TransformerDecoder(cfg, nnx.Rngs(0))
  graphdef, params = nnx.split(decoder)
  batch = _batch(cfg)
  _, (_, stats, _) = step.loss_fn(params, graphdef, batch, OPTS, internal=False, stability=True)
  expected = _by_hand(model.TransformerDecoder(cfg, nnx.Rngs(0)), batch, cfg)
  for layer, value in expected.items():
    np.testing.assert_allclose(stats[f'stability/{layer}/max_attention_logit'], value, rtol=1e-5)
  assert len([k for k in stats if k.endswith('max_attention_logit')]) == 3
  # The output logits and the mean squared log-normalizer over the targets.
  logits = decoder(batch['x'], batch['segment_ids'], batch['positions'])
  np.testing.assert_allclose(stats['stability/output_logit_max'], jnp.max(logits), rtol=1e-5)
  np.testing.assert_allclose(stats['stability/output_logit_mean'], jnp.mean(logits), rtol=1e-5)
  w = batch['weights']
  logz2 = jnp.sum(jax.nn.logsumexp(logits, -1) ** 2 * w) / jnp.sum(w)
  np.testing.assert_allclose(stats['stability/logz_squared'], logz2, rtol=1e-5)


def test_with_internal_metrics_too_and_off_by_default():
  cfg = tiny_model_config()
  graphdef, params = nnx.split(model.TransformerDecoder(cfg, nnx.Rngs(0)))
  batch = _batch(cfg)
  _, (_, both, _) = step.loss_fn(params, graphdef, batch, OPTS, internal=True, stability=True)
  _, (_, internal, _) = step.loss_fn(params, graphdef, batch, OPTS, internal=True)
  # The sown maxima are stability metrics only: the layer statistics are those of before.
  assert set(both) == set(internal) | {k for k in both if k.startswith('stability/')}
  assert len([k for k in both if k.startswith('stability/')]) == cfg.N + 3
  _, (_, none, _) = step.loss_fn(params, graphdef, batch, OPTS, internal=False)
  assert none == {}
