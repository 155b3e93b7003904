"""The official VQA accuracy (GT-Vision-Lab/VQA vqaEval.py semantics) against hand computations.

Every expected number below is worked out by hand in the comment next to it; several cases are chosen so
that normalising (or *not* normalising, when the ten humans agree) changes the result.
"""

from __future__ import annotations

import json

import pytest

from mdm.tasks.cli_evaluate import main as evaluate_main
from mdm.tasks.vqa_eval import (
    evaluate_vqa,
    normalize_answer,
    process_digit_article,
    process_punctuation,
    question_accuracy,
    round_half_away,
)


def humans(*groups: tuple[str, int]) -> list[dict]:
    """Ten (or more) annotator records with unique ids, e.g. humans(("dog", 2), ("cat", 8))."""
    out = []
    for answer, n in groups:
        out += [{"answer": answer, "answer_confidence": "yes"} for _ in range(n)]
    return [dict(r, answer_id=i + 1) for i, r in enumerate(out)]


CASES = [
    # unanimous humans: no normalisation at all, so "2" does not match "two" ...
    ("2", humans(("two", 10)), 0.0),
    # ... and matching is case-sensitive
    ("yes", humans(("Yes", 10)), 0.0),
    # unanimous and equal: every leave-one-out subset has 9 matches -> min(1, 9/3) = 1
    ("two", humans(("two", 10)), 1.0),
    # leading/trailing whitespace and newlines are stripped even without normalisation
    (" yes\n", humans(("yes", 10)), 1.0),
    # humans disagree -> normalise: "Two" -> "2" and all ten humans -> "2"
    ("Two", humans(("2", 7), ("two", 3)), 1.0),
    # 2 "dog", 8 "cat": held-out dog -> 1 other dog -> 1/3; held-out cat -> 2 dogs -> 2/3;
    # mean = (2 * 1/3 + 8 * 2/3) / 10 = 0.6
    ("dog", humans(("dog", 2), ("cat", 8)), 0.6),
    # articles dropped: "the dog", "a dog" -> "dog": 6 dogs -> every subset has >= 5 -> 1
    ("the dog", humans(("a dog", 3), ("dog", 3), ("cat", 4)), 1.0),
    # trailing period deleted: "yes." -> "yes"
    ("yes", humans(("yes.", 5), ("yes", 5)), 1.0),
    # contraction restored: "dont" -> "don't" (5 matches -> subsets have 4 or 5 -> 1)
    ("dont", humans(("don't", 5), ("no", 5)), 1.0),
    # digit,digit: all punctuation deleted: "1,000" -> "1000"
    ("1000", humans(("1,000", 4), ("1000", 6)), 1.0),
    # "red,white" -> "red white" (comma touches no space -> space); "red, white" -> "red white"
    ("red white", humans(("red,white", 3), ("red, white", 3), ("blue", 4)), 1.0),
    # "none" -> "0" (number words), "zero" -> "0": 8 zeros
    ("none", humans(("0", 5), ("zero", 3), ("no", 2)), 1.0),
    # "5." -> "5": 2 fives among 10 -> as the dog/cat case, 0.6
    ("5", humans(("5.", 2), ("4", 8)), 0.6),
    # one match only: held-out match -> 0, others -> 1/3; mean = 9 * (1/3) / 10 = 0.3
    ("cat", humans(("cat", 1), ("dog", 9)), 0.3),
    # no match
    ("bird", humans(("cat", 1), ("dog", 9)), 0.0),
]


@pytest.mark.parametrize("pred,answers,expected", CASES)
def test_question_accuracy_hand_cases(pred, answers, expected):
    assert question_accuracy(pred, answers) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(
    "text,expected",
    [
        ("t-shirt", "t shirt"),  # no space around "-": replaced by a space
        ("t - shirt", "t  shirt"),  # touches a space: deleted (double space stays until split)
        ("3.5", "3.5"),  # a period followed by a digit is kept
        ("5.", "5"),
        ("e.g.", "eg"),
        ("x.5.", "x.5"),  # only the last period goes
        ("it's", "it's"),  # the apostrophe is not in the punctuation list
        ("1,000", "1000"),
        ("a,b", "a b"),
        ("." * 40 + "x", "." * 8 + "x"),  # at most 32 periods are removed (re.UNICODE passed as count)
    ],
)
def test_process_punctuation(text, expected):
    assert process_punctuation(text) == expected


def test_process_digit_article_and_vocab_normaliser():
    assert process_digit_article("The Two  Dogs") == "2 dogs"
    assert process_digit_article("an apple") == "apple"
    assert process_digit_article("whats") == "what's"
    assert process_digit_article("somebody'd") == "somebodyd"  # the published table's reversed entry
    assert normalize_answer("1,000") == "1000"
    assert normalize_answer("red, white") == "red white"
    assert normalize_answer("Three") == "3"


def test_round_half_away_from_zero_like_python2():
    assert round_half_away(12.125) == 12.13  # exactly representable half: away from zero (py3 gives 12.12)
    assert round_half_away(2.675) == 2.67  # binary value is below the half
    assert round_half_away(66.666666) == 66.67


def _annotations():
    return [
        {"question_id": 1, "answer_type": "number", "answers": humans(("2", 7), ("two", 3))},
        {"question_id": 2, "answer_type": "other", "answers": humans(("dog", 2), ("cat", 8))},
        {"question_id": 3, "answer_type": "yes/no", "answers": humans(("Yes", 10))},
    ]


def test_evaluate_vqa_overall_and_per_type():
    preds = [
        {"question_id": 1, "answer": "two"},
        {"question_id": 2, "answer": "dog"},
        {"question_id": 3, "answer": "yes"},
    ]
    out = evaluate_vqa(preds, _annotations())
    # per question: 1.0, 0.6, 0.0 -> 100 * 1.6 / 3 = 53.333.. -> 53.33
    assert out["vqa_acc"] == 53.33
    assert out["vqa_acc_number"] == 100.0 and out["vqa_acc_other"] == 60.0 and out["vqa_acc_yes_no"] == 0.0


def test_evaluate_vqa_coverage_duplicates_and_bad_records():
    anns = _annotations()
    with pytest.raises(ValueError, match=r"1 annotated question\(s\) without a prediction \(e\.g\. \[3\]\)"):
        evaluate_vqa([{"question_id": 1, "answer": "2"}, {"question_id": 2, "answer": "x"}], anns)
    out = evaluate_vqa([{"question_id": 1, "answer": "2"}], anns, subset=True)
    assert out["vqa_acc"] == 100.0 and out["num_questions"] == 1
    with pytest.raises(ValueError, match=r"not in the annotations \(e\.g\. \[99\]\)"):
        evaluate_vqa([{"question_id": 99, "answer": "2"}], anns, subset=True)
    # the reference indexes results by question id: the last duplicate counts
    out = evaluate_vqa(
        [{"question_id": 1, "answer": "cat"}, {"question_id": 1, "answer": "2"}], anns, subset=True
    )
    assert out["vqa_acc"] == 100.0
    with pytest.raises(ValueError, match="record 0 .*'answer' must be a string"):
        evaluate_vqa([{"question_id": 1, "answer": 2}], anns, subset=True)


def test_identical_answer_records_are_all_left_out():
    # The reference removes "the held-out record" by dict inequality: identical records vanish together.
    same = [{"answer": "dog"}] * 3 + [{"answer": "cat"}]
    # held-out dog -> others = [cat] -> 0 matches for "dog"; held-out cat -> 3 dogs -> 1; mean = 1/4
    assert question_accuracy("dog", same) == pytest.approx(0.25)


def test_mdm_evaluate_scores_a_prediction_file(tmp_path, capsys):
    (tmp_path / "v2_mscoco_val2014_annotations.json").write_text(json.dumps({"annotations": _annotations()}))
    preds = tmp_path / "preds.json"
    preds.write_text(
        json.dumps([{"question_id": q, "answer": a} for q, a in [(1, "two"), (2, "dog"), (3, "yes")]])
    )
    out = tmp_path / "m.json"
    argv = [
        "--task",
        "vqav2",
        "--predictions",
        str(preds),
        f"data.root={tmp_path}",
        "--metrics-json",
        str(out),
    ]
    assert evaluate_main(argv) == 0
    assert json.loads(out.read_text())["vqa_acc"] == 53.33
    assert "vqa_acc" in capsys.readouterr().out
    preds.write_text(json.dumps([{"question_id": 1, "answer": "two"}]))
    assert evaluate_main(argv) == 2  # incomplete file: an error for people, not a traceback
    assert "without a prediction" in capsys.readouterr().err
    assert evaluate_main(argv + ["--subset"]) == 0
