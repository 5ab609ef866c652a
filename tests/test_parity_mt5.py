"""mT5 bases (the paper's compositional experts are on google/mt5-xl) load through the same HF
importer: a random MT5ForConditionalGeneration saved by transformers gives transformers' logits."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position

from expert_t5x import checkpoint_importer  # pylint: disable=wrong-import-position
from expert_t5x import models  # pylint: disable=wrong-import-position
from expert_t5x import network  # pylint: disable=wrong-import-position
from test_parity_hf import ATOL, VOCAB, _batch, _torch_forward  # pylint: disable=wrong-import-position

pytestmark = pytest.mark.parity


def test_mt5_checkpoint_imports_and_matches_transformers(tmp_path):
  torch.manual_seed(0)
  # As google/mt5-xl's config.json: gated-gelu, untied output layer (T5 1.1 with a 250k vocabulary).
  cfg = transformers.MT5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                               num_decoder_layers=2, num_heads=4, dropout_rate=0.0,
                               feed_forward_proj="gated-gelu", tie_word_embeddings=False)
  assert cfg.model_type == "mt5"
  model = transformers.MT5ForConditionalGeneration(cfg).eval()
  with torch.no_grad():
    model.lm_head.weight = torch.nn.Parameter(torch.randn(VOCAB, 32))
    for name, p in model.named_parameters():
      if name.endswith("layer_norm.weight"):
        p.copy_(1.0 + 0.2 * torch.randn_like(p))
  model.save_pretrained(str(tmp_path))
  params, config, _ = checkpoint_importer.load_hf_t5(tmp_path, dropout_rate=0.0)
  # The released config.json (google/mt5-xl) says tie_word_embeddings false; transformers 5 writes
  # true for every mT5. Both import the same way.
  hub_dir = tmp_path / "as_released"
  hub_dir.mkdir()
  for f in tmp_path.iterdir():
    if f.is_file():
      (hub_dir / f.name).write_bytes(f.read_bytes())
  released = json.loads((tmp_path / "config.json").read_text())
  released["tie_word_embeddings"] = False
  (hub_dir / "config.json").write_text(json.dumps(released))
  params2, config2, _ = checkpoint_importer.load_hf_t5(hub_dir, dropout_rate=0.0)
  assert config2 == config
  assert all(
      np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params2)))
  assert config.mlp_activations == ("gelu", "linear") and not config.logits_via_embedding
  enc, dec_in, tgt = _batch()
  _, hf_logits = _torch_forward(model, enc, dec_in)
  ours = models.EncoderDecoderModel(network.Transformer(config))
  logits = ours.module.apply({"params": params}, jnp.asarray(enc, jnp.int32),
                             jnp.asarray(dec_in, jnp.int32), jnp.asarray(tgt, jnp.int32),
                             enable_dropout=False)
  mask = tgt > 0
  assert np.abs(np.asarray(logits) - hf_logits)[mask].max() <= ATOL
  assert hf_logits[mask].std() > 1000 * ATOL
