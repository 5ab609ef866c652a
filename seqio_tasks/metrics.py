"""Metrics and postprocessors for the registered tasks (seqio metric_fn signatures).

* rank classification (T5's contract): postprocessed targets are `(idx, is_correct, weight,
  target_length)` tuples and predictions are scores; per example (idx[0]) the argmax choice wins,
  ties to the lowest choice index; accuracy in percent. No length normalisation by default (the
  paper), `normalize_by_target_length=True` divides each score by its target length.
* generation: accuracy (exact string match), ROUGE-1/2/L F-measure (rouge-score, stemmed),
  corpus BLEU (sacrebleu, `tokenize="intl"`, as T5 and the paper's code), SQuAD EM/F1.
"""

from __future__ import annotations

import collections
import re
import string
from typing import Any, Mapping, Optional, Sequence

import numpy as np

# ------------------------------------------------------------------------------------------------
# Rank classification


def rank_classification_postprocessor(score: Any, example: Optional[Mapping[str, Any]] = None,
                                      is_target: bool = False,
                                      passthrough_feature_keys: Optional[Sequence[str]] = None):
  """Targets -> (idx, is_correct, weight, target_length); predictions (scores) unchanged."""
  if not is_target:
    return score
  idx = tuple(int(i) for i in np.asarray(example["idx"]).reshape(-1))
  weight = float(example["weight"]) if "weight" in example else 1.0
  out = (idx, bool(example["is_correct"]), weight, len(example["targets"]))
  if passthrough_feature_keys:
    out = out + tuple(example[k] for k in passthrough_feature_keys)
  return out


def rank_classification(targets: Sequence[tuple], scores: Sequence[float],
                        num_classes: Optional[int] = None,
                        normalize_by_target_length: bool = False) -> dict[str, float]:
  """Accuracy of the argmax candidate per example (percent), plus F1 for a fixed class count.

  Raises on duplicate `idx` (e.g. the same rows evaluated on two hosts), as T5 does.
  """
  if len(targets) != len(scores):
    raise ValueError(f"rank_classification: {len(targets)} targets but {len(scores)} scores.")
  rows = sorted(zip(targets, scores), key=lambda r: r[0][0])
  seen = set()
  groups: dict[int, list[tuple[int, bool, float, float]]] = collections.OrderedDict()
  for (idx, is_correct, weight, length, *_), score in rows:
    if idx in seen:
      raise ValueError(f"rank_classification: duplicate idx {idx}; each (example, choice) pair "
                       "must be scored exactly once.")
    seen.add(idx)
    value = float(score) / length if normalize_by_target_length else float(score)
    groups.setdefault(idx[0], []).append((idx[1], bool(is_correct), float(weight), value))
  correct, total = 0.0, 0.0
  predicted, gold = [], []
  for members in groups.values():
    members.sort(key=lambda m: m[0])
    values = np.array([m[3] for m in members])
    best = int(np.argmax(values))  # First maximum: ties go to the lowest choice index.
    weight = members[0][2]
    correct += weight * float(members[best][1])
    total += weight
    predicted.append(members[best][0])
    gold.append(next((m[0] for m in members if m[1]), -1))
  result = {"accuracy": 100.0 * correct / total if total else 0.0}
  if num_classes is not None and num_classes >= 2:
    f1s = [_f1(predicted, gold, c) for c in range(num_classes)]
    if num_classes == 2:
      result["f1"] = 100.0 * f1s[1]
    else:
      result["mean_{}class_f1".format(num_classes)] = 100.0 * float(np.mean(f1s))
  return result


def _f1(predicted: Sequence[int], gold: Sequence[int], cls: int) -> float:
  tp = sum(p == cls and g == cls for p, g in zip(predicted, gold))
  fp = sum(p == cls and g != cls for p, g in zip(predicted, gold))
  fn = sum(p != cls and g == cls for p, g in zip(predicted, gold))
  return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


def choice_accuracy(label_indices: Sequence[int], scores: Sequence[Sequence[float]]) -> float:
  """Percent of grouped examples whose argmax score (ties: lowest index) is the label."""
  if not label_indices:
    return 0.0
  hits = [int(np.argmax(np.asarray(s, dtype=np.float64))) == int(label)
          for label, s in zip(label_indices, scores)]
  return 100.0 * float(np.mean(hits))


# ------------------------------------------------------------------------------------------------
# Generation


def strip_postprocessor(output: Any, example: Optional[Mapping[str, Any]] = None,
                        is_target: bool = False) -> str:
  del example, is_target
  text = output.decode("utf-8") if isinstance(output, bytes) else str(output)
  return text.strip()


def accuracy(targets: Sequence[str], predictions: Sequence[str]) -> dict[str, float]:
  if not targets:
    return {"accuracy": 0.0}
  return {"accuracy": 100.0 * float(np.mean([t == p for t, p in zip(targets, predictions)]))}


def rouge(targets: Sequence[str], predictions: Sequence[str]) -> dict[str, float]:
  """Mean ROUGE-1/2/L F-measures (percent), Porter stemming on."""
  from rouge_score import rouge_scorer  # pylint: disable=g-import-not-at-top
  kinds = ("rouge1", "rouge2", "rougeL")
  scorer = rouge_scorer.RougeScorer(list(kinds), use_stemmer=True)
  totals = collections.defaultdict(float)
  for target, prediction in zip(targets, predictions):
    for kind, score in scorer.score(target, prediction).items():
      totals[kind] += score.fmeasure
  n = max(len(targets), 1)
  return {kind: 100.0 * totals[kind] / n for kind in kinds}


def bleu(targets: Sequence[str], predictions: Sequence[str]) -> dict[str, float]:
  """Corpus BLEU with sacrebleu's `intl` tokenizer (single reference per example)."""
  import sacrebleu  # pylint: disable=g-import-not-at-top
  result = sacrebleu.corpus_bleu(list(predictions), [list(targets)], smooth_method="exp",
                                 tokenize="intl", use_effective_order=False)
  return {"bleu": float(result.score)}


def _normalize_answer(text: str) -> str:
  text = text.lower()
  text = "".join(ch for ch in text if ch not in set(string.punctuation))
  text = re.sub(r"\b(a|an|the)\b", " ", text)
  return " ".join(text.split())


def squad(targets: Sequence[str], predictions: Sequence[str]) -> dict[str, float]:
  """SQuAD exact match and token F1 (percent) against one reference per example."""
  em, f1 = [], []
  for target, prediction in zip(targets, predictions):
    t, p = _normalize_answer(target).split(), _normalize_answer(prediction).split()
    em.append(float(t == p))
    common = sum((collections.Counter(t) & collections.Counter(p)).values())
    if not t or not p:
      f1.append(float(t == p))
    elif common == 0:
      f1.append(0.0)
    else:
      precision, recall = common / len(p), common / len(t)
      f1.append(2 * precision * recall / (precision + recall))
  n = max(len(em), 1)
  return {"em": 100.0 * sum(em) / n, "f1": 100.0 * sum(f1) / n}


# promptsource metadata metric names -> metric fns (unknown names fall back to accuracy).
GENERATION_METRICS = {"Accuracy": accuracy, "ROUGE": rouge, "BLEU": bleu, "Squad": squad}


def metrics_for(names: Sequence[str]) -> list:
  fns = []
  for name in names or ("Accuracy",):
    fn = GENERATION_METRICS.get(name, accuracy)
    if fn not in fns:
      fns.append(fn)
  return fns
