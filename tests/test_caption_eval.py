"""COCO caption metrics: hand-computed cases, the PTB tokenisation, and parity with pycocoevalcap."""

from __future__ import annotations

import importlib.util
import logging
import math
import shutil

import pytest

from mdm.tasks.caption_eval import evaluate_captions, find_meteor, score_captions
from mdm.tasks.caption_ptb import coco_tokenize, ptb_tokenize
from tests.caption_samples import caption_set

HAVE_REFERENCE = importlib.util.find_spec("pycocoevalcap") is not None and shutil.which("java") is not None
needs_reference = pytest.mark.skipif(
    not HAVE_REFERENCE, reason="parity needs pycocoevalcap and Java (pip install pycocoevalcap)"
)


def _scores(refs, cands):
    return evaluate_captions(refs, cands, tokenize=False, java=False)


# --- hand-computed cases (already tokenised, no Java) ---


def test_identical_candidate_scores_one():
    refs = {1: ["a man rides a red bike down the street"], 2: ["two dogs play in the snow together"]}
    scores = _scores(refs, {1: refs[1][0], 2: refs[2][0]})
    for n in range(1, 5):
        assert scores[f"Bleu_{n}"] == pytest.approx(1.0, abs=1e-8)
    assert scores["ROUGE_L"] == pytest.approx(1.0)
    assert "METEOR" not in scores


def test_bleu_by_hand():
    # 1-grams: a, b, d match (3/4); 2-grams: "a b" (1/3); no 3-gram: BLEU-3/4 vanish.
    # Candidate length 4, reference 5: brevity penalty exp(1 - 5/4).
    scores = _scores({0: ["a b x d e"]}, {0: "a b c d"})
    bp = math.exp(1 - 5 / 4)
    assert scores["Bleu_1"] == pytest.approx(0.75 * bp, rel=1e-8)
    assert scores["Bleu_2"] == pytest.approx(math.sqrt(0.75 / 3) * bp, rel=1e-8)
    assert scores["Bleu_3"] < 1e-4
    # Reference lengths 3 and 5 are equally close to 4: the shorter one counts, so no brevity penalty.
    scores = _scores({0: ["a b x", "a b x d e"]}, {0: "a b c d"})
    assert scores["Bleu_1"] == pytest.approx(0.75, rel=1e-8)


def test_rouge_l_by_hand():
    # LCS("a b c d", "a c d e f") = 3 → P = 3/4, R = 3/5, F_beta with beta = 1.2.
    p, r, b2 = 3 / 4, 3 / 5, 1.2**2
    scores = _scores({0: ["a c d e f", "x y"]}, {0: "a b c d"})
    assert scores["ROUGE_L"] == pytest.approx((1 + b2) * p * r / (r + b2 * p))
    assert _scores({0: ["x y"]}, {0: "a b"})["ROUGE_L"] == 0.0


def test_cider_by_hand():
    # Two images, each candidate equal to its single reference of two words: the unigram and bigram
    # cosines are 1 and there are no 3-/4-grams, so CIDEr = 10 × (1 + 1 + 0 + 0) / 4 = 5.
    assert _scores({0: ["a b"], 1: ["c d"]}, {0: "a b", 1: "c d"})["CIDEr"] == pytest.approx(5.0)
    # A wrong second candidate scores 0: the mean halves.
    assert _scores({0: ["a b"], 1: ["c d"]}, {0: "a b", 1: "e"})["CIDEr"] == pytest.approx(2.5)
    # n-grams found in every image's references get idf 0: nothing is informative.
    assert _scores({0: ["a b"], 1: ["a b"]}, {0: "a b", 1: "a b"})["CIDEr"] == 0.0
    # Gaussian length penalty on the bigram-count difference (sigma 6); "a b" vs "a b a b a b" also
    # differ in cosine, so only check that length costs.
    assert _scores({0: ["a b"], 1: ["c d"]}, {0: "a b a b", 1: "c d"})["CIDEr"] < 5.0


# --- tokenisation ---


def test_ptb_tokenisation_examples():
    captions = [
        "A man's dog isn't running.",
        'Two cats (black/white) on a 1,000-piece puzzle -- at 10:30 "today"',
        "A sign for Acme Inc.",
        "The shop can't open; gonna rain...",
    ]
    assert ptb_tokenize(captions) == [
        ["a", "man", "'s", "dog", "is", "n't", "running", "."],
        ["two", "cats", "-lrb-", "black/white", "-rrb-", "on", "a", "1,000-piece", "puzzle", "--", "at", "10:30",
         "``", "today", "''"],
        # an abbreviation ending a caption is split when the next caption starts with a capital
        ["a", "sign", "for", "acme", "inc.", "."],
        ["the", "shop", "ca", "n't", "open", ";", "gon", "na", "rain", "..."],
    ]  # fmt: skip
    # Punctuation goes, brackets survive (the reference's list is upper-case: "-LRB-" ≠ "-lrb-").
    assert coco_tokenize(captions[:2]) == [
        "a man 's dog is n't running",
        "two cats -lrb- black/white -rrb- on a 1,000-piece puzzle at 10:30 today",
    ]


def test_tokenize_flag_applies_ptb():
    refs = {"x": ["A DOG, running!"]}
    assert _scores(refs, {"x": "a dog running"})["Bleu_1"] < 0.7  # untokenised: "DOG," ≠ "dog"
    assert evaluate_captions(refs, {"x": "a dog running"}, java=False)["Bleu_1"] == pytest.approx(1.0)


# --- input validation and reporting ---


def test_errors_name_the_offending_id():
    with pytest.raises(ValueError, match="'img7'"):
        evaluate_captions({"img1": ["a"], "img7": ["b"]}, {"img1": "a"}, java=False)
    with pytest.raises(ValueError, match="'img9' has no references"):
        evaluate_captions({"img1": ["a"]}, {"img1": "a", "img9": "b"}, java=False)
    with pytest.raises(ValueError, match="'img3' has an empty reference list"):
        evaluate_captions({"img3": []}, {"img3": "a"}, java=False)
    with pytest.raises(TypeError, match="'img4'"):
        evaluate_captions({"img4": "a dog"}, {"img4": "a"}, java=False)
    with pytest.raises(TypeError, match="'img5'"):
        evaluate_captions({"img5": ["a"]}, {"img5": ["a"]}, java=False)
    with pytest.raises(ValueError, match="no candidates"):
        evaluate_captions({}, {}, java=False)


def test_meteor_skip_is_reported(caplog, monkeypatch):
    result = score_captions({1: ["a b"]}, {1: "a b"}, java=False)
    assert set(result.scores) == {"Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "ROUGE_L", "CIDEr"}
    assert result.skipped == {"METEOR": "java=False"}
    with caplog.at_level(logging.WARNING, logger="mdm.tasks.caption_eval"):
        evaluate_captions({1: ["a b"]}, {1: "a b"}, java=False)
    assert "METEOR skipped" in caplog.text
    monkeypatch.setenv("MDM_METEOR_JAR", "/nonexistent/meteor-1.5.jar")
    if shutil.which("java"):
        assert find_meteor() == (None, "$MDM_METEOR_JAR=/nonexistent/meteor-1.5.jar is not a file")
        with pytest.raises(RuntimeError, match="METEOR was required"):
            evaluate_captions({1: ["a b"]}, {1: "a b"}, java=True)


# --- parity with pycocoevalcap (its Java PTB tokenizer and its scorers) ---


def _reference_tokens(refs, cands):
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({k: [{"caption": c} for c in refs[k]] for k in cands})
    res = tokenizer.tokenize({k: [{"caption": cands[k]}] for k in cands})
    return gts, res


def _java_ptb_tokens(captions, tmp_path):
    """The raw output of the reference's jar (before its punctuation removal), one token list per caption."""
    import subprocess
    from pathlib import Path

    import pycocoevalcap.tokenizer.ptbtokenizer as reference

    jar = Path(reference.__file__).parent / "stanford-corenlp-3.4.1.jar"
    text = tmp_path / "captions.txt"
    text.write_text("\n".join(c.replace("\n", " ") for c in captions), encoding="utf-8")
    command = [
        "java",
        "-cp",
        str(jar),
        "edu.stanford.nlp.process.PTBTokenizer",
        "-preserveLines",
        "-lowerCase",
    ]
    out = subprocess.run([*command, str(text)], capture_output=True, check=True).stdout.decode()
    return [line.split() for line in out.split("\n")][: len(captions)]


@needs_reference
def test_parity_with_pycocoevalcap(tmp_path):
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    refs, cands = caption_set()
    assert len(cands) >= 200 and sum(map(len, refs.values())) >= 800
    ours = score_captions(refs, cands, java=False)
    gts, res = _reference_tokens(refs, cands)
    assert ours.references == gts  # our pure-Python PTB pipeline, token for token
    assert {k: [v] for k, v in ours.candidates.items()} == res
    flat = [c for k in cands for c in refs[k]]
    assert ptb_tokenize(flat) == _java_ptb_tokens(flat, tmp_path)  # also before punctuation removal
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    theirs = {f"Bleu_{n + 1}": bleu[n] for n in range(4)}
    theirs["ROUGE_L"] = Rouge().compute_score(gts, res)[0]
    theirs["CIDEr"] = Cider().compute_score(gts, res)[0]
    for name, value in theirs.items():
        assert ours.scores[name] == pytest.approx(float(value), abs=1e-6), name
    assert 0.3 < ours.scores["Bleu_4"] < 0.95 and 0.5 < ours.scores["CIDEr"] < 5  # a spread, not a corner


@needs_reference
@pytest.mark.slow
def test_meteor_parity_with_pycocoevalcap():
    from pycocoevalcap.meteor.meteor import Meteor

    refs, cands = caption_set(n_images=200, seed=1)
    reference = Meteor()  # its jar starts loading now, alongside ours: the paraphrase table takes ~10 s
    ours = score_captions(refs, cands, java=True)
    gts, res = _reference_tokens(refs, cands)
    theirs, _ = reference.compute_score(gts, res)
    assert 0.1 < ours.scores["METEOR"] < 0.9
    assert ours.scores["METEOR"] == pytest.approx(theirs, abs=1e-6)
