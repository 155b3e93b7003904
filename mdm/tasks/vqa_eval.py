"""The official VQA accuracy (Antol et al. 2015; Goyal et al. 2017), re-implemented.

Behaviour matches ``PythonEvaluationTools/vqaEvaluation/vqaEval.py`` of GT-Vision-Lab/VQA at its latest
revision (a013f00, "Fixed processing answers bug"), including its quirks:

* newlines and tabs become spaces and both ends are stripped, for the prediction and every human answer;
* **only when the ten human answers are not all identical** are they and the prediction normalised:
  punctuation (:func:`process_punctuation`) then number words, articles and contractions
  (:func:`process_digit_article`). With unanimous humans the comparison is exact (case-sensitive);
* punctuation marks are deleted when they touch a space (or the text has a digit-comma-digit),
  otherwise replaced by a space; a period not followed by a digit is deleted, at most 32 of them (the
  reference passes ``re.UNICODE`` (= 32) as the ``count`` argument of ``sub``). Its period pattern starts
  with ``(?!<=\\d)``, a look-*ahead* that never fires, so periods after digits are deleted too;
* digits are ASCII digits (the reference is Python 2 code compiled without ``re.UNICODE``);
* accuracy of a question = mean over the human answers h of ``min(1, #{other answer records equal to
  the prediction} / 3)``, where "other" means records that differ from h as a whole record (answer,
  confidence and id), as the reference compares dicts;
* the overall score is ``100 × mean`` rounded to 2 decimals, half away from zero (Python 2 ``round``).

The answer vocabulary normaliser of ViLT/unilm (:func:`normalize_answer`) is the same normalisation
followed by deleting commas.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

log = logging.getLogger(__name__)

# The reference's contraction table, as "written>replacement" pairs (it maps e.g. "dont" → "don't"; one
# entry, "somebody'd" → "somebodyd", goes the other way and is kept as published).
_CONTRACTION_PAIRS = """
'ow'sat>'ow's'at 'ows'at>'ow's'at I'dve>I'd've Id've>I'd've Im>I'm Ive>I've aint>ain't arent>aren't
cant>can't couldn'tve>couldn't've couldnt>couldn't couldnt've>couldn't've couldve>could've didnt>didn't
doesnt>doesn't dont>don't hadn'tve>hadn't've hadnt>hadn't hadnt've>hadn't've hasnt>hasn't havent>haven't
he'dve>he'd've hed>he'd hed've>he'd've hes>he's howd>how'd howll>how'll hows>how's isnt>isn't
it'dve>it'd've itd>it'd itd've>it'd've itll>it'll let's>let's maam>ma'am mightn'tve>mightn't've
mightnt>mightn't mightnt've>mightn't've mightve>might've mustnt>mustn't mustve>must've neednt>needn't
notve>not've oclock>o'clock oughtnt>oughtn't ow's'at>'ow's'at shant>shan't she'dve>she'd've she's>she's
shed've>she'd've shouldn'tve>shouldn't've shouldnt>shouldn't shouldnt've>shouldn't've shouldve>should've
somebody'd>somebodyd somebody'dve>somebody'd've somebodyd've>somebody'd've somebodyll>somebody'll
somebodys>somebody's someone'dve>someone'd've someoned>someone'd someoned've>someone'd've
someonell>someone'll someones>someone's something'dve>something'd've somethingd>something'd
somethingd've>something'd've somethingll>something'll thats>that's there'dve>there'd've thered>there'd
thered've>there'd've therere>there're theres>there's they'dve>they'd've theyd>they'd theyd've>they'd've
theyll>they'll theyre>they're theyve>they've twas>'twas wasnt>wasn't we'dve>we'd've wed've>we'd've
werent>weren't weve>we've whatll>what'll whatre>what're whats>what's whatve>what've whens>when's
whered>where'd wheres>where's whereve>where've who'dve>who'd've whod>who'd whod've>who'd've wholl>who'll
whos>who's whove>who've whyll>why'll whyre>why're whys>why's wont>won't wouldn'tve>wouldn't've
wouldnt>wouldn't wouldnt've>wouldn't've wouldve>would've y'all'dve>y'all'd've y'alld've>y'all'd've
y'allll>y'all'll yall>y'all yall'd've>y'all'd've yall'll>y'all'll you'dve>you'd've youd>you'd
youd've>you'd've youll>you'll youre>you're youve>you've
"""
CONTRACTIONS: dict[str, str] = dict(p.split(">") for p in _CONTRACTION_PAIRS.split())
NUMBER_WORDS = {
    w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten".split())
}
NUMBER_WORDS["none"] = "0"
ARTICLES = frozenset({"a", "an", "the"})
PUNCTUATION = [
    ";",
    "/",
    "[",
    "]",
    '"',
    "{",
    "}",
    "(",
    ")",
    "=",
    "+",
    "\\",
    "_",
    "-",
    ">",
    "<",
    "@",
    "`",
    ",",
    "?",
    "!",
]
_PERIOD = re.compile(r"\.(?![0-9])")
_DIGIT_COMMA_DIGIT = re.compile(r"[0-9],[0-9]")
_MAX_PERIODS = 32


def process_punctuation(text: str) -> str:
    """Deletes or spaces out punctuation and deletes periods, exactly as the reference."""
    glued = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for p in PUNCTUATION:
        # The test looks at the *input* text, the replacement applies to the running output.
        touches_space = (p + " ") in text or (" " + p) in text
        out = out.replace(p, "" if (touches_space or glued) else " ")
    return _PERIOD.sub("", out, count=_MAX_PERIODS)


def process_digit_article(text: str) -> str:
    """Lower-cases, maps number words to digits, drops articles, restores contractions."""
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES]
    return " ".join(words)


def normalize_answer(text: str) -> str:
    """ViLT/unilm ``normalize_word``: the VQA normalisation plus deleting commas (answer vocabulary)."""
    return process_digit_article(process_punctuation(text)).replace(",", "")


def _clean(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def question_accuracy(prediction: str, answers: Sequence[Mapping[str, Any]]) -> float:
    """Accuracy in [0, 1] of one predicted answer against the human answer records of one question.

    Args:
        prediction: the predicted answer string.
        answers: the annotation's ``answers`` list, records with at least an ``answer`` key.
    """
    records = [dict(a, answer=_clean(str(a["answer"]))) for a in answers]
    pred = _clean(prediction)
    if len({r["answer"] for r in records}) > 1:
        for r in records:
            r["answer"] = process_digit_article(process_punctuation(r["answer"]))
        pred = process_digit_article(process_punctuation(pred))
    total = 0.0
    for held_out in records:
        matches = sum(1 for r in records if r != held_out and r["answer"] == pred)
        total += min(1.0, matches / 3.0)
    return total / len(records)


def round_half_away(x: float, digits: int = 2) -> float:
    """Python 2's ``round``: the exact binary value, ties away from zero."""
    q = Decimal(1).scaleb(-digits)
    return float(Decimal(x).quantize(q, rounding=ROUND_HALF_UP))


def _check_predictions(predictions: Any, source: str) -> dict[int, str]:
    if not isinstance(predictions, list):
        raise ValueError(f"{source}: expected a JSON list of {{'question_id', 'answer'}} objects")
    out: dict[int, str] = {}
    for i, p in enumerate(predictions):
        if not isinstance(p, dict) or "question_id" not in p or "answer" not in p:
            raise ValueError(
                f"{source}: record {i} must be an object with 'question_id' and 'answer', got {p!r}"
            )
        if not isinstance(p["answer"], str):
            raise ValueError(
                f"{source}: record {i} (question_id {p['question_id']}): 'answer' must be a string"
            )
        if p["question_id"] in out:
            log.warning("%s: question_id %s predicted twice; the last one counts", source, p["question_id"])
        out[p["question_id"]] = p["answer"]  # the reference indexes results by id: the last one wins
    return out


def evaluate_vqa(
    predictions: Any,
    annotations: Sequence[Mapping[str, Any]],
    subset: bool = False,
    source: str = "<predictions>",
) -> dict[str, float]:
    """Scores an EvalAI-style prediction list against VQA annotations.

    Args:
        predictions: ``[{"question_id": int, "answer": str}, ...]``.
        annotations: the ``annotations`` list of ``v2_mscoco_<split>_annotations.json``.
        subset: score only the annotated questions that have a prediction. The reference (default)
            requires predictions for exactly the annotated questions.
        source: name of the predictions, for messages.

    Returns:
        ``vqa_acc`` (overall, rounded as the reference), ``vqa_acc_<answer type>`` and ``num_questions``.
    """
    preds = _check_predictions(predictions, source)
    by_id = {a["question_id"]: a for a in annotations}
    if len(by_id) != len(annotations):
        raise ValueError(f"{source}: the annotations contain duplicate question ids")
    unknown = [q for q in preds if q not in by_id]
    missing = [q for q in by_id if q not in preds]
    if unknown or (missing and not subset):
        raise ValueError(
            f"{source}: predictions do not correspond to the annotated questions: "
            f"{len(missing)} annotated question(s) without a prediction (e.g. {missing[:5]}), "
            f"{len(unknown)} predicted question id(s) not in the annotations (e.g. {unknown[:5]})"
            + ("" if unknown else "; pass --subset to score only the predicted questions")
        )
    total, count = 0.0, 0
    per_type: dict[str, list[float]] = {}
    for ann in annotations:  # annotation order, as the reference
        qid = ann["question_id"]
        if qid not in preds:
            continue
        acc = question_accuracy(preds[qid], ann["answers"])
        total += acc
        count += 1
        per_type.setdefault(str(ann.get("answer_type", "unknown")), []).append(acc)
    if count == 0:
        raise ValueError(f"{source}: no question to score")
    out = {"vqa_acc": round_half_away(100.0 * total / count), "num_questions": float(count)}
    for kind, accs in sorted(per_type.items()):
        s = 0.0
        for a in accs:
            s += a
        out[f"vqa_acc_{kind.replace('/', '_')}"] = round_half_away(100.0 * s / len(accs))
    return out
