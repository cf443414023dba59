"""SentencePiece: lossless round trip, training, bad files."""

import os

import pytest
from conftest import VOCAB

from nanodo import tokenizer

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
