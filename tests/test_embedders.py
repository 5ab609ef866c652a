"""Tests for the embedders: JAX BERT vs transformers' BertModel, BM25, and the T5-encoder
embedder."""

import json
import os

import numpy as np
import pytest

from expert_t5x import embedders

WORDS = [
    "answer", "choices", "instance", "yes", "no", "maybe", "the", "sky", "is", "blue", "none",
    "cat", "dog", "summarize", "question", "true", "false"
]


def make_tokenizer_json(path):
  """A BERT-style WordPiece tokenizer.json built with `tokenizers` (lower-case, char-level
  fallback)."""
  from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
  specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
  letters = [chr(c) for c in range(ord("a"), ord("z") + 1)] + list("0123456789")
  pieces = specials + WORDS + letters + ["##" + c for c in letters] + list(",.:;?!()<>/-'\"")
  vocab = {p: i for i, p in enumerate(dict.fromkeys(pieces))}
  tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
  tok.normalizer = normalizers.BertNormalizer(lowercase=True)
  tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  tok.post_processor = processors.TemplateProcessing(
      single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
      special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
  tok.save(str(path))
  return len(vocab)


def make_tiny_minilm(directory,
                     hidden=32,
                     layers=2,
                     heads=4,
                     intermediate=64,
                     positions=64,
                     seed=0):
  """A random tiny BERT saved like a sentence-transformers directory (HF key names, safetensors)."""
  from safetensors.numpy import save_file
  os.makedirs(directory, exist_ok=True)
  vocab_size = make_tokenizer_json(os.path.join(directory, "tokenizer.json"))
  rng = np.random.default_rng(seed)
  w = lambda *shape: (0.2 * rng.normal(size=shape)).astype(np.float32)
  state = {"embeddings.word_embeddings.weight": w(vocab_size, hidden),
           "embeddings.position_embeddings.weight": w(positions, hidden),
           "embeddings.token_type_embeddings.weight": w(2, hidden),
           "embeddings.LayerNorm.weight": 1 + w(hidden), "embeddings.LayerNorm.bias": w(hidden),
           "pooler.dense.weight": w(hidden, hidden), "pooler.dense.bias": w(hidden)}
  for i in range(layers):
    p = f"encoder.layer.{i}."
    for name, (o, n) in {
        "attention.self.query": (hidden, hidden), "attention.self.key": (hidden, hidden),
        "attention.self.value": (hidden, hidden), "attention.output.dense": (hidden, hidden),
        "intermediate.dense": (intermediate, hidden), "output.dense": (hidden, intermediate)
    }.items():
      state[p + name + ".weight"], state[p + name + ".bias"] = w(o, n), w(o)
    for name in ("attention.output.LayerNorm", "output.LayerNorm"):
      state[p + name + ".weight"], state[p + name + ".bias"] = 1 + w(hidden), w(hidden)
  save_file(state, os.path.join(directory, "model.safetensors"))
  config = {
      "architectures": ["BertModel"], "model_type": "bert", "hidden_act": "gelu",
      "hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
      "intermediate_size": intermediate, "max_position_embeddings": positions, "type_vocab_size": 2,
      "vocab_size": vocab_size, "layer_norm_eps": 1e-12, "pad_token_id": 0
  }
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(config, f)
  return str(directory)


TEXTS = ["Answer Choices: yes, no, Instance: Is the sky blue?", "Instance: the cat and the dog",
         "Answer Choices: (none), Instance: summarize: " + "the sky " * 40, "x"]


def test_minilm_embeddings_are_unit_norm_and_padding_free(tmp_path):
  emb = embedders.MiniLMEmbedder(make_tiny_minilm(tmp_path / "m"), max_seq_length=48, batch_size=2)
  out = emb.embed(TEXTS)
  assert out.shape == (4, 32)
  np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-5)
  # Masked mean: embedding a text alone (no padding) equals embedding it inside a padded batch.
  np.testing.assert_allclose(emb.embed([TEXTS[3]])[0], out[3], atol=1e-6)
  # Truncation at max_seq_length, with [CLS]/[SEP] kept.
  assert len(emb.tokenize([TEXTS[2]])[0].ids) == 48
  assert emb.identity != embedders.MiniLMEmbedder(tmp_path / "m", max_seq_length=40).identity


def test_minilm_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="data fetch minilm"):
    embedders.MiniLMEmbedder(tmp_path)
  make_tiny_minilm(tmp_path / "m")
  with pytest.raises(ValueError, match="positions"):
    embedders.MiniLMEmbedder(tmp_path / "m", max_seq_length=512)
  # A sentence-transformers directory with another pooling is refused, not silently mean-pooled.
  (tmp_path / "m" / "1_Pooling").mkdir()
  (tmp_path / "m" / "1_Pooling" / "config.json").write_text(json.dumps(
      {"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False}))
  with pytest.raises(ValueError, match=r"selects pooling \['pooling_mode_cls_token'\]"):
    embedders.MiniLMEmbedder(tmp_path / "m")
  # sentence-transformers >= 6 names the mode instead ({"pooling_mode": "cls"}).
  (tmp_path / "m" / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode": "cls"}))
  with pytest.raises(ValueError, match=r"selects pooling \['cls'\]"):
    embedders.MiniLMEmbedder(tmp_path / "m")


def test_minilm_batching_does_not_change_embeddings(tmp_path):
  """Row padding to a power of two and length buckets vs embedding each text alone."""
  emb = embedders.MiniLMEmbedder(make_tiny_minilm(tmp_path / "m"), max_seq_length=48, batch_size=4)
  texts = TEXTS + ["Instance: a b c", "y z"]  # 6 texts: one batch of 4, one of 2
  alone = np.stack([emb.embed([t])[0] for t in texts])
  np.testing.assert_allclose(emb.embed(texts), alone, atol=1e-6)
  assert embedders._row_bucket(3, 64) == 4 and embedders._row_bucket(64, 64) == 64  # pylint: disable=protected-access
  assert embedders._row_bucket(1, 64) == 1 and embedders._row_bucket(40, 48) == 48  # pylint: disable=protected-access


@pytest.mark.parity
def test_minilm_matches_transformers_bert(tmp_path):
  """Compares with transformers' BertModel + attention-masked mean pooling + L2 norm
  (sentence-transformers)."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  directory = make_tiny_minilm(tmp_path / "m")
  emb = embedders.MiniLMEmbedder(directory, max_seq_length=48)
  ours = emb.embed(TEXTS)
  model = transformers.BertModel.from_pretrained(directory).eval()
  encodings = emb.tokenize(TEXTS)
  length = max(len(e.ids) for e in encodings)
  ids = torch.zeros((len(TEXTS), length), dtype=torch.long)
  mask = torch.zeros_like(ids)
  for i, e in enumerate(encodings):
    ids[i, :len(e.ids)] = torch.tensor(e.ids)
    mask[i, :len(e.ids)] = 1
  with torch.no_grad():
    hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
  m = mask.unsqueeze(-1).float()
  ref = torch.nn.functional.normalize((hidden * m).sum(1) / m.sum(1).clamp(min=1e-9),
                                      dim=-1).numpy()
  assert np.abs(ours - ref).max() <= 1e-5
  tok = transformers.PreTrainedTokenizerFast(
      tokenizer_file=os.path.join(directory, "tokenizer.json"))
  assert [tok(t, truncation=True, max_length=48)["input_ids"] for t in TEXTS
         ] == [e.ids for e in encodings]


@pytest.mark.parity
@pytest.mark.skipif(not os.environ.get("EXPERT_T5X_MINILM_DIR"),
                    reason="set EXPERT_T5X_MINILM_DIR to the "
                    "all-MiniLM-L6-v2 directory (expert-t5x data fetch minilm)")
def test_real_minilm_matches_transformers():
  """On the real all-MiniLM-L6-v2: same token ids as the HF fast tokenizer, cosine >= 0.9999 to
  BertModel."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  directory = os.environ["EXPERT_T5X_MINILM_DIR"]
  emb = embedders.MiniLMEmbedder(directory)
  ours = emb.embed(TEXTS)
  tok = transformers.AutoTokenizer.from_pretrained(directory)
  batch = tok(TEXTS, padding=True, truncation=True, max_length=256, return_tensors="pt")
  assert [e.ids for e in emb.tokenize(TEXTS)] == [
      row[m.bool()].tolist() for row, m in zip(batch["input_ids"], batch["attention_mask"])]
  with torch.no_grad():
    hidden = transformers.BertModel.from_pretrained(directory).eval()(**batch).last_hidden_state
  m = batch["attention_mask"].unsqueeze(-1).float()
  ref = torch.nn.functional.normalize((hidden * m).sum(1) / m.sum(1), dim=-1).numpy()
  assert (ours * ref).sum(-1).min() >= 0.9999


def test_bm25_scores():
  """Compares with the BM25 ranking a reader expects: a query shares rare words with one
  document."""
  docs = ["the cat sat on the mat", "dogs bark loudly at night", "the sky is blue today"]
  scores = embedders.BM25Scorer().scores(["a blue sky", "cats and dogs bark", "zzz unknown"], docs)
  assert scores.shape == (3, 3)
  assert scores[0].argmax() == 2 and scores[1].argmax() == 1
  assert (scores[2] == 0).all()  # no known token: all zero, no error
  assert scores[0, 0] == 0.0


def _tiny_spm(directory):
  """A tiny SentencePiece model trained on a few sentences (ids 0/1/2 = pad/eos/unk as T5)."""
  import sentencepiece as spm
  corpus = os.path.join(directory, "corpus.txt")
  with open(corpus, "w") as f:
    for i in range(200):
      f.write(
          f"answer choices yes no instance {i} the sky is blue and the cat sat on mat number "
          f"{i % 7}\n"
      )
  spm.SentencePieceTrainer.train(input=corpus,
                                 model_prefix=os.path.join(directory, "sp"),
                                 vocab_size=48,
                                 pad_id=0,
                                 eos_id=1,
                                 unk_id=2,
                                 bos_id=-1,
                                 model_type="unigram",
                                 minloglevel=2)
  return os.path.join(directory, "sp.model")


def test_t5_encoder_embedder_masked_mean(tmp_path):
  """Compares with the network's encoder applied to each unpadded text, mean over all its
  positions."""
  import jax
  from expert_t5x import network
  config = network.get_config("tiny", dropout_rate=0.0)
  model = network.Transformer(config)
  tokens = np.ones((1, 8), np.int32)
  params = model.init(jax.random.PRNGKey(0), tokens, tokens, tokens, enable_dropout=False)["params"]
  emb = embedders.T5EncoderEmbedder(params, config, _tiny_spm(tmp_path), max_seq_length=16)
  texts = ["answer choices yes no", "the sky is blue and the cat sat on the mat " * 3, "instance 3"]
  out = emb.embed(texts)
  np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-5)
  for text, row in zip(texts, out):
    ids = np.array([emb.tokenize([text])[0]], np.int32)
    assert ids.shape[1] <= 16 and ids[0, -1] == 1  # truncated, EOS kept
    hidden = np.asarray(
        model.apply({"params": params}, ids, enable_dropout=False, method=model.encode))
    ref = hidden[0].mean(axis=0)
    np.testing.assert_allclose(row, ref / np.linalg.norm(ref), atol=2e-5)


@pytest.mark.parity
def test_minilm_matches_sentence_transformers(tmp_path):
  """Compares with sentence-transformers itself: a random tiny BERT run through its Transformer,
  mean Pooling and Normalize modules, saved by `SentenceTransformer.save` (its own directory
  layout, which our embedder then loads): same token ids, cosine >= 0.9999."""
  st = pytest.importorskip("sentence_transformers")
  from sentence_transformers.sentence_transformer import modules as st_modules  # pylint: disable=g-import-not-at-top
  source = make_tiny_minilm(tmp_path / "bert")
  modules = [st_modules.Transformer(source, max_seq_length=48), st_modules.Pooling(32, "mean"),
             st_modules.Normalize()]
  model = st.SentenceTransformer(modules=modules, device="cpu")
  model.save(str(tmp_path / "st"))
  ref = model.encode(TEXTS, convert_to_numpy=True, batch_size=2)
  emb = embedders.MiniLMEmbedder(str(tmp_path / "st"), max_seq_length=48)
  ours = emb.embed(TEXTS)
  features = model.tokenize(TEXTS)
  want_ids = [
      row[m.bool()].tolist() for row, m in zip(features["input_ids"], features["attention_mask"])
  ]
  assert [e.ids for e in emb.tokenize(TEXTS)] == want_ids
  assert (ours * ref).sum(-1).min() >= 0.9999 and np.abs(ours - ref).max() <= 1e-5
