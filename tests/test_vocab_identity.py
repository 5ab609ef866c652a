"""One vocabulary identity: the tagged value experts record, the bare file digest bases give, and
the comparison between them, checked against sha256 of the file's bytes computed here."""

import hashlib

import pytest

pytestmark = pytest.mark.tf

import seqio  # noqa: E402

from expert_t5x import eval_tasks  # noqa: E402
from expert_t5x import scoring  # noqa: E402
from expert_t5x import vocab_identity  # noqa: E402
from seqio_tasks import vocab  # noqa: E402

import eval_fakes  # noqa: E402
from test_continual import _spm  # noqa: E402


def test_sentencepiece_bytes_and_other_vocabularies(tmp_path, monkeypatch):
  path = _spm(tmp_path / "spiece.model")
  sha = hashlib.sha256(open(path, "rb").read()).hexdigest()
  assert vocab_identity.spm_file_fingerprint(path) == sha
  assert vocab_identity.fingerprint(seqio.SentencePieceVocabulary(path)) == "spm:" + sha
  monkeypatch.setenv(vocab.VOCAB_ENV, path)
  vocab.T5_VOCABULARY.reset()
  try:
    # seqio_tasks' lazily resolved vocabulary and its public helper give the same value.
    assert vocab.vocabulary_fingerprint(vocab.T5_VOCABULARY) == "spm:" + sha
    assert vocab.T5_VOCABULARY.fingerprint() == sha
    assert vocab_identity.known_fingerprint(vocab.T5_VOCABULARY) == sha
  finally:
    vocab.T5_VOCABULARY.reset()
  assert vocab_identity.fingerprint(seqio.ByteVocabulary()) == "bytes:extra_ids=0"
  assert vocab_identity.known_fingerprint(eval_fakes.CharVocabulary()) is None
  assert vocab_identity.comparable("spm:" + sha) == vocab_identity.comparable(sha) == sha
  assert vocab_identity.comparable(None) is None and vocab_identity.comparable("") is None

  # The evaluator's check compares the task's file with a base's bare digest and an expert's
  # tagged value alike.
  spm_vocab = seqio.SentencePieceVocabulary(path)
  options = scoring.ScoringOptions()
  eval_tasks.check_vocabulary("t", spm_vocab, 512, options,
                              {"the base checkpoint": sha, "expert 'e'": "spm:" + sha})
  with pytest.raises(ValueError, match="Vocabulary mismatch.*the base checkpoint"):
    eval_tasks.check_vocabulary("t", spm_vocab, 512, options, {"the base checkpoint": "0" * 64})
