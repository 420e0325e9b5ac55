"""Our BLEU wrapper equals sacrebleu on fixed sentences."""

import pytest
import sacrebleu

from mqa_flax import bleu

HYPS = [
    "Der Hund läuft – schnell.",
    "",
    "Das ist „gut“ oder 5,000€?",
    "The Cat sat on the Mat.",
]
REFS = [
    "Der Hund lief – schnell!",
    "Ein Satz.",
    "Das ist „gut“, oder 5.000 €?",
    "the cat sat on the mat.",
]


@pytest.mark.parametrize("kwargs", [
    dict(),
    dict(tokenize="intl"),
    dict(lowercase=True),
])
def test_corpus_bleu_equals_sacrebleu(kwargs):
  ours = bleu.corpus_bleu(HYPS, REFS, **kwargs)
  theirs = sacrebleu.corpus_bleu(HYPS, [REFS], **kwargs)
  assert ours["score"] == pytest.approx(theirs.score, abs=1e-9)
  assert ours["sys_len"] == theirs.sys_len
  assert ours["ref_len"] == theirs.ref_len
  assert ours["signature"].startswith("nrefs:1|")


def test_bleu_scores_variants():
  scores = bleu.bleu_scores(HYPS, REFS)
  assert scores["num_sentences"] == 4
  assert scores["bleu_13a"] == pytest.approx(
      sacrebleu.corpus_bleu(HYPS, [REFS]).score)
  # Case and Unicode punctuation change these sentences' scores.
  assert scores["bleu_13a_lc"] > scores["bleu_13a"]
  assert scores["bleu_intl"] != pytest.approx(scores["bleu_13a"])
  assert "tok:13a" in scores["bleu_13a_signature"]
  assert "case:mixed" in scores["bleu_13a_signature"]
  assert "tok:intl" in scores["bleu_intl_signature"]
  assert "case:lc" in scores["bleu_13a_lc_signature"]


def test_identical_and_case_only():
  same = bleu.bleu_scores(REFS[:1], REFS[:1])
  assert same["bleu_13a"] == pytest.approx(100.0)
  upper = bleu.bleu_scores(["THE CAT SAT ON THE MAT"],
                           ["the cat sat on the mat"])
  assert upper["bleu_13a"] == pytest.approx(0.0)
  assert upper["bleu_13a_lc"] == pytest.approx(100.0)


def test_length_mismatch_raises():
  with pytest.raises(ValueError, match="2 hypotheses but 1 references"):
    bleu.corpus_bleu(["a", "b"], ["a"])
  with pytest.raises(ValueError, match="at least one"):
    bleu.bleu_scores([], [])
