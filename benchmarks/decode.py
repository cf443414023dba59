"""Greedy decoding speed with the KV cache and without it, on the default model size.

  python benchmarks/decode.py

Without the cache, every new token re-runs the full forward pass over the row (L tokens: the
prompt, the tokens so far and padding). Both loops run under one jit; compile time is excluded.
"""

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nanodo.configs import default
from nanodo.ground.tree import PyTree
from nanodo.model import ModelConfig, TransformerDecoder
from nanodo.tools import sample

NEW_TOKENS = 512
PROMPT_TOKENS = 8
BATCH = 1


def _uncached_step(model: TransformerDecoder, t: jax.Array, x_BxL: jax.Array) -> jax.Array:
  """The full forward pass, then the greedy token at position t."""
  logits_BxLxV = model(x_BxL)
  return x_BxL.at[:, t].set(jnp.argmax(logits_BxLxV[:, t - 1], axis=-1).astype(jnp.int32))


@functools.partial(jax.jit, static_argnames=('graphdef', 'max_new_tokens'))
def generate_uncached(
  graphdef: nnx.GraphDef, params: PyTree, prompt_BxP: jax.Array, *, max_new_tokens: int
) -> jax.Array:
  """Greedy new tokens, re-running the full forward pass for each."""
  model = nnx.merge(graphdef, params)
  B, P = prompt_BxP.shape
  x_BxL = jnp.zeros((B, model.cfg.L), jnp.int32).at[:, :P].set(prompt_BxP)
  x_BxL = jax.lax.fori_loop(P, P + max_new_tokens, functools.partial(_uncached_step, model), x_BxL)
  return x_BxL[:, P : P + max_new_tokens]


def _tokens_per_sec(compiled: jax.stages.Compiled, *args: jax.Array) -> tuple[float, np.ndarray]:
  start = time.perf_counter()
  out = np.asarray(jax.block_until_ready(compiled(*args)))
  return BATCH * NEW_TOKENS / (time.perf_counter() - start), out


def main() -> None:
  c = default.get_config()
  # The default size, with room in the context for the prompt and every new token.
  cfg = ModelConfig(V=c.vocab_size, **{**c.model, 'L': PROMPT_TOKENS + NEW_TOKENS})
  graphdef, params = nnx.split(TransformerDecoder(cfg, nnx.Rngs(0)))
  num_params = sum(x.size for x in jax.tree.leaves(params))
  print(
    f'{cfg}, {num_params / 1e6:.2f}M parameters, {jax.device_count()} {jax.default_backend()} '
    f'devices; batch {BATCH}, {PROMPT_TOKENS} prompt tokens, {NEW_TOKENS} new tokens (greedy).'
  )
  prompt_BxP = jax.random.randint(jax.random.key(1), (BATCH, PROMPT_TOKENS), 4, cfg.V)
  length_B = jnp.full((BATCH,), PROMPT_TOKENS, jnp.int32)
  keys_B = sample.row_keys(0, BATCH)
  cached = sample.generate.lower(
    graphdef,
    params,
    prompt_BxP,
    length_B,
    keys_B,
    max_new_tokens=NEW_TOKENS,
    sampling=sample.Sampling(temperature=0.0),
    eos_id=-1,
  ).compile()
  uncached = generate_uncached.lower(
    graphdef, params, prompt_BxP, max_new_tokens=NEW_TOKENS
  ).compile()
  with_cache, out_cached = _tokens_per_sec(cached, params, prompt_BxP, length_B, keys_B)
  print(f'with the KV cache:    {with_cache:10.1f} tokens/s', flush=True)
  without_cache, out_uncached = _tokens_per_sec(uncached, params, prompt_BxP)
  print(f'without (full pass):  {without_cache:10.1f} tokens/s')
  print(
    f'speed-up: {with_cache / without_cache:.1f}x; the two agree on '
    f'{(out_cached == out_uncached).mean():.1%} of the tokens.'
  )


if __name__ == '__main__':
  main()
