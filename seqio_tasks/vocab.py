"""Vocabularies of the registered tasks: a lazily resolved T5 SentencePiece model and the demo
bytes.

Tasks bind their vocabulary when they are registered, which happens at import, before gin files are
parsed. The prompt / P3 / BIG-bench / continual tasks therefore share one
`LazySentencePieceVocabulary` whose model file is resolved at first use from, in order:
`set_vocabulary_path()`, the gin binding `seqio_tasks.vocab.VOCABULARY_PATH`, the environment
variable `EXPERT_T5X_VOCAB`. Importing this module never reads a file.
"""

from __future__ import annotations

import os
import threading
from typing import Any, Iterable, Optional, Sequence

import seqio

from seqio_tasks import settings

VOCAB_ENV = "EXPERT_T5X_VOCAB"
# T5's default vocabulary: the 32000-piece SentencePiece model plus 100 sentinel ids.
DEFAULT_EXTRA_IDS = 100

VOCABULARY_PATH: Optional[str] = None  # Set through `set_vocabulary_path` or gin.


def set_vocabulary_path(path: Optional[str]) -> None:
  """Points the lazy T5 vocabulary at a SentencePiece model file (None clears it)."""
  global VOCABULARY_PATH
  VOCABULARY_PATH = None if path is None else os.fspath(path)
  T5_VOCABULARY.reset()


class _GinVocab(settings.GinModule):
  """Gin's view: bind `seqio_tasks.vocab.VOCABULARY_PATH = "/path/spiece.model"`."""

  def __call__(self, VOCABULARY_PATH: Optional[str] = None) -> Optional[str]:  # pylint: disable=invalid-name,redefined-outer-name
    return VOCABULARY_PATH


_gin_vocab = settings.register_gin_module(__name__, _GinVocab, "vocab")


def resolve_vocabulary_path() -> str:
  """The SentencePiece model file the lazy vocabulary loads; one clear error when none is set."""
  path = VOCABULARY_PATH or _gin_vocab() or os.environ.get(VOCAB_ENV)
  if not path:
    raise ValueError(
        "no T5 vocabulary configured: set the gin binding seqio_tasks.vocab.VOCABULARY_PATH or "
        f"the environment variable {VOCAB_ENV} to a SentencePiece model file (Hugging Face T5 "
        "checkpoint directories contain spiece.model).")
  if os.path.isdir(path):
    path = os.path.join(path, "spiece.model")
  if not os.path.exists(path):
    raise FileNotFoundError(
        f"T5 vocabulary file {path!r} does not exist (from seqio_tasks.vocab.VOCABULARY_PATH or "
        f"{VOCAB_ENV}); point it at a SentencePiece model such as a T5 checkpoint's spiece.model.")
  return path


class LazySentencePieceVocabulary(seqio.Vocabulary):
  """A `seqio.SentencePieceVocabulary` whose model file is looked up at first use.

  Equality is identity, so that every task sharing this object has equal output features (seqio
  mixtures require it) without loading the model.
  """

  def __init__(self, extra_ids: int = DEFAULT_EXTRA_IDS):
    super().__init__(extra_ids=extra_ids)
    self._lock = threading.Lock()
    self._inner: Optional[seqio.SentencePieceVocabulary] = None
    self._path: Optional[str] = None

  def reset(self) -> None:
    with self._lock:
      self._inner, self._path = None, None

  @property
  def inner(self) -> seqio.SentencePieceVocabulary:
    with self._lock:
      if self._inner is None:
        path = resolve_vocabulary_path()
        self._inner = seqio.SentencePieceVocabulary(path, extra_ids=self._extra_ids)
        self._path = path
      return self._inner

  @property
  def path(self) -> str:
    self.inner  # pylint: disable=pointless-statement
    return self._path  # type: ignore[return-value]

  def fingerprint(self) -> str:
    """sha256 of the model file: what train/eval compare to refuse a mismatched vocabulary."""
    from expert_t5x import vocab_identity  # pylint: disable=g-import-not-at-top
    return vocab_identity.spm_file_fingerprint(self.path)

  # Everything below delegates to the resolved vocabulary.
  @property
  def bos_id(self) -> Optional[int]:
    return self.inner.bos_id

  @property
  def eos_id(self) -> Optional[int]:
    return self.inner.eos_id

  @property
  def unk_id(self) -> Optional[int]:
    return self.inner.unk_id

  @property
  def _base_vocab_size(self) -> int:
    return self.inner._base_vocab_size  # pylint: disable=protected-access

  @property
  def vocab_size(self) -> int:
    return self.inner.vocab_size

  def _encode(self, s: str) -> Sequence[int]:
    return self.inner.encode(s)

  def _decode(self, ids: Iterable[int]) -> str:
    return self.inner.decode(ids)

  def _encode_tf(self, s: Any) -> Any:
    return self.inner.encode_tf(s)

  def _decode_tf(self, ids: Any) -> Any:
    return self.inner.decode_tf(ids)

  def encode(self, s: str) -> Sequence[int]:
    return self.inner.encode(s)

  def decode(self, ids: Iterable[int]) -> str:
    return self.inner.decode(ids)

  def encode_tf(self, s: Any) -> Any:
    return self.inner.encode_tf(s)

  def decode_tf(self, ids: Any) -> Any:
    return self.inner.decode_tf(ids)

  def __eq__(self, other: object) -> bool:
    return other is self

  def __hash__(self) -> int:
    return id(self)


# The one T5 vocabulary object shared by every SentencePiece-backed task.
T5_VOCABULARY = LazySentencePieceVocabulary()
# Demo tasks: bytes (0 pad, 1 EOS, 2 UNK, byte b at b + 3); needs no file.
DEMO_VOCABULARY = seqio.ByteVocabulary()


def output_features(vocabulary: seqio.Vocabulary) -> dict[str, seqio.Feature]:
  """T0's output features: inputs and targets, EOS appended to both (as the paper's code does)."""
  return {
      "inputs": seqio.Feature(vocabulary=vocabulary, add_eos=True, required=False),
      "targets": seqio.Feature(vocabulary=vocabulary, add_eos=True),
  }


def vocabulary_fingerprint(vocabulary: seqio.Vocabulary) -> str:
  """A string identifying a vocabulary: file hash for SentencePiece, a name for bytes
  (`expert_t5x.vocab_identity.fingerprint`)."""
  from expert_t5x import vocab_identity  # pylint: disable=g-import-not-at-top
  return vocab_identity.fingerprint(vocabulary)
