"""Benchmarks T5 forward+backward throughput: expert_t5x (JAX) vs transformers' PyTorch T5 on CPU.

Both sides run the same T5 1.1 shape (default: our `get_config('small')`), the same batch of
random tokens without padding, and the same number of threads: the process is pinned to
`--threads` cores, XLA's CPU intra-op pool and torch's intra-op pool are both set to
`--threads`. One step = loss forward + gradients w.r.t. all parameters (no optimizer update).
Each configuration is timed `--runs` times after `--warmup` steps; the median is reported as
tokens/s, with tokens = batch * (input_len + target_len).

  python bench/bench_t5_vs_torch.py --threads 2 --batch 4 --runs 5
"""

import argparse
import os
import statistics
import time

from bench_common import cpu_model, pin_threads


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="small", help="expert_t5x.network config name")
  parser.add_argument("--threads", type=int, default=2)
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--input_len", type=int, default=256)
  parser.add_argument("--target_len", type=int, default=128)
  parser.add_argument("--runs", type=int, default=5)
  parser.add_argument("--warmup", type=int, default=1)
  parser.add_argument("--dropout_rate", type=float, default=0.1,
                      help="rate used in the 'with dropout' rows")
  parser.add_argument("--only", choices=("jax", "torch"), default=None)
  return parser.parse_args(argv)


def random_tokens(batch, input_len, target_len, vocab, seed=0):
  import numpy as np
  rng = np.random.default_rng(seed)
  enc = rng.integers(2, vocab, (batch, input_len)).astype(np.int32)
  tgt = rng.integers(2, vocab, (batch, target_len)).astype(np.int32)
  enc[:, -1] = 1
  tgt[:, -1] = 1
  dec_in = np.zeros_like(tgt)
  dec_in[:, 1:] = tgt[:, :-1]
  return enc, dec_in, tgt


def time_interleaved(steps, runs, warmup):
  """Times each step function `runs` times, alternating between them so that
  any background load hits all of them alike. Returns one list per step."""
  for step in steps:
    for _ in range(warmup):
      step()
  times = [[] for _ in steps]
  for _ in range(runs):
    for step, out in zip(steps, times):
      start = time.perf_counter()
      step()
      out.append(time.perf_counter() - start)
  return times


def jax_step(config, tokens, dropout):
  """Our network: jit(value_and_grad(loss_fn)) w.r.t. all parameters."""
  import jax
  import jax.numpy as jnp
  from expert_t5x import models, network
  config = config.replace(dropout_rate=dropout)
  model = models.EncoderDecoderModel(network.Transformer(config))
  enc, dec_in, tgt = (jnp.asarray(x) for x in tokens)
  params = model.get_initial_variables(
      jax.random.PRNGKey(0), {"encoder_input_tokens": enc.shape,
                              "decoder_input_tokens": dec_in.shape})["params"]
  batch = {"encoder_input_tokens": enc, "decoder_input_tokens": dec_in,
           "decoder_target_tokens": tgt,
           "decoder_loss_weights": jnp.ones(tgt.shape, jnp.float32)}

  @jax.jit
  def grad_step(params, batch, rng):
    loss_fn = lambda p: model.loss_fn(p, batch, rng if dropout else None)[0]
    return jax.value_and_grad(loss_fn)(params)

  rng = [jax.random.PRNGKey(1)]

  def step():
    rng[0], sub = jax.random.split(rng[0])  # fresh dropout masks every step
    jax.block_until_ready(grad_step(params, batch, sub))

  return step


def torch_step(config, tokens, dropout, threads):
  """transformers' T5ForConditionalGeneration with the same shape: loss.backward()."""
  import torch
  import transformers
  torch.set_num_threads(threads)
  hf_config = transformers.T5Config(
      vocab_size=config.vocab_size, d_model=config.emb_dim, d_kv=config.head_dim,
      d_ff=config.mlp_dim, num_layers=config.num_encoder_layers,
      num_decoder_layers=config.num_decoder_layers, num_heads=config.num_heads,
      feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=dropout)
  torch.manual_seed(0)
  model = transformers.T5ForConditionalGeneration(hf_config)
  # The untied output layer of T5 1.1 (a newer transformers ties it on construction).
  model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
  model.train(dropout > 0)
  enc, dec_in, tgt = (torch.from_numpy(x).long() for x in tokens)

  def step():
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=enc, decoder_input_ids=dec_in).logits
    loss = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), reduction="sum")
    loss.backward()

  return step


def main(argv=None):
  args = parse_args(argv)
  pin_threads(args.threads)
  import jax  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  from expert_t5x import network  # pylint: disable=g-import-not-at-top
  config = network.get_config(args.config)
  tokens = random_tokens(args.batch, args.input_len, args.target_len, config.vocab_size)
  n_tokens = args.batch * (args.input_len + args.target_len)
  print(f"# {cpu_model()}, {args.threads} thread(s) of {os.cpu_count()} cores; "
        f"jax {jax.__version__}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}")
  print(f"# config {args.config} (emb {config.emb_dim}, {config.num_encoder_layers}+"
        f"{config.num_decoder_layers} layers, mlp {config.mlp_dim}, vocab {config.vocab_size}), "
        f"batch {args.batch}, input {args.input_len}, target {args.target_len}, "
        f"median of {args.runs} runs after {args.warmup} warm-up")
  rows = []
  for label, rate in (("no dropout", 0.0), (f"dropout {args.dropout_rate}", args.dropout_rate)):
    steps = {}
    if args.only != "torch":
      steps["jax"] = jax_step(config, tokens, rate)
    if args.only != "jax":
      steps["torch"] = torch_step(config, tokens, rate, args.threads)
    times = dict(zip(steps, time_interleaved(list(steps.values()), args.runs, args.warmup)))
    for name, values in times.items():
      print(f"# {label}, {name}: s/step per run " + " ".join(f"{t:.2f}" for t in values))
    rows.append((label, times.get("jax"), times.get("torch")))
    del steps
  print(f"# load average after the runs: {os.getloadavg()[0]:.2f}")
  print("| setting | expert_t5x (JAX) tokens/s | PyTorch T5 tokens/s | ratio JAX/PyTorch "
        "(median; best run) |")
  print("| --- | --- | --- | --- |")
  for label, ours, theirs in rows:
    fmt = lambda t: (f"{n_tokens / statistics.median(t):,.0f} "
                     f"({statistics.median(t):.2f} s/step)") if t else "-"
    ratio = (f"{statistics.median(theirs) / statistics.median(ours):.2f}x; "
             f"{min(theirs) / min(ours):.2f}x") if ours and theirs else "-"
    print(f"| {label} | {fmt(ours)} | {fmt(theirs)} | {ratio} |")


if __name__ == "__main__":
  main()
