r"""Inference on free inputs (T5X's infer): generate, or score given targets / answer choices, with
a base model alone or with an expert (a merge is an expert directory too).

Gin::

    python -m expert_t5x.infer --gin_file=runs/infer.gin \
      --gin.CHECKPOINT_PATH="'/ckpt/t5-xl-lm-adapt'" --gin.EXPERT_PATH="'/lib/experts/merge_top3'" \
      --gin.INFER_INPUTS="['Is the sky blue? yes or no']" --gin.INFER_OUTPUT_FILE="'/tmp/out.jsonl'"

Command line::

    expert-t5x infer --checkpoint_path /ckpt/t5-xl-lm-adapt --expert /lib/experts/a \
      --input_file questions.jsonl --mode score --output_file scores.jsonl

Inputs are strings, or JSONL objects with `inputs` and optionally `targets` or `answer_choices`
(a plain text file gives one input per line). Modes: `predict` (greedy decoding) and `score`
(summed log-probs incl. EOS of each answer choice, or of `targets`; the argmax choice is `pred`).
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
from typing import Any, Mapping, Optional, Sequence


from expert_t5x import aggregation
from expert_t5x import eval_experts
from expert_t5x import eval_tasks
from expert_t5x import partitioning
from expert_t5x import results as results_lib
from expert_t5x import scoring as scoring_lib
from expert_t5x import validation

MODES = ("predict", "score")


def read_inputs(path: str) -> list[dict[str, Any]]:
  """A `.jsonl` file of objects with `inputs` (+ `targets` / `answer_choices`), or plain text."""
  with open(path, encoding="utf-8") as f:
    lines = [line.rstrip("\n") for line in f if line.strip()]
  if not path.endswith(".jsonl"):
    return [{"inputs": line} for line in lines]
  rows = []
  for i, line in enumerate(lines, 1):
    row = json.loads(line)
    if not isinstance(row, dict) or "inputs" not in row:
      raise ValueError(f"'{path}' line {i}: expected a JSON object with an 'inputs' field.")
    rows.append(row)
  return rows


def make_vocabulary(vocabulary_path: Optional[str], checkpoint_path: Optional[str]) -> Any:
  """'bytes' -> seqio.ByteVocabulary; a SentencePiece file (default: the checkpoint's)."""
  import seqio  # pylint: disable=g-import-not-at-top
  from expert_t5x import checkpoint_importer  # pylint: disable=g-import-not-at-top
  if vocabulary_path == "bytes":
    return seqio.ByteVocabulary()
  path = vocabulary_path or (checkpoint_importer.find_vocab(checkpoint_path)
                             if checkpoint_path else None)
  if not path:
    raise ValueError("No vocabulary: pass vocabulary_path (--vocabulary_path: a SentencePiece "
                     "spiece.model, or 'bytes' for the byte vocabulary of the demo tasks).")
  return seqio.SentencePieceVocabulary(path)


def infer(*, output_file: Optional[str] = None, inputs: Sequence[Any] = (),
          input_file: Optional[str] = None, mode: str = "predict",
          checkpoint_path: Optional[str] = None, model_config: Optional[str] = None,
          random_init_seed: Optional[int] = None,
          config_overrides: Optional[Mapping[str, Any]] = None,
          expert_path: Optional[str] = None, vocabulary_path: Optional[str] = None,
          batch_size: int = 8, max_input_length: int = 512, max_decode_length: int = 128,
          scoring: str = "sum", logit_vocab_limit: Optional[int] = None,
          partitioner: Optional[partitioning.PjitPartitioner] = None,
          dtype: str = "float32", allow_base_mismatch: bool = False,
          vocabulary: Any = None) -> list[dict[str, Any]]:
  """Runs the base (+ expert) on free inputs; writes and returns one record per input.

  The base keywords are `eval.BaseConfig`'s fields; `partitioner` is the mesh and logical axis
  rules (default: `PjitPartitioner()`; gin's partitioning presets configure it).

  Returns:
    `predict`: {'inputs', 'prediction'}; `score`: {'inputs', 'choices', 'scores', 'pred'}.
  """
  if mode not in MODES:
    raise validation.UsageError(f"mode must be one of {MODES}; got {mode!r}.")
  from expert_t5x import eval as eval_lib  # pylint: disable=g-import-not-at-top
  base_cfg = eval_lib.BaseConfig(checkpoint_path, model_config, random_init_seed, config_overrides,
                                 dtype, vocabulary_path)
  _check_inputs(output_file=output_file, input_file=input_file, expert_path=expert_path,
                batch_size=batch_size, max_input_length=max_input_length,
                max_decode_length=max_decode_length)
  base_cfg.check_paths()
  rows = [r if isinstance(r, Mapping) else {"inputs": str(r)} for r in inputs]
  if input_file:
    rows += read_inputs(input_file)
  if not rows:
    raise ValueError("No inputs: pass inputs (INFER_INPUTS / --inputs) or an input_file.")
  options = scoring_lib.ScoringOptions(scoring=scoring, logit_vocab_limit=logit_vocab_limit)
  base = base_cfg.load()
  vocabulary = vocabulary or make_vocabulary(vocabulary_path, checkpoint_path)
  specs = eval_experts.load_expert_specs([expert_path]) if expert_path else []
  eval_experts.check_expert_bases(specs, base.fingerprint, allow_base_mismatch)
  eval_tasks.check_vocabulary("infer inputs", vocabulary, base.config.vocab_size, options,
                              {"the base checkpoint": base.vocab_fingerprint})
  scorer = scoring_lib.Scorer(base.config, base.params,
                             partitioner or partitioning.PjitPartitioner(), options)
  scorer.set_chunk(eval_experts.Chunk(specs))
  lengths = {"inputs": max_input_length, "targets": None}
  if mode == "predict":
    out = _predict(scorer, rows, vocabulary, lengths, batch_size, max_decode_length)
  else:
    out = _score(scorer, rows, vocabulary, lengths, batch_size, options)
  if output_file:
    results_lib.write_jsonl(output_file, out)
  return out


def _check_inputs(*, output_file: Optional[str], input_file: Optional[str],
                  expert_path: Optional[str], **lengths: int) -> None:
  """`infer`'s own keywords (its base's are `eval.BaseConfig`'s), named by their flags."""
  for name, value in lengths.items():
    validation.positive_int(f"--{name}", value)
  if input_file:
    validation.existing_file("--input_file", input_file, "a .jsonl or .txt file of inputs")
  if expert_path:
    validation.existing_dir("--expert", expert_path, "an expert directory")
  if output_file:
    validation.output_file("--output_file", output_file, [input_file or ""])


def _predict(scorer, rows, vocabulary, lengths, batch_size, max_decode_length):
  examples = [{"inputs": r["inputs"], "targets": ""} for r in rows]
  encoded, _ = scoring_lib.encode_examples(examples, vocabulary, lengths, scoring=False)
  texts = scorer.generate_encoded(encoded, vocabulary, batch_size, max_decode_length)
  return [{"inputs": r["inputs"], "prediction": texts[i][0]} for i, r in enumerate(rows)]


def _score(scorer, rows, vocabulary, lengths, batch_size, options):
  choices = []
  for i, r in enumerate(rows):
    c = r.get("answer_choices") or ([r["targets"]] if r.get("targets") is not None else [])
    if not c:
      raise ValueError(f"Input {i} has neither 'answer_choices' nor 'targets' to score; mode "
                       "'score' needs one of them (or use mode 'predict').")
    choices.append([str(x) for x in c])
  examples = [{"inputs": r["inputs"], "answer_choices": c} for r, c in zip(rows, choices)]
  encoded, _ = scoring_lib.encode_examples(examples, vocabulary, lengths, scoring=True)
  scores = scorer.score_encoded(encoded, batch_size)  # {row: [1, K]}
  records = []
  for i, (r, c) in enumerate(zip(rows, choices)):
    s = scoring_lib.choice_scores(scores[i][0], c, options)
    records.append({"inputs": r["inputs"], "choices": c, "scores": s.tolist(),
                    "pred": int(aggregation.predict(s)), "scoring": options.scoring})
  return records


# ------------------------------------------------------------------------------------ entry


def main(argv: Sequence[str]) -> None:
  """absl main for `python -m expert_t5x.infer --gin_file=...`."""
  del argv
  from expert_t5x import gin_utils  # pylint: disable=g-import-not-at-top
  for record in gin_utils.call_configured(infer, "expert_t5x.infer") or []:
    print(results_lib.dumps(record))


def gin_main(argv: Optional[Sequence[str]] = None) -> int:
  """Runs the gin entry point with `argv` (program name first)."""
  from expert_t5x import gin_utils  # pylint: disable=g-import-not-at-top
  return gin_utils.run_for_exit_code(main, argv)


def _parser() -> argparse.ArgumentParser:
  # Defaults come from `infer`'s signature and the partitioner's field: declared once.
  defaults = {k: v.default for k, v in inspect.signature(infer).parameters.items()}
  p = argparse.ArgumentParser(prog="expert-t5x infer",
                              description="Generate or score free inputs with a base + expert.")
  p.add_argument("--inputs", nargs="*", default=list(defaults["inputs"]), help="input strings")
  p.add_argument("--input_file", help=".jsonl with inputs (+ targets/answer_choices) or .txt")
  p.add_argument("--mode", default=defaults["mode"], choices=MODES)
  p.add_argument("--output_file", help="write records as JSONL (also printed)")
  p.add_argument("--checkpoint_path")
  p.add_argument("--model_config")
  p.add_argument("--random_init_seed", type=int)
  p.add_argument("--vocab_size", type=int)
  p.add_argument("--expert", help="an expert or merge directory")
  p.add_argument("--vocabulary_path", help="spiece.model, or 'bytes'")
  for flag in ("batch_size", "max_input_length", "max_decode_length"):
    p.add_argument(f"--{flag}", type=int, default=defaults[flag])
  p.add_argument("--scoring", default=defaults["scoring"], choices=("sum", "mean", "per_char"))
  p.add_argument("--logit_vocab_limit", type=int)
  p.add_argument("--num_partitions", type=int,
                 default=partitioning.PjitPartitioner.num_partitions,  # the field's default
                 help="model-parallel devices (gin partitioning presets also set the rules)")
  p.add_argument("--dtype", default=defaults["dtype"], choices=("float32", "bfloat16"))
  p.add_argument("--allow_base_mismatch", action="store_true")
  return p


def cli_main(argv: Optional[Sequence[str]] = None) -> int:
  """`expert-t5x infer ...` (`--gin_file` switches to the gin entry point)."""
  argv = list(sys.argv[1:] if argv is None else argv)
  if any(a.startswith("--gin_file") for a in argv):
    return gin_main(["expert-t5x infer"] + argv)
  args = _parser().parse_args(argv)
  try:
    records = infer(
        output_file=args.output_file, inputs=args.inputs, input_file=args.input_file,
        mode=args.mode, checkpoint_path=args.checkpoint_path, model_config=args.model_config,
        random_init_seed=args.random_init_seed,
        config_overrides={"vocab_size": args.vocab_size} if args.vocab_size else None,
        expert_path=args.expert, vocabulary_path=args.vocabulary_path,
        batch_size=args.batch_size, max_input_length=args.max_input_length,
        max_decode_length=args.max_decode_length, scoring=args.scoring,
        logit_vocab_limit=args.logit_vocab_limit,
        partitioner=partitioning.PjitPartitioner(num_partitions=args.num_partitions),
        dtype=args.dtype, allow_base_mismatch=args.allow_base_mismatch)
  except (ValueError, KeyError, OSError) as e:
    return validation.report("expert-t5x infer", e, default=2)  # setup errors: 2
  for record in records:
    print(results_lib.dumps(record))
  return 0


if __name__ == "__main__":
  # As in expert_t5x.eval: gin binds the canonical module's `infer`.
  from expert_t5x import infer as _infer_module  # pylint: disable=g-import-not-at-top
  sys.exit(_infer_module.gin_main(sys.argv))
