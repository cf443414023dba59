"""Model, loss and optimizer options: each trains, keeps causality, restores and samples."""

import itertools
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import tiny_config, tiny_model_config, tiny_steps
from flax import nnx

from nanodo import data, model, optimizer, step, train
from nanodo.model import TransformerDecoder
from nanodo.tools import sample, trained

OPTIONS = [
  {'model.positions': 'rope'},
  {'model.positions': 'none'},
  {'model.norm': 'rmsnorm'},
  {'model.mlp': 'swiglu'},
  {'model.mlp': 'relu2'},
  {'model.zero_init': True},
  {'model.logit_softcap': 15.0},
  {'model.qk_norm': True},
  {'model.KV': 1},
  {'model.bias': 'all'},
  {'model.bias': 'qkv', 'model.K': 24, 'model.positions': 'rope'},
  {'model.positions': 'rope', 'model.rope_scaling': 'llama3:4,1,4,8'},
  {'model.tied': False},
  {'model.tied': False, 'model.zero_head': True},
  {'model.attention': 'dot_product_attention'},
  {'model.remat': True, 'model.remat_policy': 'dots_saveable'},
  {'label_smoothing': 0.1},
  {'z_loss': 1e-3},
  {'opt.optimizer': 'lion', 'opt.peak_learning_rate': 1e-3},
  {'opt.optimizer': 'adafactor'},
  {'opt.optimizer': 'adam_atan2'},
  {'opt.optimizer': 'muon', 'opt.peak_learning_rate': 2e-2},
  {'opt.decay_type': 'wsd'},
  {'opt.lr_multipliers': 'embed=0.5,blocks/0/=2'},
]


def _config(workdir: str, options: dict, steps: int = 12):
  c = tiny_config(workdir, checkpoint_every_steps=steps, log_every_steps=1)
  c.opt.update(num_train_steps=steps, warmup_steps=2, peak_learning_rate=1e-2)
  c.update_from_flattened_dict(options)
  return c


def _ids(options: dict) -> str:
  return ','.join(f'{k}={v}' for k, v in options.items())


def _program(c) -> tuple[str, list[np.ndarray]]:
  """The train step of run config c as it is compiled (lowered to StableHLO), and its start."""
  steps = tiny_steps(model.ModelConfig(V=1024, **c.model), c)
  batch = data.as_batch(np.ones((c.batch_size, c.model.L), np.int32))
  start = [np.asarray(x) for x in jax.tree.leaves(steps.state)]
  return steps.train_step.lower(steps.state, batch).as_text(), start


@pytest.mark.parametrize('options', OPTIONS, ids=_ids)
def test_each_option_trains_with_falling_loss(tmp_path, options):
  c = _config(str(tmp_path), options)
  # The option reaches the run: its step's program or its initial state is not the default's.
  (program, start), (default, default_start) = _program(c), _program(_config(str(tmp_path), {}))
  same_start = len(start) == len(default_start) and all(map(np.array_equal, start, default_start))
  assert program != default or not same_start
  c.log_internal_metrics = True
  train.train_and_evaluate(c)
  with open(tmp_path / 'metrics.jsonl', encoding='utf-8') as f:
    rows = [r for r in map(json.loads, f) if 'loss' in r]
  losses = [r['loss'] for r in rows]
  assert np.mean(losses[-3:]) < losses[0] - 0.3, losses
  # Every parameter takes part: one the option added but left unused would get no gradient.
  grads = {k: v for k, v in rows[-1].items() if k.startswith('grads/') and k.endswith('/rms')}
  assert len(grads) >= 10 and all(v > 0 for v in grads.values()), grads
  if 'label_smoothing' in options:
    assert rows[-1]['smoothed_loss'] > rows[-1]['loss']  # a trained model is sharper than uniform
  if 'z_loss' in options:
    assert all(r['z_loss'] > 0 for r in rows)


def _causal(cfg: model.ModelConfig) -> bool:
  m = TransformerDecoder(cfg, nnx.Rngs(0))
  x_BxL = jax.random.randint(jax.random.key(1), (2, cfg.L), 0, cfg.V)
  t = cfg.L // 2
  changed_BxL = x_BxL.at[:, t:].set((x_BxL[:, t:] + 1) % cfg.V)
  a, b = m(x_BxL), m(changed_BxL)
  return bool(np.allclose(a[:, :t], b[:, :t], atol=1e-5)) and not np.allclose(a[:, t:], b[:, t:])


@pytest.mark.parametrize(
  'positions,norm,mlp', list(itertools.product(model.POSITIONS, model.NORMS, model.MLPS))
)
def test_causality_holds_for_every_option_combination(positions, norm, mlp):
  for qk_norm, KV, tied, attention in itertools.product(
    (False, True), (0, 1), (True, False), model.ATTENTIONS
  ):
    cfg = tiny_model_config(
      positions=positions,
      norm=norm,
      mlp=mlp,
      qk_norm=qk_norm,
      KV=KV,
      tied=tied,
      attention=attention,
    )
    assert _causal(cfg), cfg


def test_softcap_bounds_the_logits_and_zero_init_starts_the_blocks_as_identities():
  x_BxL = jax.random.randint(jax.random.key(1), (2, 16), 0, 97)
  logits_BxLxV = TransformerDecoder(tiny_model_config(), nnx.Rngs(0))(x_BxL)
  capped = TransformerDecoder(tiny_model_config(logit_softcap=0.5), nnx.Rngs(0))(x_BxL)
  assert float(jnp.abs(logits_BxLxV).max()) > 0.5 > float(jnp.abs(capped).max())
  np.testing.assert_allclose(capped, 0.5 * jnp.tanh(logits_BxLxV / 0.5), atol=1e-6)
  m = TransformerDecoder(tiny_model_config(zero_init=True), nnx.Rngs(0))
  x_BxLxD = m._embed(x_BxL, jnp.broadcast_to(jnp.arange(16), x_BxL.shape))
  np.testing.assert_allclose(m.hidden(x_BxL), m.ln_f(x_BxLxD), atol=1e-6)  # every block adds 0


def test_rope_scores_depend_only_on_the_distance():
  q_1xLx1xK = jax.random.normal(jax.random.key(0), (1, 8, 1, 16))
  k_1xLx1xK = jax.random.normal(jax.random.key(1), (1, 8, 1, 16))
  pos_1xL = jnp.arange(8)[None]
  scores = lambda shift: jnp.einsum(
    'BLHK,BMHK->BLM',
    model.rope(q_1xLx1xK, pos_1xL + shift, 10_000.0),
    model.rope(k_1xLx1xK, pos_1xL + shift, 10_000.0),
  )
  np.testing.assert_allclose(scores(0), scores(37), atol=1e-4)
  assert not np.allclose(scores(0), jnp.einsum('BLHK,BMHK->BLM', q_1xLx1xK, k_1xLx1xK), atol=1e-3)


def test_grouped_query_attention_equals_multi_head_with_shared_key_value_heads():
  gqa = TransformerDecoder(tiny_model_config(H=4, KV=2), nnx.Rngs(0))
  mha = TransformerDecoder(tiny_model_config(H=4), nnx.Rngs(1))
  _, gqa_params = nnx.split(gqa)
  graphdef, mha_params = nnx.split(mha)
  mha_params = jax.tree.map(lambda x: x, gqa_params)  # same weights everywhere ...
  for block in mha_params['blocks'].values():  # ... with each key/value head used by 2 queries
    block['attn']['wkv_2xDxGxK'].value = jnp.repeat(block['attn']['wkv_2xDxGxK'].value, 2, axis=2)
  x_BxL = jax.random.randint(jax.random.key(2), (2, 16), 0, 97)
  np.testing.assert_allclose(gqa(x_BxL), nnx.merge(graphdef, mha_params)(x_BxL), atol=1e-5)
  kv_cache, mh_cache = sample.init_cache(gqa.cfg, 1), sample.init_cache(mha.cfg, 1)
  assert kv_cache[0][0].size * 2 == mh_cache[0][0].size


def test_dot_product_attention_gives_the_einsum_numbers(monkeypatch):
  calls = []
  fused = jax.nn.dot_product_attention
  monkeypatch.setattr(
    jax.nn, 'dot_product_attention', lambda *a, **k: calls.append(1) or fused(*a, **k)
  )
  for KV in (0, 1):
    einsum = TransformerDecoder(tiny_model_config(KV=KV), nnx.Rngs(0))
    graphdef, params = nnx.split(
      TransformerDecoder(tiny_model_config(KV=KV, attention='dot_product_attention'), nnx.Rngs(0))
    )
    x_BxL = jax.random.randint(jax.random.key(2), (2, 16), 0, 97)
    expected = einsum(x_BxL)
    assert not calls  # the einsum path computed it
    np.testing.assert_allclose(expected, nnx.merge(graphdef, params)(x_BxL), atol=1e-5)
    assert len(calls) == 2  # jax.nn.dot_product_attention did, in each layer
    calls.clear()


def test_label_smoothing_zero_is_cross_entropy_and_matches_optax():
  m = TransformerDecoder(tiny_model_config(), nnx.Rngs(0))
  graphdef, params = nnx.split(m)
  in_BxL = jax.random.randint(jax.random.key(3), (2, 16), 1, 97).at[1, 10:].set(0)
  opts = step.StepConfig.of(tiny_config('/unused')).loss
  batch = data.as_batch(in_BxL)
  objective, (parts, _, count) = step.loss_fn(params, graphdef, batch, opts, internal=False)
  assert float(objective) == float(parts['loss'])
  opts = opts._replace(label_smoothing=0.2)
  smoothed, (parts, _, count) = step.loss_fn(params, graphdef, batch, opts, internal=False)
  smoothed /= count
  logits_TxV = m(in_BxL)[:, :-1].reshape(-1, 97)
  y_T = in_BxL[:, 1:].reshape(-1)
  keep_T = y_T != 0
  labels_TxV = optax.smooth_labels(jax.nn.one_hot(y_T, 97), 0.2)
  expected = optax.softmax_cross_entropy(logits_TxV, labels_TxV)[keep_T].mean()
  assert float(smoothed) == pytest.approx(float(expected), rel=1e-5)


def test_wsd_schedule_holds_the_peak_then_decays():
  c = tiny_config('/unused')
  c.opt.update(
    num_train_steps=110,
    warmup_steps=10,
    decay_type='wsd',
    wsd_decay_fraction=0.2,
    peak_learning_rate=1.0,
    final_learning_rate=0.1,
  )
  lr = optimizer.get_schedule(c.opt)
  assert float(lr(10)) == pytest.approx(1.0) and float(lr(89)) == pytest.approx(1.0)
  assert float(lr(100)) == pytest.approx(0.55) and float(lr(110)) == pytest.approx(0.1)


def test_learning_rate_multipliers_scale_the_updates_by_path():
  params = {
    'embed_VxD': jnp.ones((4, 2)),
    'blocks': {'0': {'w_DxF': jnp.ones((2, 3))}, '1': {'w_DxF': jnp.ones((2, 3))}},
  }
  tx = optimizer.scale_by_path('embed=0.5,blocks/0/=2')
  updates, _ = tx.update(params, tx.init(params), params)
  assert float(updates['embed_VxD'][0, 0]) == 0.5
  assert float(updates['blocks']['0']['w_DxF'][0, 0]) == 2.0
  assert float(updates['blocks']['1']['w_DxF'][0, 0]) == 1.0


@pytest.mark.parametrize(
  'options',
  [
    {
      'model.positions': 'rope',
      'model.KV': 1,
      'model.mlp': 'swiglu',
      'model.norm': 'rmsnorm',
      'model.qk_norm': True,
      'model.tied': False,
    },
    {
      'model.positions': 'none',
      'model.attention': 'dot_product_attention',
      'opt.optimizer': 'muon',
    },
  ],
)
def test_checkpoints_of_options_restore_and_sample(tmp_path, options):
  c = _config(str(tmp_path), options, steps=3)
  train.train_and_evaluate(c)
  with open(tmp_path / 'metrics.jsonl', encoding='utf-8') as f:
    param_norm = [r['param_norm'] for r in map(json.loads, f) if 'param_norm' in r][-1]
  restored = trained.load(str(tmp_path))
  assert float(optax.tree.norm(restored.params)) == pytest.approx(param_norm, rel=1e-5)
  greedy = sample.Sampling(temperature=0.0)
  texts = sample.sample(restored, ['ROMEO:'], max_new_tokens=8, sampling=greedy)
  assert texts == sample.sample(restored, ['ROMEO:'], max_new_tokens=8, sampling=greedy)
  assert len(texts) == 1 and texts[0]
