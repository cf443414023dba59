"""A Hugging Face `tokenizer.json` behind the SentencePiece methods that nanodo calls.

Its BOS, EOS and padding are the model's own: `tokenizer_config.json` beside it names them (else
`config.json`'s ids). A prompt is encoded as transformers encodes it, with the tokenizer's own
special tokens (SmolLM2's add none); a document gets the model's BOS and EOS around its text.
"""

import json
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
  import tokenizers  # the hf-models extra's: imported when a tokenizer.json is loaded

# Tokenizer models whose ids decode back to their text: byte-level or byte-fallback BPE, Unigram.
KINDS = ('BPE', 'Unigram')


def _special(path: str, tok: 'tokenizers.Tokenizer') -> dict[str, int]:
  """The ids of bos, eos and pad named by the files beside path (-1 for one that is not named)."""
  where, ids = os.path.dirname(path), {}
  for name, key in (('tokenizer_config.json', '{}_token'), ('config.json', '{}_token_id')):
    try:
      with open(os.path.join(where, name), encoding='utf-8') as f:
        given = json.load(f)
    except FileNotFoundError:
      continue
    except (OSError, ValueError) as e:
      raise ValueError(f'{os.path.join(where, name)} is unreadable ({e}).') from None
    for k in ('bos', 'eos', 'pad'):
      value = given.get(key.format(k))
      value = value.get('content') if isinstance(value, dict) else value
      if isinstance(value, str):
        if tok.token_to_id(value) is None:
          raise ValueError(f'{name}: {k}_token={value!r} is not a token of {path!r}.')
        value = tok.token_to_id(value)
      if isinstance(value, list):  # several EOS ids in a config.json: the first ends a text
        value = value[0] if value else None
      if isinstance(value, int):
        ids.setdefault(k, value)
  return ids


class HFTokenizer:
  """A tokenizer.json with its model's special ids."""

  def __init__(self, tok: 'tokenizers.Tokenizer', ids: dict[str, int]):
    self.tok, self.ids = tok, ids

  def vocab_size(self) -> int:
    return self.tok.get_vocab_size(with_added_tokens=True)

  def bos_id(self) -> int:
    return self.ids['bos']

  def eos_id(self) -> int:
    return self.ids['eos']

  def pad_id(self) -> int:
    return self.ids.get('pad', -1)

  def encode(
    self, texts: str | list[str], add_bos: bool = False, add_eos: bool = False, num_threads=None
  ) -> list[int] | list[list[int]]:
    """The ids of a text (or of each), without the tokenizer's own special tokens."""
    one = isinstance(texts, str)
    out = self.tok.encode_batch_fast([texts] if one else texts, add_special_tokens=False)
    head, tail = [self.bos_id()] * add_bos, [self.eos_id()] * add_eos
    ids = [head + e.ids + tail for e in out]
    return ids[0] if one else ids

  def prompt(self, text: str) -> list[int]:
    """A prompt's ids as transformers encodes it: with the tokenizer's own special tokens."""
    return self.tok.encode(text, add_special_tokens=True).ids

  def decode(self, ids: list[int] | list[list[int]], num_threads=None) -> str | list[str]:
    """The text of ids (or of each list of ids), special tokens left out."""
    if ids and isinstance(ids[0], list):
      return self.tok.decode_batch(ids, skip_special_tokens=True)
    return self.tok.decode(ids, skip_special_tokens=True)

  def serialized_model_proto(self) -> bytes:
    """The tokenizer and its special ids as bytes: what the token cache hashes, workers load."""
    return json.dumps({'tokenizer.json': self.tok.to_str(), 'ids': self.ids}).encode()


def from_bytes(data: bytes) -> HFTokenizer:
  """The tokenizer of serialized_model_proto's bytes."""
  import tokenizers

  d = json.loads(data)
  return HFTokenizer(tokenizers.Tokenizer.from_str(d['tokenizer.json']), d['ids'])


def load(path: str) -> HFTokenizer:
  """The tokenizer.json at path with the special ids of its directory; ValueError if unusable."""
  try:
    import tokenizers
  except ImportError:
    raise ValueError(
      f"vocab_path={path!r} needs tokenizers: pip install 'nanodo[hf-models]'"
    ) from None
  try:
    tok = tokenizers.Tokenizer.from_file(path)
  except Exception as e:  # tokenizers raises plain Exceptions
    raise ValueError(f'vocab_path={path!r} is not a readable tokenizer.json: {e}') from None
  kind = json.loads(tok.to_str())['model']['type']
  if kind not in KINDS:
    raise ValueError(
      f'vocab_path={path!r} is a {kind} tokenizer, whose ids need not decode back to their '
      f'text; nanodo reads {" and ".join(KINDS)} tokenizer.json files.'
    )
  ids = _special(path, tok)
  if 'eos' not in ids:
    files = 'neither tokenizer_config.json nor config.json beside it names an EOS token'
    raise ValueError(f'vocab_path={path!r} is not usable: {files}.')
  ids.setdefault('bos', ids['eos'])  # GPT-2's one <|endoftext|>, Qwen3's missing BOS
  return HFTokenizer(tok, ids)
