"""SentencePiece: load a model, or train one from a corpus."""

import io
import os
from collections.abc import Iterable

import sentencepiece as spm

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
# Sentences longer than this are split before training (SentencePiece drops them).
_MAX_SENTENCE_BYTES = 4096


def load(path: str) -> spm.SentencePieceProcessor:
  """Loads a SentencePiece model; it must have BOS and EOS pieces and pad id 0."""
  try:
    sp = spm.SentencePieceProcessor(model_file=path)
  except (OSError, RuntimeError) as e:
    raise ValueError(f'vocab_path={path!r} is not a readable SentencePiece model: {e}') from e
  if sp.bos_id() < 0 or sp.eos_id() < 0:
    raise ValueError(f'vocab_path={path!r} has no BOS or EOS piece; both are needed.')
  if sp.pad_id() not in (PAD_ID, -1) or PAD_ID in (sp.bos_id(), sp.eos_id()):
    raise ValueError(
      f'vocab_path={path!r} must keep id {PAD_ID} for padding (pad_id={sp.pad_id()}).'
    )
  return sp


def _sentences(texts: Iterable[str]) -> Iterable[str]:
  """Splits documents into line-aligned pieces short enough for the trainer."""
  for text in texts:
    chunk = ''
    for line in text.splitlines(keepends=True):
      if len(chunk) + len(line) > _MAX_SENTENCE_BYTES // 4 and chunk:
        yield chunk
        chunk = ''
      chunk += line
    if chunk:
      yield chunk


def train(texts: Iterable[str], vocab_size: int, path: str) -> spm.SentencePieceProcessor:
  """Trains a lossless BPE model (text round-trips byte for byte) and saves it."""
  model = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(
      sentence_iterator=iter(_sentences(texts)),
      model_writer=model,
      model_type='bpe',
      vocab_size=vocab_size,
      normalization_rule_name='identity',
      remove_extra_whitespaces=False,
      add_dummy_prefix=False,
      split_digits=True,
      byte_fallback=True,
      allow_whitespace_only_pieces=True,
      character_coverage=1.0,
      max_sentence_length=_MAX_SENTENCE_BYTES,
      pad_id=PAD_ID,
      unk_id=UNK_ID,
      bos_id=BOS_ID,
      eos_id=EOS_ID,
      num_threads=os.cpu_count() or 1,
      minloglevel=2,
    )
  except RuntimeError as e:  # e.g. a vocabulary larger than the corpus allows
    raise ValueError(
      f'vocab_size={vocab_size} is not valid for this corpus: {str(e).split("] ")[-1]}'
    ) from None
  tmp = path + '.tmp'
  with open(tmp, 'wb') as f:
    f.write(model.getvalue())
  os.replace(tmp, path)
  return load(path)
