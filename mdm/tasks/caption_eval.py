"""COCO caption metrics, computed as the published COCO caption evaluation computes them.

Reference: the ``pycocoevalcap`` package (salaniz/pycocoevalcap 1.2, the Python 3 port of
tylin/coco-caption; Chen et al. 2015, "Microsoft COCO Captions"). Every metric below is a re-statement
of its scorer, quirks included, and ``tests/test_caption_eval.py`` asserts agreement to 1e-6:

* **tokenisation**: the PTB tokenizer pipeline of :mod:`mdm.tasks.caption_ptb` (references and
  candidates each as one stream, in the order of the candidate ids);
* **BLEU-1..4** (Papineni et al. 2002): corpus-level, clipped n-gram counts summed over images, the
  per-image effective reference length is the one closest to the candidate length (ties → shorter),
  precisions smoothed as ``(correct + 1e-15) / (guess + 1e-9)``, brevity penalty ``exp(1 - r/c)`` when
  ``c < r``;
* **ROUGE-L** (Lin 2004): per image, LCS precision and recall against each reference, the maxima of each
  combined as an F-measure with beta 1.2, averaged over images; tokens are split on single spaces, so an
  empty caption counts as one empty token, as in the reference;
* **CIDEr** (CIDEr-D of Vedantam et al. 2015, as pycocoevalcap's ``Cider``): 1..4-gram tf-idf vectors
  with document frequencies counted over the reference sets of the evaluated images, idf
  ``log(#images) - log(max(1, df))``, candidate weights clipped at the reference's, a Gaussian length
  penalty with sigma 6 on the difference of the *bigram* counts (the reference's "length"), averaged
  over n and references, × 10, averaged over images;
* **METEOR** 1.5 (Denkowski & Lavie 2014): the jar itself, run as the reference runs it
  (``-stdio -l en -norm``). It needs Java and ``meteor-1.5.jar`` (shipped in the pycocoevalcap wheel, or
  named by ``$MDM_METEOR_JAR``); without them METEOR is skipped and the reason is reported.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
import shutil
import subprocess
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from mdm.tasks.caption_ptb import coco_tokenize

log = logging.getLogger(__name__)

__all__ = ["CaptionEvaluation", "evaluate_captions", "find_meteor", "score_captions"]

BLEU_N = 4
CIDER_N = 4
CIDER_SIGMA = 6.0
ROUGE_BETA = 1.2
METRICS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr")


@dataclass(frozen=True)
class CaptionEvaluation:
    """Corpus scores, the metrics that could not be computed (name → reason) and the tokenised text."""

    scores: dict[str, float]
    skipped: dict[str, str] = field(default_factory=dict)
    references: dict[object, list[str]] = field(default_factory=dict, repr=False)
    candidates: dict[object, str] = field(default_factory=dict, repr=False)


def evaluate_captions(
    references: Mapping[object, Sequence[str]],
    candidates: Mapping[object, str],
    *,
    tokenize: bool = True,
    java: bool | None = None,
) -> dict[str, float]:
    """COCO caption scores: ``Bleu_1..Bleu_4``, ``METEOR`` (when Java runs), ``ROUGE_L`` and ``CIDEr``.

    Args:
        references: image id → its reference captions (at least one each).
        candidates: image id → the generated caption; the ids must be those of ``references``.
        tokenize: apply the COCO PTB tokenisation first (as the official evaluation does); with False
            the captions are taken as already tokenised, space-separated.
        java: True requires METEOR (an error if Java or the jar is missing), False never starts Java,
            None computes METEOR when possible and otherwise skips it with a warning.

    Returns:
        Metric name → corpus score (BLEU, METEOR, ROUGE-L in [0, 1]; CIDEr on its ×10 scale). Use
        :func:`score_captions` to learn programmatically which metrics were skipped.
    """
    result = score_captions(references, candidates, tokenize=tokenize, java=java)
    for name, reason in result.skipped.items():
        log.warning("caption metric %s skipped: %s", name, reason)
    return result.scores


def score_captions(
    references: Mapping[object, Sequence[str]],
    candidates: Mapping[object, str],
    *,
    tokenize: bool = True,
    java: bool | None = None,
) -> CaptionEvaluation:
    """:func:`evaluate_captions` with the skipped metrics and the tokenised captions returned."""
    ids = _validate(references, candidates)
    if tokenize:
        flat = coco_tokenize([caption for i in ids for caption in references[i]])
        refs, start = {}, 0
        for i in ids:
            refs[i] = flat[start : start + len(references[i])]
            start += len(references[i])
        cands = dict(zip(ids, coco_tokenize([candidates[i] for i in ids]), strict=True))
    else:
        refs = {i: list(references[i]) for i in ids}
        cands = {i: candidates[i] for i in ids}
    scores = dict(zip(("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4"), bleu(refs, cands), strict=True))
    skipped: dict[str, str] = {}
    meteor_jar, reason = (None, "java=False") if java is False else find_meteor()
    if meteor_jar is None:
        if java:
            raise RuntimeError(f"METEOR was required (java=True) but cannot run: {reason}")
        skipped["METEOR"] = reason
    else:
        scores["METEOR"] = meteor(refs, cands, meteor_jar)
    scores["ROUGE_L"] = rouge_l(refs, cands)
    scores["CIDEr"] = cider(refs, cands)
    return CaptionEvaluation(scores=scores, skipped=skipped, references=refs, candidates=cands)


def _validate(references: Mapping[object, Sequence[str]], candidates: Mapping[object, str]) -> list[object]:
    """The evaluated ids (candidate order), or a ValueError/TypeError naming the offending id."""
    if not candidates:
        raise ValueError("evaluate_captions: no candidates given")
    missing = [i for i in references if i not in candidates]
    if missing:
        raise ValueError(
            f"evaluate_captions: no candidate caption for id {missing[0]!r} ({len(missing)} ids lack one)"
        )
    extra = [i for i in candidates if i not in references]
    if extra:
        raise ValueError(f"evaluate_captions: candidate id {extra[0]!r} has no references ({len(extra)} ids)")
    for i, caption in candidates.items():
        if not isinstance(caption, str):
            raise TypeError(
                f"evaluate_captions: candidate for id {i!r} must be a str, got {type(caption).__name__}"
            )
    for i, refs in references.items():
        if isinstance(refs, str) or not isinstance(refs, Sequence):
            raise TypeError(
                f"evaluate_captions: references for id {i!r} must be a list of str, got {type(refs).__name__}"
            )
        if len(refs) == 0:
            raise ValueError(f"evaluate_captions: id {i!r} has an empty reference list")
        bad = [r for r in refs if not isinstance(r, str)]
        if bad:
            raise TypeError(
                f"evaluate_captions: a reference for id {i!r} is a {type(bad[0]).__name__}, not a str"
            )
    return list(candidates)


def _ngrams(words: Sequence[str], n_max: int) -> Counter[tuple[str, ...]]:
    """Counts of every 1..n_max-gram of ``words``."""
    counts: Counter[tuple[str, ...]] = Counter()
    for n in range(1, n_max + 1):
        counts.update(tuple(words[k : k + n]) for k in range(len(words) - n + 1))
    return counts


def bleu(references: Mapping[object, Sequence[str]], candidates: Mapping[object, str]) -> list[float]:
    """Corpus BLEU-1..4 with pycocoevalcap's "closest" reference length and smoothing constants."""
    correct = [0] * BLEU_N
    guess = [0] * BLEU_N
    cand_len = ref_len = 0
    for i, candidate in candidates.items():
        words = candidate.split()
        ref_words = [r.split() for r in references[i]]
        max_ref: dict[tuple[str, ...], int] = {}
        for rw in ref_words:
            for gram, count in _ngrams(rw, BLEU_N).items():
                max_ref[gram] = max(max_ref.get(gram, 0), count)
        for gram, count in _ngrams(words, BLEU_N).items():
            correct[len(gram) - 1] += min(max_ref.get(gram, 0), count)
        for n in range(1, BLEU_N + 1):
            guess[n - 1] += max(0, len(words) - n + 1)
        cand_len += len(words)
        # The reference length closest to the candidate's; on a tie the shorter one.
        ref_len += min((abs(len(rw) - len(words)), len(rw)) for rw in ref_words)[1]
    scores, product = [], 1.0
    for n in range(BLEU_N):
        product *= (correct[n] + 1e-15) / (guess[n] + 1e-9)
        scores.append(product ** (1.0 / (n + 1)))  # geometric mean of the 1..n precisions
    ratio = (cand_len + 1e-15) / (ref_len + 1e-9)
    if ratio < 1:
        scores = [s * math.exp(1 - 1 / ratio) for s in scores]
    return scores


def _lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence (one row of the dynamic programme at a time)."""
    previous = [0] * (len(b) + 1)
    for token in a:
        current = [0]
        for j, other in enumerate(b):
            current.append(previous[j] + 1 if token == other else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(references: Mapping[object, Sequence[str]], candidates: Mapping[object, str]) -> float:
    """Mean over images of ROUGE-L (beta 1.2) against the best precision and best recall."""
    total = 0.0
    for i, candidate in candidates.items():
        cand_tokens = candidate.split(" ")
        precision = recall = 0.0
        for reference in references[i]:
            ref_tokens = reference.split(" ")
            lcs = _lcs_length(ref_tokens, cand_tokens)
            precision = max(precision, lcs / len(cand_tokens))
            recall = max(recall, lcs / len(ref_tokens))
        if precision > 0 and recall > 0:
            beta2 = ROUGE_BETA**2
            total += (1 + beta2) * precision * recall / (recall + beta2 * precision)
    return total / len(candidates)


def _tfidf(counts: Counter[tuple[str, ...]], doc_freq: Counter[tuple[str, ...]], log_images: float):
    """Per-order tf-idf vectors, their norms and the bigram count (CIDEr's "length")."""
    vectors: list[dict[tuple[str, ...], float]] = [{} for _ in range(CIDER_N)]
    norms = [0.0] * CIDER_N
    for gram, tf in counts.items():
        weight = tf * (log_images - math.log(max(1.0, doc_freq[gram])))
        vectors[len(gram) - 1][gram] = weight
        norms[len(gram) - 1] += weight * weight
    bigrams = sum(tf for gram, tf in counts.items() if len(gram) == 2)
    return vectors, [math.sqrt(n) for n in norms], bigrams


def cider(references: Mapping[object, Sequence[str]], candidates: Mapping[object, str]) -> float:
    """CIDEr-D as pycocoevalcap's Cider scorer: mean over images of 10 × the mean clipped cosine."""
    ref_counts = {i: [_ngrams(r.split(), CIDER_N) for r in references[i]] for i in candidates}
    doc_freq: Counter[tuple[str, ...]] = Counter()
    for counts in ref_counts.values():
        doc_freq.update({gram for c in counts for gram in c})  # one per image that has the n-gram
    log_images = math.log(float(len(candidates)))
    total = 0.0
    for i, candidate in candidates.items():
        vec, norm, length = _tfidf(_ngrams(candidate.split(), CIDER_N), doc_freq, log_images)
        score = [0.0] * CIDER_N
        for counts in ref_counts[i]:
            ref_vec, ref_norm, ref_length = _tfidf(counts, doc_freq, log_images)
            penalty = math.exp(-((length - ref_length) ** 2) / (2 * CIDER_SIGMA**2))
            for n in range(CIDER_N):
                dot = sum(min(w, ref_vec[n].get(g, 0.0)) * ref_vec[n].get(g, 0.0) for g, w in vec[n].items())
                if norm[n] != 0 and ref_norm[n] != 0:
                    dot /= norm[n] * ref_norm[n]
                score[n] += dot * penalty
        total += 10.0 * sum(score) / CIDER_N / len(ref_counts[i])
    return total / len(candidates)


def find_meteor() -> tuple[Path | None, str]:
    """``(path of meteor-1.5.jar, "")`` when Java and the jar are found, else ``(None, reason)``.

    The jar is ``$MDM_METEOR_JAR`` or the one inside an installed pycocoevalcap, located without
    importing it.
    """
    if shutil.which("java") is None:
        return None, "no `java` on PATH (METEOR 1.5 is a Java program)"
    env = os.environ.get("MDM_METEOR_JAR")
    if env:
        path = Path(env)
        return (path, "") if path.is_file() else (None, f"$MDM_METEOR_JAR={env} is not a file")
    spec = importlib.util.find_spec("pycocoevalcap")
    if spec is None or not spec.submodule_search_locations:
        return None, "meteor-1.5.jar not found: install pycocoevalcap or set $MDM_METEOR_JAR"
    for location in spec.submodule_search_locations:
        path = Path(location) / "meteor" / "meteor-1.5.jar"
        if path.is_file():
            return path, ""
    return None, "pycocoevalcap is installed but has no meteor/meteor-1.5.jar"


def _meteor_field(text: str) -> str:
    # "|||" separates fields in the jar's protocol; the reference strips it (and double spaces) from
    # the candidate only. We strip it from references too, which changes nothing for the COCO data.
    return text.replace("|||", "").replace("  ", " ")


def meteor(references: Mapping[object, Sequence[str]], candidates: Mapping[object, str], jar: Path) -> float:
    """Corpus METEOR 1.5 from the jar: per-image statistics first, then one aggregate ``EVAL``."""
    command = ["java", "-Xmx2G", "-jar", str(jar), "-", "-", "-stdio", "-l", "en", "-norm"]
    with subprocess.Popen(
        command,
        cwd=jar.parent,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    ) as process:
        assert process.stdin is not None and process.stdout is not None
        stats = []
        for i, candidate in candidates.items():
            fields = ["SCORE", *(_meteor_field(r) for r in references[i]), _meteor_field(candidate)]
            process.stdin.write(" ||| ".join(fields) + "\n")
            process.stdin.flush()
            stats.append(process.stdout.readline().strip())
        process.stdin.write("EVAL ||| " + " ||| ".join(stats) + "\n")
        process.stdin.flush()
        for _ in stats:  # one score per image, then the corpus score
            process.stdout.readline()
        line = process.stdout.readline().strip()
        process.stdin.close()
    try:
        return float(line)
    except ValueError:
        raise RuntimeError(f"METEOR ({jar}) returned {line!r} instead of a score") from None
