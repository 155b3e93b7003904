"""Vector quantizer with an l2-normalised codebook and EMA updates (BEiT v2 / VQ-KD, Peng et al., 2022).

As unilm ``beit2/norm_ema_quantizer.py::NormEMAVectorQuantizer``: inputs and codes live on the unit
sphere, the nearest code is the one of largest cosine, the codebook is not trained by gradients but
moved towards the normalised mean of the vectors assigned to it (``c ← l2norm(γ c + (1-γ) mean)``),
the loss is only the commitment term ``β · ‖sg(z_q) - z‖²`` and gradients pass straight through.
The codebook can be initialised by cosine k-means on the first batch (here from k-means++ seeds).

Added here — the reason unilm's users report half the codebook unused: **dead-code restart**. Every
``restart_every`` steps, codes that received fewer than ``dead_code_threshold`` times the mean number
of vectors per code during those steps are re-seeded with encoder outputs of the current batch, drawn
with the caller's generator k-means++ style (probability ∝ squared distance to the nearest live code).

Multi-process training: set ``reduce_fn`` (sum over ranks, in place) so counts and sums are global,
and ``broadcast_fn`` (copy from rank 0, in place) so restarts and the k-means initialisation are
identical on every rank. This module itself never imports ``torch.distributed``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["NormEMAQuantizer", "cosine_kmeans", "kmeans_pp_seeds"]


def _sample_rows(x: torch.Tensor, n: int, generator: torch.Generator | None) -> torch.Tensor:
    """``n`` rows of ``x``, without replacement when there are enough."""
    if x.shape[0] >= n:
        idx = torch.randperm(x.shape[0], generator=generator, device="cpu")[:n]
    else:
        idx = torch.randint(0, x.shape[0], (n,), generator=generator, device="cpu")
    return x[idx.to(x.device)]


def kmeans_pp_seeds(x: torch.Tensor, k: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """k-means++ seeding of unit vectors x (N, d): each seed drawn ∝ squared distance to the chosen ones."""
    n = x.shape[0]
    u = torch.rand(k, generator=generator, dtype=torch.float64)  # one uniform number per seed
    seeds = torch.empty(k, dtype=torch.long)
    seeds[0] = min(int(u[0] * n), n - 1)
    dist = (2 - 2 * (x @ x[seeds[0]])).clamp_min(0).double()  # (N,) squared distance to the nearest seed
    for i in range(1, k):
        cdf = dist.cumsum(0)
        total = float(cdf[-1])
        nxt = int(torch.searchsorted(cdf, u[i] * total).clamp_max(n - 1)) if total > 0 else int(u[i] * n) % n
        seeds[i] = nxt
        torch.minimum(dist, (2 - 2 * (x @ x[nxt])).clamp_min(0).double(), out=dist)
    return x[seeds.to(x.device)]


def cosine_kmeans(
    x: torch.Tensor, k: int, iters: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Spherical k-means of unit vectors ``x`` (N, d) from k-means++ seeds.

    Returns:
        (centroids (k, d) on the unit sphere, counts (k,) of the last assignment). Empty clusters keep
        their previous centroid.
    """
    means = kmeans_pp_seeds(x, k, generator)
    counts = torch.zeros(k, device=x.device)
    for _ in range(iters):
        assign = (x @ means.t()).argmax(dim=1)  # (N,)
        counts = torch.bincount(assign, minlength=k).to(x.dtype)
        sums = torch.zeros_like(means).index_add_(0, assign, x)
        new = F.normalize(sums, dim=-1)
        means = torch.where((counts == 0)[:, None], means, new)
    return means, counts


class NormEMAQuantizer(nn.Module):
    """Cosine-similarity vector quantizer with EMA codebook updates and dead-code restart.

    Args:
        codebook_size: number of codes K.
        code_dim: code dimension d.
        decay: EMA decay γ.
        beta: commitment loss weight.
        kmeans_init: initialise by k-means on the first training batch (else random unit vectors).
        kmeans_iters: k-means iterations.
        restart_every: steps between dead-code restarts (0 disables).
        dead_code_threshold: fraction of the mean count per code below which a code is dead.
    """

    def __init__(
        self,
        codebook_size: int,
        code_dim: int,
        decay: float = 0.99,
        beta: float = 1.0,
        kmeans_init: bool = True,
        kmeans_iters: int = 10,
        restart_every: int = 50,
        dead_code_threshold: float = 0.1,
    ) -> None:
        super().__init__()
        self.codebook_size, self.code_dim = codebook_size, code_dim
        self.decay, self.beta = decay, beta
        self.kmeans_iters = kmeans_iters
        self.restart_every, self.dead_code_threshold = restart_every, dead_code_threshold
        init = (
            torch.zeros(codebook_size, code_dim)
            if kmeans_init
            else F.normalize(torch.randn(codebook_size, code_dim), dim=-1)
        )
        self.register_buffer("codebook", init)
        self.register_buffer("cluster_size", torch.zeros(codebook_size))  # EMA count per batch
        self.register_buffer("window_counts", torch.zeros(codebook_size))  # counts since the last restart
        self.register_buffer("initted", torch.tensor(0.0 if kmeans_init else 1.0))
        self.register_buffer("steps", torch.tensor(0, dtype=torch.long))
        self.reduce_fn: Callable[[torch.Tensor], None] | None = None
        self.broadcast_fn: Callable[[torch.Tensor], None] | None = None
        self.last_restarts = 0

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """Indices (...,) of the nearest codes of unit vectors z (..., d)."""
        return self.nearest_to(z, self.codebook)

    @staticmethod
    def nearest_to(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
        """Indices (...,) of the rows of ``codebook`` (K, d) of largest cosine with unit vectors z (..., d)."""
        return (z @ codebook.t()).argmax(dim=-1)

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """Code vectors (..., d) of indices (...)."""
        return F.embedding(codes, self.codebook)

    def forward(
        self, z: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Quantizes z (..., d).

        Returns:
            (z_q (..., d) with straight-through gradients, codes (...,), commitment loss).
        """
        z = F.normalize(z, dim=-1)
        flat = z.reshape(-1, self.code_dim)  # (N, d)
        if self.training and not bool(self.initted):
            self._kmeans_init(flat.detach(), generator)
        codes = self.nearest(flat)  # (N,)
        z_q = self.lookup(codes).view_as(z)
        if self.training:
            self._ema_update(flat.detach(), codes, generator)
        loss = self.beta * F.mse_loss(z_q.detach(), z)
        z_q = z + (z_q - z).detach()
        return z_q, codes.view(z.shape[:-1]), loss

    @torch.no_grad()
    def _kmeans_init(self, flat: torch.Tensor, generator: torch.Generator | None) -> None:
        means, counts = cosine_kmeans(flat, self.codebook_size, self.kmeans_iters, generator)
        if self.broadcast_fn is not None:
            self.broadcast_fn(means)  # rank 0's centroids; their counts over every rank's vectors:
            counts = torch.bincount(self.nearest_to(flat, means), minlength=self.codebook_size).to(flat.dtype)
            if self.reduce_fn is not None:
                self.reduce_fn(counts)
        self.codebook.copy_(means)
        self.cluster_size.copy_(counts)
        self.initted.fill_(1.0)

    @torch.no_grad()
    def _ema_update(self, flat: torch.Tensor, codes: torch.Tensor, generator: torch.Generator | None) -> None:
        bins = torch.bincount(codes, minlength=self.codebook_size).to(flat.dtype)  # (K,)
        sums = torch.zeros_like(self.codebook).index_add_(0, codes, flat)  # (K, d)
        if self.reduce_fn is not None:
            self.reduce_fn(bins)
            self.reduce_fn(sums)
        self.cluster_size.mul_(self.decay).add_(bins, alpha=1 - self.decay)
        self.window_counts.add_(bins)
        means = F.normalize(sums, dim=-1)
        means = torch.where((bins == 0)[:, None], self.codebook, means)
        self.codebook.copy_(F.normalize(self.decay * self.codebook + (1 - self.decay) * means, dim=-1))
        self.steps += 1
        if self.restart_every > 0 and int(self.steps) % self.restart_every == 0:
            self.last_restarts = self._restart_dead(flat, float(bins.sum()), generator)

    @torch.no_grad()
    def _restart_dead(self, flat: torch.Tensor, batch_total: float, generator: torch.Generator | None) -> int:
        """Re-seeds dead codes with vectors of the batch; returns how many were restarted.

        Candidates are drawn k-means++ style, with probability proportional to their squared distance
        to the nearest live code: vectors the codebook already represents well (in particular the many
        identical vectors of flat image regions) are not picked again, so restarted codes land where
        they will be used.
        """
        window_mean = float(self.window_counts.sum()) / self.codebook_size
        dead = self.window_counts < self.dead_code_threshold * window_mean
        self.window_counts.zero_()
        n = int(dead.sum())
        if n == 0 or n == self.codebook_size:
            return 0
        sim = flat @ self.codebook[~dead].t()  # (N, live)
        weight = (2 - 2 * sim.max(dim=1).values).clamp_min(0).cpu().double()  # squared distance
        usable = flat.new_tensor([float(float(weight.sum()) > 0)])
        if self.broadcast_fn is not None:
            self.broadcast_fn(usable)  # rank 0 decides: only its vectors are used, and all ranks must agree
        if not bool(usable):
            return 0
        if float(weight.sum()) <= 0:  # another rank's draw, replaced by rank 0's below
            weight = torch.ones_like(weight)
        idx = torch.multinomial(weight, n, replacement=int((weight > 0).sum()) < n, generator=generator)
        new = flat[idx.to(flat.device)]
        if self.broadcast_fn is not None:
            self.broadcast_fn(new)
        self.codebook[dead] = new
        self.cluster_size[dead] = batch_total / self.codebook_size
        return n
