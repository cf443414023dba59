"""SentencePiece: lossless round trip, training, bad files, as a Hugging Face tokenizer."""

import json
import os

import pytest
import sentencepiece as spm
from conftest import VOCAB

from nanodo.corpora import builtin, tokenizer

TEXT = '**HAMLET**  \nTo be, or not to be: that is the question:  \n\n_Exit_ 1601 — ½ ünïcödé 🎭\n'


def test_shipped_tokenizer_round_trips_text_byte_for_byte():
  sp = tokenizer.load(VOCAB)
  assert sp.decode(sp.encode(TEXT)) == TEXT
  assert (sp.pad_id(), sp.bos_id(), sp.eos_id()) == (0, tokenizer.BOS_ID, tokenizer.EOS_ID)


def test_trained_tokenizer_round_trips(tmp_path):
  texts = [
    'the quick brown fox jumps over the lazy dog  \n' * 20,
    'Pack my box with five dozen liquor jugs.\n',
  ] * 5
  sp = tokenizer.train(texts, 300, str(tmp_path / 'sp.model'))
  assert sp.vocab_size() == 300
  assert sp.decode(sp.encode(TEXT)) == TEXT  # Unseen characters go through byte pieces.
  assert tokenizer.load(str(tmp_path / 'sp.model')).encode(TEXT) == sp.encode(TEXT)


def test_unreadable_model_gives_a_clear_error(tmp_path):
  bad = tmp_path / 'bad.model'
  bad.write_bytes(b'not a model')
  with pytest.raises(ValueError, match='bad.model.*not a readable SentencePiece model'):
    tokenizer.load(str(bad))
  with pytest.raises(ValueError, match='missing.model'):
    tokenizer.load(str(tmp_path / 'missing.model'))


def test_a_vocabulary_too_large_for_the_corpus_is_a_clear_error(tmp_path):
  with pytest.raises(ValueError, match=r'^vocab_size=5000 is not valid for this corpus: .*<= \d+'):
    tokenizer.train(
      ['the quick brown fox jumps over the lazy dog\n'] * 20, 5000, str(tmp_path / 'sp.model')
    )
  assert not os.listdir(tmp_path)


def test_a_tokenizer_with_a_dummy_prefix_converts_too_not_a_unigram_one(tmp_path):
  """Llama's kind: a '▁' before the text. (test_hf checks nanodo's own on the held-out plays.)"""
  import transformers  # the test extra

  kwargs = dict(vocab_size=400, byte_fallback=True, add_dummy_prefix=True, minloglevel=2)
  kwargs |= dict(normalization_rule_name='identity', remove_extra_whitespaces=False)
  held_out = builtin.shakespeare()[1]
  for kind in ('bpe', 'unigram'):
    kwargs |= dict(model_type=kind, model_prefix=str(tmp_path / kind))
    spm.SentencePieceTrainer.train(sentence_iterator=iter(held_out[1].splitlines()), **kwargs)
  with pytest.raises(ValueError, match='it is not a plain BPE'):
    tokenizer.hf_tokenizer(str(tmp_path / 'unigram.model'))
  bpe = str(tmp_path / 'bpe.model')
  (tmp_path / 'tokenizer.json').write_text(json.dumps(tokenizer.hf_tokenizer(bpe)))
  sp = spm.SentencePieceProcessor(model_file=bpe)
  tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / 'tokenizer.json'))
  for text in [held_out[2], '  two spaces first', TEXT, '']:
    assert tok(text, add_special_tokens=False).input_ids == sp.encode(text)
    assert tok.decode(sp.encode(text)) == sp.decode(sp.encode(text))
