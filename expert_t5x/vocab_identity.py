"""One identity for vocabularies: what bases, experts and tasks record, and what is compared.

A SentencePiece vocabulary is identified by the sha256 of its model file; a byte vocabulary by its
extra ids; anything else by its type and size. Values come in two spellings, both recorded in
existing files and therefore kept: the tagged one (`'spm:<sha256>'`, `'bytes:extra_ids=0'`, what
training writes into `expert.json`) and the bare file digest (`'<sha256>'`, what a base checkpoint's
`spiece.model` gives). `comparable` maps both to one value, so checks compare like with like.
"""

from __future__ import annotations

import functools
import hashlib
import os
from typing import Any, Optional

from expert_t5x import file_io

SPM_TAG = "spm:"


def spm_file_fingerprint(path: str | os.PathLike[str]) -> str:
  """The bare sha256 of a SentencePiece model file."""
  path = os.fspath(path)
  stat = os.stat(path)
  return _file_digest(path, stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
  del size, mtime_ns  # Cache keys only: a rewritten file is hashed again.
  return file_io.sha256_file(path)


def fingerprint(vocabulary: Any) -> str:
  """The tagged identity of a seqio vocabulary (the value experts record)."""
  import seqio  # pylint: disable=g-import-not-at-top
  from seqio_tasks import vocab as vocab_lib  # pylint: disable=g-import-not-at-top
  if isinstance(vocabulary, vocab_lib.LazySentencePieceVocabulary):
    return SPM_TAG + spm_file_fingerprint(vocabulary.path)
  if isinstance(vocabulary, seqio.SentencePieceVocabulary):
    return SPM_TAG + hashlib.sha256(vocabulary.sp_model).hexdigest()
  if isinstance(vocabulary, seqio.ByteVocabulary):
    return f"bytes:extra_ids={vocabulary.extra_ids}"
  return f"{type(vocabulary).__name__}:size={vocabulary.vocab_size}"


def comparable(value: Optional[str]) -> Optional[str]:
  """One spelling of a recorded identity: 'spm:<sha>' and '<sha>' name the same file."""
  if not value:
    return None
  return value[len(SPM_TAG):] if value.startswith(SPM_TAG) else value


def known_fingerprint(vocabulary: Any) -> Optional[str]:
  """The comparable identity of a task's vocabulary, or None when it is not a seqio vocabulary
  (tests, custom sources: their size alone is checked)."""
  if not type(vocabulary).__module__.startswith(("seqio", "seqio_tasks")):
    return None
  return comparable(fingerprint(vocabulary))
