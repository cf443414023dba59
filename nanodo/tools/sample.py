"""Generation from a checkpoint: prefill the prompts, then one token per step with a KV cache."""

import dataclasses
import time
from collections.abc import Callable
from functools import partial
from typing import TextIO

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nanodo.corpora import tokenizer
from nanodo.ground.console import Progress
from nanodo.ground.tree import PyTree
from nanodo.model import LayerCache, ModelConfig, TransformerDecoder, head_dim
from nanodo.tools.trained import Trained

# A row's tokens after its EOS: no id of any tokenizer (whose padding may be any id, or EOS).
NO_TOKEN = -1


@dataclasses.dataclass(frozen=True)
class Sampling:
  """How the next token is chosen: argmax at temperature 0, else a draw after top-k and top-p."""

  temperature: float = 1.0
  top_k: int = 0  # 0: no top-k cut
  top_p: float = 1.0  # 1: no nucleus cut

  def __post_init__(self):
    if not self.temperature >= 0:
      raise ValueError(f'temperature={self.temperature} is not valid: must be >= 0 (0: greedy).')
    if not 0 < self.top_p <= 1:
      raise ValueError(f'top_p={self.top_p} is not valid: must be in (0, 1].')
    if self.top_k < 0:
      raise ValueError(f'top_k={self.top_k} is not valid: must be >= 0 (0: no cut).')

  def next_token(self, logits_BxV: jax.Array, keys_B: jax.Array, step: jax.Array) -> jax.Array:
    """Each row's next token; the draw of step uses the row's key folded with it."""
    if self.temperature == 0:
      return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    logits_BxV = logits_BxV / self.temperature
    if self.top_k:
      kth_Bx1 = jax.lax.top_k(logits_BxV, min(self.top_k, logits_BxV.shape[-1]))[0][:, -1:]
      logits_BxV = jnp.where(logits_BxV < kth_Bx1, -jnp.inf, logits_BxV)
    if self.top_p < 1:
      sorted_BxV = jnp.flip(jnp.sort(logits_BxV, axis=-1), axis=-1)
      probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
      # The fewest most probable tokens whose mass reaches top_p: those with less before them.
      before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV
      kept_BxV = jnp.where(before_BxV < self.top_p, sorted_BxV, jnp.inf)
      min_Bx1 = jnp.min(kept_BxV, axis=-1, keepdims=True)
      logits_BxV = jnp.where(logits_BxV < min_Bx1, -jnp.inf, logits_BxV)
    keys_B = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys_B, step)
    return jax.vmap(jax.random.categorical)(keys_B, logits_BxV).astype(jnp.int32)


def check_request(prompts: list[str], max_new_tokens: int, num_samples: int) -> None:
  """Raises ValueError for a request that cannot work, before any model is loaded."""
  if not prompts or not all(prompts):
    raise ValueError('The prompt is empty: give some text, e.g. --prompt="ROMEO:".')
  for key, value in (('max_new_tokens', max_new_tokens), ('num_samples', num_samples)):
    if value < 1:
      raise ValueError(f'{key}={value} is not valid: must be a positive integer.')


def init_cache(cfg: ModelConfig, B: int) -> list[LayerCache]:
  """An empty KV cache of every layer for B sequences of up to L tokens."""
  shape = (B, cfg.L, cfg.KV or cfg.H, head_dim(cfg))
  return [(jnp.zeros(shape, cfg.dtype), jnp.zeros(shape, cfg.dtype)) for _ in range(cfg.N)]


def pad_prompts(ids: list[list[int]], L: int, max_new_tokens: int) -> tuple[np.ndarray, np.ndarray]:
  """Right-padded prompt ids (BOS first, if the tokenizer adds one) and lengths; refuses an empty
  prompt and one that would generate past the context L."""
  prompt_BxP = np.zeros((len(ids), max(map(len, ids))), np.int32)
  for row, x in zip(prompt_BxP, ids, strict=True):
    if not x:
      raise ValueError('A prompt is empty, and this tokenizer adds no BOS to continue from.')
    if len(x) + max_new_tokens > L:
      too_long = f'The prompt is {len(x)} tokens (with BOS), longer than the context L={L}.'
      over = f'{len(x)} prompt tokens + max_new_tokens={max_new_tokens} exceed the context L={L}'
      room = f'learned positions cannot extrapolate: ask for at most {L - len(x)} new tokens.'
      raise ValueError(too_long if len(x) > L else f'{over}; {room}')
    row[: len(x)] = x
  return prompt_BxP, np.asarray([len(x) for x in ids], np.int32)


def row_keys(seed: int, B: int) -> jax.Array:
  """One key per row, so that a row's sample does not depend on the rest of the batch."""
  return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(jax.random.key(seed), jnp.arange(B))


OnToken = Callable[[np.ndarray, np.ndarray], None]  # (step, token_B), PAD once a row has ended


def _decode_step(
  model: TransformerDecoder, sampling: Sampling, eos_id: int, on_token: OnToken | None, carry: tuple
) -> tuple:
  """Chooses and records each row's token, then feeds it through the model; keys_B ride along."""
  step, logits_BxV, pos_B, done_B, out_BxS, cache, keys_B = carry
  token_B = jnp.where(done_B, NO_TOKEN, sampling.next_token(logits_BxV, keys_B, step))
  out_BxS = out_BxS.at[:, step].set(token_B)
  if on_token is not None:
    # Unordered: ordered effects need a single device; the step tells the order.
    jax.debug.callback(on_token, step, token_B)
  done_B = done_B | (token_B == eos_id)
  logits_Bx1xV, cache = model.decode(token_B[:, None], pos_B[:, None], cache)
  return step + 1, logits_Bx1xV[:, 0], pos_B + 1, done_B, out_BxS, cache, keys_B


def _running(carry: tuple) -> jax.Array:
  step, _, _, done_B, out_BxS, _, _ = carry
  return (step < out_BxS.shape[1]) & ~jnp.all(done_B)


@partial(jax.jit, static_argnames=('graphdef', 'max_new_tokens', 'sampling', 'eos_id', 'on_token'))
def generate(
  graphdef: nnx.GraphDef,
  params: PyTree,
  prompt_BxP: jax.Array,
  length_B: jax.Array,
  keys_B: jax.Array,
  *,
  max_new_tokens: int,
  sampling: Sampling,
  eos_id: int,
  on_token: OnToken | None = None,
) -> jax.Array:
  """New tokens of right-padded prompts: EOS ends a row (PAD after it), all rows end the loop."""
  model = nnx.merge(graphdef, params)
  B, P = prompt_BxP.shape
  pos_BxP = jnp.broadcast_to(jnp.arange(P), (B, P))
  logits_BxPxV, cache = model.decode(prompt_BxP, pos_BxP, init_cache(model.cfg, B))
  logits_BxV = logits_BxPxV[jnp.arange(B), length_B - 1]
  out_BxS = jnp.full((B, max_new_tokens), NO_TOKEN, jnp.int32)
  carry = (0, logits_BxV, length_B, jnp.zeros(B, bool), out_BxS, cache, keys_B)
  body = partial(_decode_step, model, sampling, eos_id, on_token)
  return jax.lax.while_loop(_running, body, carry)[4]


def to_text(sp: tokenizer.Tokenizer, ids: list[int]) -> str:
  """The text of generated ids, up to their first EOS."""
  return sp.decode(ids[: ids.index(sp.eos_id())] if sp.eos_id() in ids else ids)


class Printer:
  """Prints one row's text as its tokens arrive; pass the same one to every call (one compile)."""

  def __init__(self, sp: tokenizer.Tokenizer, file: TextIO | None = None):
    self.sp, self.file = sp, file

  def begin(self, header: str, prompt: str) -> None:
    """Starts a row: prints its header and prompt."""
    self.ids, self.early, self.text = [], {}, ''
    print(header + prompt, end='', file=self.file, flush=True)

  def __call__(self, step: np.ndarray, token_B: np.ndarray) -> None:
    """Prints the text that the row's new token adds."""
    self.early[int(step)] = int(token_B[0])
    while len(self.ids) in self.early:
      self.ids.append(self.early.pop(len(self.ids)))
    text = to_text(self.sp, self.ids)
    # Hold back a character whose UTF-8 bytes have not all arrived.
    if not text.endswith('\ufffd') and text.startswith(self.text):
      print(text[len(self.text) :], end='', file=self.file, flush=True)
      self.text = text

  def end(self, text: str) -> None:
    """Prints what was held back of the row's final text, and a newline."""
    print(text[len(self.text) :] if text.startswith(self.text) else '', file=self.file, flush=True)


def sample(
  model: Trained,
  prompts: list[str],
  *,
  max_new_tokens: int,
  sampling: Sampling,
  num_samples: int = 1,
  seed: int = 0,
  printer: Printer | None = None,
  progress: Progress | None = None,
) -> list[str]:
  """Continuations of each prompt, num_samples each (prompt-major), batched or streamed by row."""
  check_request(prompts, max_new_tokens, num_samples)
  rows = [p for p in prompts for _ in range(num_samples)]
  ids = [tokenizer.prompt_ids(model.sp, p) for p in rows]
  prompt_BxP, length_B = pad_prompts(ids, model.cfg.L, max_new_tokens)
  keys_B = row_keys(seed, len(rows))
  kwargs = {'max_new_tokens': max_new_tokens, 'sampling': sampling, 'eos_id': model.sp.eos_id()}
  generate_rows = partial(generate, model.graphdef, model.params, on_token=printer, **kwargs)
  task = progress.add('sample', len(rows), every=1) if progress else None
  batches = [slice(b, b + 1) for b in range(len(rows))] if printer else [slice(None)]
  texts, tokens, first = [], [], 0.0
  for b, batch in enumerate(batches):
    if printer:
      printer.begin(f'--- sample {b + 1} of {len(rows)} ---\n' if len(rows) > 1 else '', rows[b])
    out_BxS = np.asarray(generate_rows(prompt_BxP[batch], length_B[batch], keys_B[batch]))
    texts += [to_text(model.sp, row) for row in out_BxS.tolist()]
    tokens.append(np.sum(out_BxS != NO_TOKEN))
    if printer:
      printer.end(texts[-1])
    if progress:
      first = first or time.time()  # the rate leaves out the first batch: its time has compiling
      rate = {'tokens_per_sec': sum(tokens[1:]) / (time.time() - first)} if b else {}
      progress.update(task, len(texts), {'tokens': sum(tokens), **rate})
  return texts
