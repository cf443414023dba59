"""Tokenizers: SentencePiece (trained here by default) or a Hugging Face tokenizer.json."""

import io
import os
from collections.abc import Iterable

import sentencepiece as spm

from nanodo.corpora import tokenizer_json
from nanodo.ground import files

# What data, the token cache, evaluation, sampling and export call: SentencePiece's methods.
Tokenizer = spm.SentencePieceProcessor | tokenizer_json.HFTokenizer

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
# Sentences longer than this are split before training (SentencePiece drops them).
_MAX_SENTENCE_BYTES = 4096


def load(path: str) -> Tokenizer:
  """A tokenizer.json (tokenizer_json.load), else a SentencePiece model with BOS, EOS, pad id 0."""
  if path.endswith('.json'):
    return tokenizer_json.load(path)
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


def from_bytes(data: bytes) -> Tokenizer:
  """The tokenizer of its serialized_model_proto() bytes (a SentencePiece proto or JSON)."""
  if data.startswith(b'{'):
    return tokenizer_json.from_bytes(data)
  return spm.SentencePieceProcessor(model_proto=data)


def prompt_ids(sp: Tokenizer, text: str) -> list[int]:
  """A prompt's ids: after BOS (SentencePiece), or as the Hugging Face tokenizer encodes it."""
  if isinstance(sp, tokenizer_json.HFTokenizer):
    return sp.prompt(text)
  return [sp.bos_id(), *sp.encode(text)]


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
  files.write_bytes(path, model.getvalue())
  return load(path)


def hf_tokenizer(path: str) -> dict:
  """The Hugging Face tokenizer.json that gives this model's ids on any text.

  SentencePiece's BPE merges the adjacent pair whose union is the best-scoring piece; the same
  merges, ranked by that score, make a `tokenizers` BPE. Special pieces in a text are text, as in
  SentencePiece, when transformers is told so (split_special_tokens in tokenizer_config.json).
  """
  from sentencepiece import sentencepiece_model_pb2 as pb  # protobuf: export only

  with open(path, 'rb') as f:
    proto = pb.ModelProto.FromString(f.read())
  spec, norm, Piece = proto.trainer_spec, proto.normalizer_spec, pb.ModelProto.SentencePiece
  odd = [p.piece for p in proto.pieces if p.type in (Piece.USER_DEFINED, Piece.UNUSED)][:3]
  plain = spec.model_type == spec.BPE and not norm.precompiled_charsmap
  plain &= norm.escape_whitespaces and not norm.remove_extra_whitespaces
  if odd or not plain or spec.treat_whitespace_as_suffix:
    why = f'pieces {odd} are user-defined or unused' if odd else 'it is not a plain BPE'
    raise ValueError(
      f'vocab_path={path!r} has no Hugging Face counterpart here ({why}): export takes '
      'SentencePiece BPE models with identity normalisation, as nanodo trains.'
    )
  normal = {p.piece for p in proto.pieces if p.type == Piece.NORMAL}
  merges = []
  for p in sorted((p for p in proto.pieces if p.type == Piece.NORMAL), key=lambda p: -p.score):
    merges += [[p.piece[:i], p.piece[i:]] for i in range(1, len(p.piece))]
  merges = [m for m in merges if m[0] in normal and m[1] in normal]
  bos = proto.pieces[spec.bos_id].piece
  added = [
    {'id': i, 'content': p.piece, 'single_word': False, 'lstrip': False, 'rstrip': False}
    | {'normalized': False, 'special': True}
    for i, p in enumerate(proto.pieces)
    if p.type in (Piece.CONTROL, Piece.UNKNOWN)
  ]
  normalizers = [{'type': 'Replace', 'pattern': {'String': ' '}, 'content': '▁'}]
  decoders = [{'type': 'Replace', 'pattern': {'String': '▁'}, 'content': ' '}]
  decoders += [{'type': 'ByteFallback'}, {'type': 'Fuse'}]
  if norm.add_dummy_prefix:  # a '▁' before the text, dropped again when decoding
    normalizers.insert(0, {'type': 'Prepend', 'prepend': '▁'})
    decoders.append({'type': 'Strip', 'content': ' ', 'start': 1, 'stop': 0})
  A, B = ({'Sequence': {'id': s, 'type_id': i}} for i, s in enumerate('AB'))
  BOS0, BOS1 = ({'SpecialToken': {'id': bos, 'type_id': i}} for i in range(2))
  model = {'type': 'BPE', 'dropout': None, 'unk_token': proto.pieces[spec.unk_id].piece}
  model |= {'continuing_subword_prefix': None, 'end_of_word_suffix': None, 'fuse_unk': True}
  model |= {'byte_fallback': spec.byte_fallback, 'ignore_merges': False}
  model |= {'vocab': {p.piece: i for i, p in enumerate(proto.pieces)}, 'merges': merges}
  return {
    'version': '1.0',
    'truncation': None,
    'padding': None,
    'added_tokens': added,
    'normalizer': {'type': 'Sequence', 'normalizers': normalizers},
    'pre_tokenizer': None,
    # BOS before the text, as nanodo's prompts and documents begin; EOS is left to the caller.
    'post_processor': {
      'type': 'TemplateProcessing',
      'single': [BOS0, A],
      'pair': [BOS0, A, BOS1, B],
      'special_tokens': {bos: {'id': bos, 'ids': [spec.bos_id], 'tokens': [bos]}},
    },
    'decoder': {'type': 'Sequence', 'decoders': decoders},
    'model': model,
  }
