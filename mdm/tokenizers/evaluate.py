"""Tokenizer quality: codebook usage, perplexity, and reconstruction (dVAE MSE or VQ-KD teacher cosine).

- usage: fraction of the codebook assigned to at least one patch of the evaluation images;
- perplexity: ``exp(H)`` of the code histogram (= the number of equally used codes with that entropy);
- ``mse``: pixel MSE of dVAE reconstructions against the (resized) inputs, in [0, 1] units, and
  ``mse_mean_image``: the MSE of reconstructing every image as the mean evaluation image — a decoder
  that ignores the codes gets no lower, so ``mse`` well below it shows the codes carry the picture;
- ``teacher_cosine``: mean cosine between VQ-KD's decoded features and the teacher's patch features.
"""

from __future__ import annotations

import math

import torch

from mdm.tokenizers.base import VisualTokenizer, as_rgb, resize_images
from mdm.tokenizers.teacher import Teacher

__all__ = ["CodeHistogram", "evaluate"]


class CodeHistogram:
    """Running counts of codes, for usage and perplexity."""

    def __init__(self, codebook_size: int) -> None:
        self.counts = torch.zeros(codebook_size, dtype=torch.long)

    def update(self, codes: torch.Tensor) -> None:
        """Adds a tensor of codes (any shape)."""
        self.counts += torch.bincount(codes.flatten().cpu(), minlength=self.counts.numel())

    def reset(self) -> None:
        """Forgets all counts."""
        self.counts.zero_()

    @property
    def usage(self) -> float:
        """Fraction of codes seen at least once."""
        return float((self.counts > 0).float().mean())

    @property
    def perplexity(self) -> float:
        """``exp`` of the entropy of the code distribution."""
        total = int(self.counts.sum())
        if total == 0:
            return 0.0
        p = self.counts[self.counts > 0].double() / total
        return math.exp(float(-(p * p.log()).sum()))


@torch.no_grad()
def evaluate(
    tok: VisualTokenizer, images: torch.Tensor, teacher: Teacher | None = None, batch_size: int = 64
) -> dict[str, float]:
    """Evaluates ``tok`` on float images (N, C, H, W) in [0, 1].

    Returns:
        ``{"usage", "perplexity", "num_tokens"}`` plus ``"mse"``, ``"mse_mean_image"`` (tokenizers that
        decode pixels) and
        ``"teacher_cosine"`` (VQ-KD with a teacher).
    """
    was_training = tok.training
    tok.eval()
    hist = CodeHistogram(tok.codebook_size)
    sums = {"mse": 0.0, "teacher_cosine": 0.0}
    device = next(tok.parameters()).device
    for start in range(0, images.shape[0], batch_size):
        batch = resize_images(as_rgb(images[start : start + batch_size].to(device)), tok.img_size)
        codes = tok.encode(batch)  # (b, h, w)
        hist.update(codes)
        if tok.can_decode:
            sums["mse"] += float((tok.decode(codes) - batch).pow(2).mean(dim=(1, 2, 3)).sum())
        if teacher is not None and hasattr(tok, "decode_features"):
            pred = tok.decode_features(codes)  # (b, h, w, C)
            target = teacher(batch, tok.grid_size)
            cos = torch.nn.functional.cosine_similarity(pred, target, dim=-1)  # (b, h, w)
            sums["teacher_cosine"] += float(cos.mean(dim=(1, 2)).sum())
    tok.train(was_training)
    n = images.shape[0]
    out = {"usage": hist.usage, "perplexity": hist.perplexity, "num_tokens": float(hist.counts.sum())}
    if tok.can_decode:
        out["mse"] = sums["mse"] / n
        # what a decoder that ignores the codes achieves: every image reconstructed as the mean image
        resized = resize_images(as_rgb(images.to(device)), tok.img_size)
        out["mse_mean_image"] = float((resized - resized.mean(0, keepdim=True)).pow(2).mean())
    if teacher is not None and hasattr(tok, "decode_features"):
        out["teacher_cosine"] = sums["teacher_cosine"] / n
    return out
