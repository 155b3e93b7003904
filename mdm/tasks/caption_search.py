"""Greedy and beam-search caption decoding over a next-token scorer (:mod:`mdm.tasks.caption_step`).

Beam search is the usual one (as fairseq / Hugging Face ``BeamSearchScorer``, which unilm/beit3's
captioning decoder follows): ``beam_size`` live hypotheses per image; a hypothesis that emits [eos] is
finished with score ``sum(log p) / length ** length_penalty`` (``length`` = generated tokens including
[eos]); an image is done when it has ``beam_size`` finished hypotheses and no live one can still beat the
worst of them; at ``max_len`` the live hypotheses are finished as they are. ``min_len`` forbids [eos]
before that many generated tokens; ``no_repeat_ngram_size`` n forbids a token that would repeat an
n-gram already in the hypothesis.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SearchConfig:
    """Decoding options.

    Attributes:
        beam_size: hypotheses per image (1 = greedy).
        max_len: generated tokens at most, [eos] included.
        min_len: generated tokens before [eos] is allowed.
        length_penalty: exponent α of the length normalisation ``score / length ** α``.
        no_repeat_ngram_size: forbid repeating n-grams of this size (0 = off).
    """

    beam_size: int = 3
    max_len: int = 30
    min_len: int = 0
    length_penalty: float = 0.6
    no_repeat_ngram_size: int = 0


def _banned(seq: list[int], n: int) -> set[int]:
    """Tokens that would complete an n-gram already in ``seq``."""
    if n <= 0 or len(seq) < n:
        return set()
    prefix = tuple(seq[len(seq) - n + 1 :])
    return {seq[i + n - 1] for i in range(len(seq) - n + 1) if tuple(seq[i : i + n - 1]) == prefix}


def _log_probs(scorer, tokens: torch.Tensor, cfg: SearchConfig, eos_id: int) -> torch.Tensor:
    """(R, t) tokens → (R, V) next-token log-probabilities with the min-length and n-gram bans."""
    logp = torch.log_softmax(scorer.step(tokens).float(), dim=-1)  # (R, V)
    generated = tokens.shape[1] - 1  # after [bos]
    if generated < cfg.min_len:
        logp[:, eos_id] = float("-inf")
    if cfg.no_repeat_ngram_size > 0:
        for r, seq in enumerate(tokens[:, 1:].tolist()):
            for tok in _banned(seq, cfg.no_repeat_ngram_size):
                logp[r, tok] = float("-inf")
    return logp


def greedy_search(scorer, batch_size: int, bos_id: int, eos_id: int, cfg: SearchConfig, device=None):
    """Argmax decoding.

    Returns:
        (list of B generated id lists without [bos], [eos] included when emitted; (B,) sum of log-probs).
    """
    tokens = torch.full((batch_size, 1), bos_id, dtype=torch.long, device=device)  # (B, 1)
    scores = torch.zeros(batch_size, device=device)
    done = torch.zeros(batch_size, dtype=torch.bool, device=device)
    for _ in range(cfg.max_len):
        logp = _log_probs(scorer, tokens, cfg, eos_id)
        best, nxt = logp.max(-1)  # (B,)
        scores = scores + torch.where(done, torch.zeros_like(best), best)
        nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
        tokens = torch.cat([tokens, nxt[:, None]], 1)
        done = done | (nxt == eos_id)
        if bool(done.all()):
            break
    out = []
    for seq in tokens[:, 1:].tolist():
        out.append(seq[: seq.index(eos_id) + 1] if eos_id in seq else seq)
    return out, scores


def _finish(hyps: list, seq: list[int], score: float, cfg: SearchConfig) -> None:
    """Adds a finished hypothesis, keeping the ``beam_size`` best by normalised score."""
    hyps.append((score / len(seq) ** cfg.length_penalty, seq))
    hyps.sort(key=lambda h: -h[0])
    del hyps[cfg.beam_size :]


def beam_search(scorer, batch_size: int, bos_id: int, eos_id: int, cfg: SearchConfig, device=None):
    """Beam search; ``scorer`` must hold ``batch_size * beam_size`` rows (image ``b`` at rows b·K..b·K+K-1).

    Returns:
        (list of B best id lists without [bos]; list of B normalised scores).
    """
    K = cfg.beam_size
    tokens = torch.full((batch_size * K, 1), bos_id, dtype=torch.long, device=device)  # (B·K, 1)
    beam_scores = torch.zeros(batch_size, K, device=device)
    beam_scores[:, 1:] = float("-inf")  # the K beams start identical: expand only the first
    finished: list[list] = [[] for _ in range(batch_size)]
    done = [False] * batch_size
    for step in range(cfg.max_len):
        logp = _log_probs(scorer, tokens, cfg, eos_id)  # (B·K, V)
        V = logp.shape[-1]
        cand = (beam_scores.view(-1, 1) + logp).view(batch_size, K * V)
        top_scores, top_index = cand.topk(2 * K, dim=1)  # (B, 2K): enough to refill K live beams
        rows, next_tokens, next_scores = [], [], []
        for b in range(batch_size):
            live = []
            for score, index in zip(top_scores[b].tolist(), top_index[b].tolist()):
                beam, tok = divmod(index, V)
                if done[b] or score == float("-inf"):
                    break
                seq = tokens[b * K + beam, 1:].tolist() + [tok]
                if tok == eos_id:
                    _finish(finished[b], seq, score, cfg)
                else:
                    live.append((b * K + beam, tok, score))
                if len(live) == K:
                    break
            while len(live) < K:  # a finished image (or too few candidates): pad with dead beams
                live.append((b * K, eos_id, float("-inf")))
            rows += [r for r, _, _ in live]
            next_tokens += [t for _, t, _ in live]
            next_scores += [s for _, _, s in live]
            best_live = max(next_scores[-K:])
            length = step + 2  # a live hypothesis is at least one token longer when it finishes
            if len(finished[b]) == K and best_live / length**cfg.length_penalty <= finished[b][-1][0]:
                done[b] = True
        index = torch.tensor(rows, dtype=torch.long, device=tokens.device)
        scorer.reorder(index)
        tokens = torch.cat(
            [tokens.index_select(0, index), torch.tensor(next_tokens, device=tokens.device)[:, None]], 1
        )
        beam_scores = torch.tensor(next_scores, device=tokens.device).view(batch_size, K)
        if all(done):
            break
    for b in range(batch_size):  # max_len reached: live hypotheses compete as they are
        for k in range(K):
            s = float(beam_scores[b, k])
            if not done[b] and s > float("-inf"):
                _finish(finished[b], tokens[b * K + k, 1:].tolist(), s, cfg)
    return [f[0][1] for f in finished], [f[0][0] for f in finished]
