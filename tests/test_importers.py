"""Tests for importers, on generated fixtures that use the real key names of the paper's and PEFT's
files."""

import json
import os

import numpy as np
import pytest
from safetensors.numpy import save_file

from expert_t5x import expert_format
from expert_t5x import importers
from expert_t5x import merging

BASE = "b" * 64
D, R, LAYERS = 8, 2, 2


def paper_state(task="cosmos_qa", seed=0):
  """A paper adapter state dict with the original HF names (adapters embed the training-task
  key)."""
  rng = np.random.default_rng(seed)
  state = {}
  for stack, subs in (("encoder", (0, 1)), ("decoder", (0, 2))):
    for i in range(LAYERS):
      for sub in subs:
        p = f"{stack}.block.{i}.layer.{sub}.adapter_controller.adapters.{task}."
        state[p + "down_sampler.weight"] = rng.normal(size=(R, D)).astype(np.float32)
        state[p + "down_sampler.bias"] = rng.normal(size=(R,)).astype(np.float32)
        state[p + "up_sampler.weight"] = rng.normal(size=(D, R)).astype(np.float32)
        state[p + "up_sampler.bias"] = rng.normal(size=(D,)).astype(np.float32)
      for sub in ((0, 1) if stack == "encoder" else (0, 1, 2)):
        state[f"{stack}.block.{i}.layer.{sub}.layer_norm.weight"] = rng.normal(size=(D,)).astype(
            np.float32)
    state[f"{stack}.final_layer_norm.weight"] = rng.normal(size=(D,)).astype(np.float32)
  return state


def test_convert_paper_adapter_names_and_orientation():
  state = paper_state()
  flat, info = importers.convert_paper_adapter(state)
  assert info["task_key"] == "cosmos_qa" and info["reduction_factor"] == D // R
  # 2 stacks x 2 layers x 2 adapters x 4 tensors + layer norms (enc 2x2+1, dec 2x3+1).
  assert len(flat) == 32 + 5 + 7
  np.testing.assert_array_equal(
      flat["encoder/layers_1/mlp_adapter/wi/kernel"],
      state["encoder.block.1.layer.1.adapter_controller.adapters.cosmos_qa.down_sampler.weight"].T)
  np.testing.assert_array_equal(
      flat["decoder/layers_0/mlp_adapter/wo/bias"],
      state["decoder.block.0.layer.2.adapter_controller.adapters.cosmos_qa.up_sampler.bias"])
  np.testing.assert_array_equal(flat["decoder/layers_1/self_attention_adapter/wo/kernel"],
                                state["decoder.block.1.layer.0.adapter_controller.adapters.cosmos_qa."
                                      "up_sampler.weight"].T)
  np.testing.assert_array_equal(flat["decoder/layers_0/pre_cross_attention_layer_norm/scale"],
                                state["decoder.block.0.layer.1.layer_norm.weight"])
  np.testing.assert_array_equal(flat["encoder/encoder_norm/scale"],
                                state["encoder.final_layer_norm.weight"])
  assert flat["encoder/layers_0/attention_adapter/wi/kernel"].shape == (D, R)


def test_convert_paper_adapter_errors():
  state = paper_state()
  mixed = dict(state, **{k.replace("cosmos_qa", "dream"): v for k, v in paper_state("dream").items()
                         if "adapters" in k})
  with pytest.raises(importers.ImportError_, match="task keys"):
    importers.convert_paper_adapter(mixed)
  with pytest.raises(importers.ImportError_, match="not paper adapter"):
    importers.convert_paper_adapter(dict(state, **{"shared.weight": np.zeros((3, D))}))
  cross = {
      "decoder.block.0.layer.1.adapter_controller.adapters.t.down_sampler.weight": np.zeros((R, D))
  }
  with pytest.raises(importers.ImportError_, match="sub-layer 1"):
    importers.convert_paper_adapter(cross)


@pytest.mark.parity
def test_import_paper_adapter_pt_files(tmp_path):
  """Reads per-parameter .pt files written by torch.save, as the paper's run_seq2seq.py saved
  them."""
  torch = pytest.importorskip("torch")
  src = tmp_path / "expert_weights" / "cosmos_qa" / "no_prompt_text" / "adapter_params"
  src.mkdir(parents=True)
  state = paper_state()
  for name, value in state.items():
    torch.save(torch.from_numpy(value), src / f"{name}.pt")
  out = tmp_path / "expert"
  assert importers.import_main([
      "paper-adapter",
      str(src), "--output",
      str(out), "--base-fingerprint", BASE, "--base-config", "tiny"
  ]) == 0
  params, meta = expert_format.load_expert(out)
  assert meta["type"] == "adapter" and meta["config"]["init_seed"] is None
  assert meta["provenance"][0]["dataset"] == "cosmos_qa" and meta["provenance"][0][
      "prompt"] == "no_prompt_text"
  assert meta["training"]["task_key"] == "cosmos_qa"
  flat = expert_format.flatten_params(params)
  np.testing.assert_array_equal(flat["encoder/layers_0/attention_adapter/wo/kernel"],
                                state["encoder.block.0.layer.0.adapter_controller.adapters.cosmos_qa."
                                      "up_sampler.weight"].T)
  # One state-dict .pt file imports to the same tensors.
  torch.save({k: torch.from_numpy(v) for k, v in state.items()}, tmp_path / "state.pt")
  h = importers.import_paper_adapter(str(tmp_path / "state.pt"),
                                     str(tmp_path / "e2"),
                                     base_fingerprint=BASE)
  assert h == meta["content_hash"]


def peft_fixture(directory, seed=0, r=4, alpha=8, rslora=False, extra_config=None):
  """A PEFT LoRA adapter directory for T5 (q/v of every attention, wo of the MLP), real key
  names."""
  rng = np.random.default_rng(seed)
  modules = []
  for i in range(LAYERS):
    modules += [f"encoder.block.{i}.layer.0.SelfAttention.{p}" for p in "qv"]
    modules += [f"decoder.block.{i}.layer.0.SelfAttention.{p}" for p in "qv"]
    modules += [f"decoder.block.{i}.layer.1.EncDecAttention.{p}" for p in "qv"]
    modules += [
        f"encoder.block.{i}.layer.1.DenseReluDense.wo",
        f"decoder.block.{i}.layer.2.DenseReluDense.wo"
    ]
  state = {}
  for m in modules:
    fan_in = 3 * D if m.endswith("wo") else D
    state[f"base_model.model.{m}.lora_A.weight"] = rng.normal(size=(r, fan_in)).astype(np.float32)
    state[f"base_model.model.{m}.lora_B.weight"] = rng.normal(size=(D, r)).astype(np.float32)
  os.makedirs(directory, exist_ok=True)
  save_file(state, os.path.join(directory, "adapter_model.safetensors"))
  config = {
      "peft_type": "LORA", "task_type": "SEQ_2_SEQ_LM", "r": r, "lora_alpha": alpha,
      "target_modules": ["q", "v", "wo"], "lora_dropout": 0.05, "bias": "none",
      "use_rslora": rslora, "fan_in_fan_out": False, "rank_pattern": {}, "alpha_pattern": {},
      "base_model_name_or_path": "google/t5-xl-lm-adapt", **(extra_config or {})
  }
  with open(os.path.join(directory, "adapter_config.json"), "w") as f:
    json.dump(config, f)
  return state


@pytest.mark.parametrize("rslora", [False, True])
def test_import_peft_lora_delta_w_matches_peft(tmp_path, rslora):
  """ΔW of the imported expert equals PEFT's scale·B@A (transposed to T5X's [in, out])."""
  state = peft_fixture(tmp_path / "peft", r=4, alpha=8, rslora=rslora)
  out = tmp_path / "expert"
  assert importers.import_main(["peft-lora", str(tmp_path / "peft"), "--output", str(out),
                                "--base-fingerprint", BASE, "--dataset", "xsum"]) == 0
  params, meta = expert_format.load_expert(out)
  flat = expert_format.flatten_params(params)
  assert meta["type"] == "lora" and meta["config"]["rank"] == 4 and meta["provenance"][0][
      "dataset"] == "xsum"
  scale = 8 / (2.0 if rslora else 4.0)
  ours_scale = meta["config"]["alpha"] / meta["config"]["rank"]
  for hf, ours in [("decoder.block.1.layer.1.EncDecAttention.v",
                    "decoder/layers_1/encoder_decoder_attention/value"),
                   ("encoder.block.0.layer.1.DenseReluDense.wo", "encoder/layers_0/mlp/wo"),
                   ("encoder.block.1.layer.0.SelfAttention.q", "encoder/layers_1/attention/query")]:
    peft_delta = scale * state[f"base_model.model.{hf}.lora_B.weight"].astype(np.float64) @ \
        state[f"base_model.model.{hf}.lora_A.weight"]
    ours_delta = merging.lora_delta(flat[f"{ours}/lora_a"], flat[f"{ours}/lora_b"], ours_scale)
    np.testing.assert_allclose(ours_delta, peft_delta.T, rtol=1e-5, atol=1e-6)
  # The targets regexes cover exactly the imported modules.
  import re
  modules = {n[:-len("/lora_a")] for n in flat if n.endswith("/lora_a")}
  assert all(any(re.search(t, m) for t in meta["config"]["targets"]) for m in modules)


def test_peft_alpha_pattern_matches_module_suffixes_first_pattern_first(tmp_path):
  """alpha_pattern as PEFT resolves it (hand-computed): a pattern matches the whole module name or
  a dotted suffix of it, and the first matching pattern in the file wins. 'k' matches no module
  here (it must not match 'block' inside a q projection's name)."""
  patterns = {"k": 64, "SelfAttention.v": 2, "v": 32}
  state = peft_fixture(tmp_path / "peft", r=4, alpha=8, extra_config={"alpha_pattern": patterns})
  flat, _ = importers.convert_peft_lora(
      {k: v for k, v in state.items()},
      json.load(open(tmp_path / "peft" / "adapter_config.json")))
  for hf, ours, scale in [
      ("encoder.block.0.layer.0.SelfAttention.q", "encoder/layers_0/attention/query", 8 / 4),
      ("encoder.block.0.layer.0.SelfAttention.v", "encoder/layers_0/attention/value", 2 / 4),
      ("decoder.block.1.layer.1.EncDecAttention.v",
       "decoder/layers_1/encoder_decoder_attention/value", 32 / 4),
      ("encoder.block.1.layer.1.DenseReluDense.wo", "encoder/layers_1/mlp/wo", 8 / 4)
  ]:
    want = scale * state[f"base_model.model.{hf}.lora_B.weight"].astype(np.float64)
    np.testing.assert_allclose(flat[f"{ours}/lora_b"], want.T, rtol=1e-6)


def test_import_peft_lora_errors(tmp_path, capsys):
  peft_fixture(tmp_path / "p1", extra_config={"rank_pattern": {"q": 8}})
  with pytest.raises(importers.ImportError_, match="rank_pattern"):
    importers.import_peft_lora(str(tmp_path / "p1"), str(tmp_path / "o1"), base_fingerprint=BASE)
  with pytest.raises(importers.ImportError_, match="not a T5"):
    importers.convert_peft_lora(
        {
            "base_model.model.foo.bar.lora_A.weight": np.zeros(
                (2, 2)), "base_model.model.foo.bar.lora_B.weight": np.zeros((2, 2))
        }, {"r": 2})
  with pytest.raises(importers.ImportError_, match="not a LoRA factor"):
    importers.convert_peft_lora({"base_model.model.shared.weight": np.zeros((2, 2))}, {"r": 2})
  assert importers.import_main(["peft-lora", str(tmp_path), "--output", str(tmp_path / "o2"),
                                "--base-fingerprint", BASE]) == 1
  assert "adapter_model.safetensors is missing" in capsys.readouterr().err
  with pytest.raises(SystemExit) as e:
    importers.import_main(["--help"])
  assert e.value.code == 0
