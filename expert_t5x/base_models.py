"""Base models: the frozen base every expert is applied to, read once from one place.

`read_base_checkpoint` is the one reader of a base checkpoint (HF T5 or T5X) for every consumer:
evaluation (`load_base`), training and merging. `load_base` adds the network config, the
activation dtype and what identifies the base (parameter fingerprint, vocabulary fingerprint), or
builds random parameters of a named config for demos and tests.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from expert_t5x import models
from expert_t5x import network
from expert_t5x import vocab_identity
from expert_t5x.scoring import MIN_BUCKET

PyTree = Any


@dataclasses.dataclass
class BaseCheckpoint:
  """A base checkpoint as read: its parameters, its config (None for T5X checkpoints, which carry
  none) and `checkpoint_importer.load_params`'s info (format, path, vocab_path, ...)."""
  params: PyTree
  config: Optional[network.T5Config]
  info: dict[str, Any]

  @property
  def vocab_path(self) -> Optional[str]:
    return self.info.get("vocab_path")

  @property
  def vocab_fingerprint(self) -> Optional[str]:
    """The SentencePiece file's identity (`vocab_identity`), None when the checkpoint has none."""
    return vocab_identity.spm_file_fingerprint(self.vocab_path) if self.vocab_path else None


def read_base_checkpoint(path: str | os.PathLike[str]) -> BaseCheckpoint:
  """Reads a base checkpoint: an HF T5 directory or a T5X checkpoint."""
  from expert_t5x import checkpoint_importer  # pylint: disable=g-import-not-at-top
  params, config, info = checkpoint_importer.load_params(path)
  return BaseCheckpoint(params, config, dict(info))


@dataclasses.dataclass
class BaseModel:
  """The frozen base: parameters, network config and what identifies it."""
  params: PyTree
  config: network.T5Config
  description: str
  fingerprint: Optional[str]
  vocab_fingerprint: Optional[str] = None


def _dtype(name: str) -> Any:
  table = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
  if name not in table:
    raise ValueError(f"dtype must be one of {sorted(table)}; got {name!r}.")
  return table[name]


_INITS: dict[network.T5Config, Callable] = {}


def _random_init(config: network.T5Config) -> Callable:
  """The jitted parameter initialiser of a config (compiled once per process)."""
  if config not in _INITS:
    model = models.EncoderDecoderModel(network.Transformer(config))
    _INITS[config] = jax.jit(lambda rng: model.get_initial_variables(
        rng, {"encoder_input_tokens": (1, MIN_BUCKET),
              "decoder_input_tokens": (1, MIN_BUCKET)})["params"])
  return _INITS[config]


def load_base(checkpoint_path: Optional[str] = None, model_config: Optional[str] = None,
              random_init_seed: Optional[int] = None, dtype: str = "float32",
              config_overrides: Optional[Mapping[str, Any]] = None) -> BaseModel:
  """Loads a base checkpoint (HF T5 or T5X), or builds random parameters for a named config.

  Args:
    checkpoint_path: an HF T5 directory or a T5X checkpoint (`checkpoint_importer.load_params`).
    model_config: a `network.get_config` name ('tiny', 'small', ..., 'xl'); needed for random
      parameters, optional for checkpoints (T5X checkpoints carry no config: it is inferred).
    random_init_seed: with no checkpoint, initialise random parameters with this seed (demos,
      tests, plumbing checks; the numbers mean nothing).
    dtype: activation dtype ('float32' or 'bfloat16'); parameters stay float32.
    config_overrides: T5Config fields to override (e.g. vocab_size for a byte vocabulary).
  """
  from expert_t5x import checkpoint_importer  # pylint: disable=g-import-not-at-top
  overrides = dict(config_overrides or {})
  overrides["dtype"] = _dtype(dtype)
  if checkpoint_path:
    ckpt = read_base_checkpoint(checkpoint_path)
    config = ckpt.config
    if config is None:
      config = (network.get_config(model_config) if model_config
                else checkpoint_importer.infer_t5_config(ckpt.params))
    config = config.replace(**overrides)
    return BaseModel(ckpt.params, config, os.path.abspath(checkpoint_path),
                     checkpoint_importer.base_fingerprint(ckpt.params), ckpt.vocab_fingerprint)
  if model_config is None or random_init_seed is None:
    raise ValueError(
        "No base model: pass checkpoint_path (--checkpoint_path, an HF T5 directory or "
        "a T5X checkpoint), or model_config and random_init_seed for random parameters.")
  config = network.get_config(model_config, **overrides)
  params = jax.tree.map(np.asarray, _random_init(config)(jax.random.PRNGKey(random_init_seed)))
  return BaseModel(params, config, f"random:{model_config}:seed={random_init_seed}",
                   checkpoint_importer.base_fingerprint(params))
