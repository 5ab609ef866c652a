"""Parity with an independent implementation: transformers' PyTorch T5ForConditionalGeneration.

Both directions are checked on random gated-GELU weights: our tree -> `export_hf_t5` ->
`from_pretrained`, and HF `save_pretrained` -> `load_hf_t5` -> our network. Inputs are longer
than 128 tokens and padded, so the far (logarithmic) relative-position buckets are used.
Positions that are padding are skipped: T5X and HF legitimately differ there.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position

from expert_t5x import checkpoint_importer  # pylint: disable=wrong-import-position
from expert_t5x import models  # pylint: disable=wrong-import-position
from expert_t5x import network  # pylint: disable=wrong-import-position

pytestmark = pytest.mark.parity

VOCAB = 96
INPUT_LEN = 160  # > relative_attention_max_distance (128)
TARGET_LEN = 40  # > the decoder's 16 exact buckets
ATOL = 1e-4


def _batch(seed=0):
  """Ragged, zero-padded, EOS-terminated inputs and targets (one input is full length)."""
  rng = np.random.default_rng(seed)
  in_lens, tgt_lens = [INPUT_LEN, 131, 45], [TARGET_LEN, 23, 5]
  enc = np.zeros((3, INPUT_LEN), np.int64)
  tgt = np.zeros((3, TARGET_LEN), np.int64)
  for row, (n, m) in enumerate(zip(in_lens, tgt_lens)):
    enc[row, :n - 1] = rng.integers(2, VOCAB, n - 1)
    enc[row, n - 1] = 1
    tgt[row, :m - 1] = rng.integers(2, VOCAB, m - 1)
    tgt[row, m - 1] = 1
  dec_in = np.zeros_like(tgt)
  dec_in[:, 1:] = tgt[:, :-1]
  return enc, dec_in, tgt


def _hf_model_from_scratch():
  torch.manual_seed(0)
  cfg = transformers.T5Config(
      vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
      num_heads=4, feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=0.0)
  model = transformers.T5ForConditionalGeneration(cfg)
  with torch.no_grad():
    # T5 1.1: an output layer separate from the embedding; non-trivial layer norms.
    model.lm_head.weight = torch.nn.Parameter(torch.randn(VOCAB, 32))
    for name, p in model.named_parameters():
      if name.endswith("layer_norm.weight"):
        p.copy_(1.0 + 0.2 * torch.randn_like(p))
  return model.eval()


@pytest.fixture(scope="session")
def hf_to_ours(tmp_path_factory):
  """HF save_pretrained -> our importer."""
  model = _hf_model_from_scratch()
  path = tmp_path_factory.mktemp("hf_saved")
  model.save_pretrained(str(path))
  params, config, _ = checkpoint_importer.load_hf_t5(path, dropout_rate=0.0)
  return model, params, config


@pytest.fixture(scope="session")
def ours_to_hf(tmp_path_factory):
  """Our random tree -> export_hf_t5 -> from_pretrained."""
  config = network.get_config("tiny", vocab_size=VOCAB, dropout_rate=0.0)
  model = models.EncoderDecoderModel(network.Transformer(config))
  params = model.get_initial_variables(
      jax.random.PRNGKey(1), {"encoder_input_tokens": (1, 8), "decoder_input_tokens": (1, 4)}
  )["params"]
  rng = np.random.default_rng(1)
  params = jax.tree_util.tree_map_with_path(
      lambda p, x: np.asarray(x) * (1.0 + 0.2 * rng.normal(size=x.shape)).astype(np.float32)
      if str(p[-1].key) == "scale" else np.asarray(x), params)
  path = tmp_path_factory.mktemp("exported") / "t5"
  checkpoint_importer.export_hf_t5(params, config, path)
  hf_model, info = transformers.T5ForConditionalGeneration.from_pretrained(
      str(path), output_loading_info=True)
  assert not any(info.values()), info  # every tensor used, none missing
  return hf_model.eval(), params, config


@pytest.fixture(scope="session", params=["hf_to_ours", "ours_to_hf"])
def pair(request):
  model, params, config = request.getfixturevalue(request.param)
  ours = models.EncoderDecoderModel(network.Transformer(config))
  return model, ours, params


@pytest.fixture(scope="session")
def batch():
  return _batch()


def _torch_forward(model, enc, dec_in):
  with torch.no_grad():
    out = model(input_ids=torch.from_numpy(enc), attention_mask=torch.from_numpy(enc > 0),
                decoder_input_ids=torch.from_numpy(dec_in))
  return out.encoder_last_hidden_state.numpy(), out.logits.numpy()


def test_encoder_and_logits_match(pair, batch):
  model, ours, params = pair
  enc, dec_in, tgt = batch
  hf_encoded, hf_logits = _torch_forward(model, enc, dec_in)
  encoded = ours.module.apply({"params": params}, jnp.asarray(enc, jnp.int32),
                              method=network.Transformer.encode, enable_dropout=False)
  logits = ours.module.apply({"params": params}, jnp.asarray(enc, jnp.int32),
                             jnp.asarray(dec_in, jnp.int32), jnp.asarray(tgt, jnp.int32),
                             enable_dropout=False)
  enc_mask, tgt_mask = enc > 0, tgt > 0
  enc_diff = np.abs(np.asarray(encoded) - hf_encoded)[enc_mask].max()
  logit_diff = np.abs(np.asarray(logits) - hf_logits)[tgt_mask].max()
  assert enc_diff <= ATOL, enc_diff
  assert logit_diff <= ATOL, logit_diff
  # The comparison is not vacuous: logits vary by far more than the tolerance.
  assert hf_logits[tgt_mask].std() > 1000 * ATOL


def test_score_batch_matches_torch_log_probs(pair, batch):
  model, ours, params = pair
  enc, dec_in, tgt = batch
  _, hf_logits = _torch_forward(model, enc, dec_in)
  log_probs = torch.log_softmax(torch.from_numpy(hf_logits).double(), -1).numpy()
  want = (np.take_along_axis(log_probs, tgt[..., None], -1)[..., 0] * (tgt > 0)).sum(-1)
  got = ours.score_batch(params, {
      "encoder_input_tokens": jnp.asarray(enc, jnp.int32),
      "decoder_input_tokens": jnp.asarray(dec_in, jnp.int32),
      "decoder_target_tokens": jnp.asarray(tgt, jnp.int32),
      "decoder_loss_weights": jnp.asarray(tgt > 0, jnp.float32)})
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5)


def _torch_greedy(model, enc, steps):
  """Greedy decoding by full re-evaluation (no cache) with each step's top-2 margin."""
  tokens = np.zeros((enc.shape[0], 1), np.int64)
  margins = []
  for _ in range(steps):
    _, logits = _torch_forward(model, enc, tokens)
    last = logits[:, -1]
    top2 = np.sort(last, -1)[:, -2:]
    margins.append(top2[:, 1] - top2[:, 0])
    tokens = np.concatenate([tokens, last.argmax(-1)[:, None]], 1)
  return tokens[:, 1:], np.stack(margins, 1)


def test_greedy_decoding_matches(pair, batch):
  model, _, params = pair
  enc = batch[0]
  steps = 12
  ours = models.EncoderDecoderModel(pair[1].module, decode_fn="temperature_sample")
  got = np.asarray(ours.predict_batch(params, {
      "encoder_input_tokens": jnp.asarray(enc, jnp.int32),
      "decoder_input_tokens": jnp.zeros((enc.shape[0], steps), jnp.int32)},
      decoder_params={"temperature": 0.0}))
  want, margins = _torch_greedy(model, enc, steps)
  compared = 0
  for row in range(enc.shape[0]):
    for t in range(steps):
      if margins[row, t] < 1e-3:
        break  # near-tie: either token is a correct argmax
      assert got[row, t] == want[row, t], (row, t, got[row], want[row])
      compared += 1
      if want[row, t] == 1:
        break  # EOS: ours pads with 0 afterwards
  assert compared >= enc.shape[0]
