"""Corpus BLEU on detokenized text via sacrebleu, reported with its signature.

Cased `13a` BLEU is the headline number; `intl` matches the paper's
`-tok intl`, and the lowercased score is given for comparison. Every
hypothesis has exactly one reference (newstest2014 has one).
"""

from typing import Any, Sequence

from sacrebleu.metrics import BLEU


def _check_lengths(hypotheses: Sequence[str], references: Sequence[str]):
  """Raises ValueError unless there are equally many (>0) hyps and refs."""
  if len(hypotheses) != len(references):
    raise ValueError(f"Got {len(hypotheses)} hypotheses but "
                     f"{len(references)} references; they must pair up.")
  if not hypotheses:
    raise ValueError("BLEU needs at least one sentence, got none.")


def corpus_bleu(
    hypotheses: Sequence[str],
    references: Sequence[str],
    tokenize: str = "13a",
    lowercase: bool = False,
) -> dict[str, Any]:
  """Returns sacrebleu corpus BLEU (score, signature, n-gram stats)."""
  _check_lengths(hypotheses, references)
  metric = BLEU(tokenize=tokenize, lowercase=lowercase)
  result = metric.corpus_score(list(hypotheses), [list(references)])
  return dict(
      score=float(result.score),
      signature=str(metric.get_signature()),
      precisions=[float(p) for p in result.precisions],
      brevity_penalty=float(result.bp),
      sys_len=int(result.sys_len),
      ref_len=int(result.ref_len),
  )


def bleu_scores(hypotheses: Sequence[str],
                references: Sequence[str]) -> dict[str, Any]:
  """Returns cased 13a, intl and lowercased 13a BLEU with their signatures."""
  variants = {
      "bleu_13a": dict(tokenize="13a"),
      "bleu_intl": dict(tokenize="intl"),
      "bleu_13a_lc": dict(tokenize="13a", lowercase=True),
  }
  out: dict[str, Any] = {"num_sentences": len(hypotheses)}
  for name, kwargs in variants.items():
    result = corpus_bleu(hypotheses, references, **kwargs)
    out[name] = result["score"]
    out[f"{name}_signature"] = result["signature"]
  return out
