"""Run in its own process with 8 fake CPU devices: the evaluator on a 4 (data) x 2 (model) mesh,
with stacked experts, gives the scores of per-pair scoring on one device. Exits non-zero on
mismatch."""

import os
import sys
import tempfile

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
sys.path.insert(0, os.path.dirname(__file__))

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
import numpy as np

from expert_t5x import base_models, evaluation, expert_format, experts, models, network, results
import eval_fakes


def main():
  assert jax.device_count() == 8, jax.devices()
  base = base_models.load_base(model_config="tiny", random_init_seed=0,
                               config_overrides={"vocab_size": eval_fakes.VOCAB_SIZE})
  source = eval_fakes.make_source(n=6)
  with tempfile.TemporaryDirectory() as root:
    paths = eval_fakes.save_adapter_experts(root, base.params, base.config, [1, 2],
                                            fingerprint=base.fingerprint)
    evaluation.evaluate(tasks="nli_p1", output_dir=os.path.join(root, "out"), base=base,
                        expert_paths=paths, include_base=True, batch_size=8, num_partitions=2,
                        progress=False, task_source=source, bootstrap_samples=0)
    preds = results.read_jsonl(os.path.join(root, "out", results.PREDICTIONS_FILE))
    trees = {"": None}
    trees.update({os.path.basename(p): expert_format.load_expert(p)[0] for p in paths})
  cfg = experts.AdapterConfig(reduction_factor=4)
  vocab = source.vocabulary("nli_p1")
  examples = {ex["example_id"]: ex for ex in source.examples("nli_p1", "validation", None)}
  device = jax.devices()[0]
  scorers = {}
  for key in ("base", "adapter"):
    model = models.EncoderDecoderModel(network.Transformer(base.config),
                                       expert_config=None if key == "base" else cfg)
    scorers[key] = jax.jit(lambda p, b, e, m=model: m.score_batch(p, b, expert=e), device=device)
  for name, tree in trees.items():
    recs = [r for r in preds if "".join(r["expert_ids"]) == name]
    # Every (input, choice) pair of this entry as its own row, fixed padding, one device.
    enc, tgt = [], []
    for rec in recs:
      ex = examples[rec["example_id"]]
      for choice in ex["answer_choices"]:
        enc.append(vocab.encode(ex["inputs"]) + [1])
        tgt.append(vocab.encode(choice) + [1])
    enc_a = np.zeros((len(enc), 64), np.int32)
    tgt_a = np.zeros((len(tgt), 16), np.int32)
    for i, (e, t) in enumerate(zip(enc, tgt)):
      enc_a[i, :len(e)], tgt_a[i, :len(t)] = e, t
    batch = {
        "encoder_input_tokens": jnp.asarray(enc_a), "decoder_target_tokens": jnp.asarray(tgt_a),
        "decoder_input_tokens": models.shift_right(jnp.asarray(tgt_a))
    }
    want = np.asarray(scorers["base" if tree is None else "adapter"](base.params, batch, tree))
    got = np.concatenate([r["choice_scores"] for r in recs])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  print("eval multidevice check: OK")


if __name__ == "__main__":
  main()
