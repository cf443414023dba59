"""Generation from a checkpoint: prefill the prompts, then one token per step with a KV cache."""

import dataclasses
import functools
import sys
import time
from collections.abc import Callable
from typing import TextIO

import jax
import jax.numpy as jnp
import numpy as np
import sentencepiece as spm
from flax import nnx

from nanodo import tokenizer
from nanodo.model import LayerCache, ModelConfig, TransformerDecoder
from nanodo.progress import Progress
from nanodo.tree import PyTree
from nanodo.workdir import Run

# Called with the step and each row's new token (PAD once a row has ended), as they are made.
OnToken = Callable[[np.ndarray, np.ndarray], None]


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


def check_request(prompts: list[str], max_new_tokens: int, num_samples: int) -> None:
  """Raises ValueError for a request that cannot work, before any model is loaded."""
  if not prompts or not all(prompts):
    raise ValueError('The prompt is empty: give some text, e.g. --prompt="ROMEO:".')
  if max_new_tokens < 1:
    raise ValueError(f'max_new_tokens={max_new_tokens} is not valid: must be a positive integer.')
  if num_samples < 1:
    raise ValueError(f'num_samples={num_samples} is not valid: must be a positive integer.')


def init_cache(cfg: ModelConfig, B: int) -> list[LayerCache]:
  """An empty KV cache of every layer for B sequences of up to L tokens."""
  shape = (B, cfg.L, cfg.KV or cfg.H, cfg.D // cfg.H)
  return [(jnp.zeros(shape, cfg.dtype), jnp.zeros(shape, cfg.dtype)) for _ in range(cfg.N)]


def encode_prompts(
  sp: spm.SentencePieceProcessor, prompts: list[str], L: int, max_new_tokens: int
) -> tuple[np.ndarray, np.ndarray]:
  """Right-padded ids (BOS first) and lengths; refuses to generate past the context L."""
  ids = [[sp.bos_id(), *sp.encode(p)] for p in prompts]
  for x in ids:
    if len(x) > L:
      raise ValueError(f'The prompt is {len(x)} tokens (with BOS), longer than the context L={L}.')
    if len(x) + max_new_tokens > L:
      raise ValueError(
        f'{len(x)} prompt tokens + max_new_tokens={max_new_tokens} exceed the context L={L}; '
        f'learned positions cannot extrapolate: ask for at most {L - len(x)} new tokens.'
      )
  prompt_BxP = np.zeros((len(ids), max(map(len, ids))), np.int32)
  for row, x in zip(prompt_BxP, ids, strict=True):
    row[: len(x)] = x
  return prompt_BxP, np.asarray([len(x) for x in ids], np.int32)


def row_keys(seed: int, B: int) -> jax.Array:
  """One key per row, so that a row's sample does not depend on the rest of the batch."""
  return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(jax.random.key(seed), jnp.arange(B))


def next_token(
  logits_BxV: jax.Array, keys_B: jax.Array, step: int | jax.Array, sampling: Sampling
) -> jax.Array:
  """Each row's next token under sampling; the draw of step uses the row's key folded with it."""
  if sampling.temperature == 0:
    return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
  logits_BxV = logits_BxV / sampling.temperature
  if sampling.top_k:
    kth_Bx1 = jax.lax.top_k(logits_BxV, min(sampling.top_k, logits_BxV.shape[-1]))[0][:, -1:]
    logits_BxV = jnp.where(logits_BxV < kth_Bx1, -jnp.inf, logits_BxV)
  if sampling.top_p < 1:
    sorted_BxV = jnp.flip(jnp.sort(logits_BxV, axis=-1), axis=-1)
    probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
    # The fewest most probable tokens whose mass reaches top_p: those with less before them.
    before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV
    kept_BxV = jnp.where(before_BxV < sampling.top_p, sorted_BxV, jnp.inf)
    min_Bx1 = jnp.min(kept_BxV, axis=-1, keepdims=True)
    logits_BxV = jnp.where(logits_BxV < min_Bx1, -jnp.inf, logits_BxV)
  keys_B = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys_B, step)
  return jax.vmap(jax.random.categorical)(keys_B, logits_BxV).astype(jnp.int32)


Carry = tuple[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array, list[LayerCache]]


def _decode_step(
  model: TransformerDecoder,
  keys_B: jax.Array,
  sampling: Sampling,
  eos_id: int,
  on_token: OnToken | None,
  carry: Carry,
) -> Carry:
  """Records each row's token, then feeds it through the model (one position) for the next."""
  step, token_B, pos_B, done_B, out_BxS, cache = carry
  token_B = jnp.where(done_B, tokenizer.PAD_ID, token_B)
  out_BxS = out_BxS.at[:, step].set(token_B)
  if on_token is not None:
    # Unordered: ordered effects need a single device; the step tells the order.
    jax.debug.callback(on_token, step, token_B)
  done_B = done_B | (token_B == eos_id)
  logits_Bx1xV, cache = model.decode(token_B[:, None], pos_B[:, None], cache)
  token_B = next_token(logits_Bx1xV[:, 0], keys_B, step + 1, sampling)
  return step + 1, token_B, pos_B + 1, done_B, out_BxS, cache


def _running(max_new_tokens: int, carry: Carry) -> jax.Array:
  step, _, _, done_B, _, _ = carry
  return (step < max_new_tokens) & ~jnp.all(done_B)


@functools.partial(
  jax.jit, static_argnames=('graphdef', 'max_new_tokens', 'sampling', 'eos_id', 'on_token')
)
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
  token_B = next_token(logits_BxPxV[jnp.arange(B), length_B - 1], keys_B, 0, sampling)
  out_BxS = jnp.full((B, max_new_tokens), tokenizer.PAD_ID, jnp.int32)
  carry = (0, token_B, length_B, jnp.zeros(B, bool), out_BxS, cache)
  carry = jax.lax.while_loop(
    functools.partial(_running, max_new_tokens),
    functools.partial(_decode_step, model, keys_B, sampling, eos_id, on_token),
    carry,
  )
  return carry[4]


def to_text(sp: spm.SentencePieceProcessor, ids: list[int]) -> str:
  """The text of generated ids, up to their first EOS."""
  return sp.decode(ids[: ids.index(sp.eos_id())] if sp.eos_id() in ids else ids)


class Printer:
  """Prints one row's text as its tokens arrive; pass the same one to every call (one compile)."""

  def __init__(self, sp: spm.SentencePieceProcessor, file: TextIO = sys.stdout):
    self.sp, self.file = sp, file
    self.ids, self.early, self.text = [], {}, ''

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
  model: Run,
  prompts: list[str],
  *,
  max_new_tokens: int,
  sampling: Sampling,
  num_samples: int = 1,
  seed: int = 0,
  printer: Printer | None = None,
  progress: Progress | None = None,
) -> list[str]:
  """Continuations of each prompt, num_samples each (prompt-major), all rows in one batch.

  With a printer, rows run one at a time so that each streams whole; the samples are the same.
  A progress shows the samples done and the new tokens per second.
  """
  check_request(prompts, max_new_tokens, num_samples)
  rows = [p for p in prompts for _ in range(num_samples)]
  prompt_BxP, length_B = encode_prompts(model.sp, rows, model.cfg.L, max_new_tokens)
  keys_B = row_keys(seed, len(rows))
  run = functools.partial(
    generate,
    model.graphdef,
    model.params,
    max_new_tokens=max_new_tokens,
    sampling=sampling,
    eos_id=model.sp.eos_id(),
    on_token=printer,
  )
  task = progress.add('sample', len(rows), every=1) if progress else None
  if printer is None:
    out_BxS = np.asarray(run(prompt_BxP, length_B, keys_B))
    if progress:
      progress.update(task, len(rows), {'tokens': np.sum(out_BxS != tokenizer.PAD_ID)})
    return [to_text(model.sp, ids) for ids in out_BxS.tolist()]
  texts, tokens, first = [], [], 0.0
  for b, prompt in enumerate(rows):
    printer.begin(f'--- sample {b + 1} of {len(rows)} ---\n' if len(rows) > 1 else '', prompt)
    ids = np.asarray(run(prompt_BxP[b : b + 1], length_B[b : b + 1], keys_B[b : b + 1]))[0]
    texts.append(to_text(model.sp, ids.tolist()))
    printer.end(texts[-1])
    tokens.append(np.sum(ids != tokenizer.PAD_ID))
    if progress:
      # The rate of the rows after the first, whose time includes compiling.
      first = first or time.time()
      rate = {'tokens_per_sec': sum(tokens[1:]) / (time.time() - first)} if b else {}
      progress.update(task, b + 1, {'tokens': sum(tokens), **rate})
  return texts
