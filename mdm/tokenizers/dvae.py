"""The DALL-E discrete VAE (Ramesh et al., 2021, "Zero-Shot Text-to-Image Generation", §2.1 and App. A).

BEiT v1 uses its encoder as the MIM tokenizer: 112 px inputs → 14×14 codes out of 8192 (reference
anchors: ``beit-family.md`` §3.4). The module layout and parameter names (``blocks.group_1.block_1.
res_path.conv_1.w`` ...) are those of the ``dall_e`` package, so the official ``encoder.pkl`` /
``decoder.pkl`` import by name and the parity test compares against ``dall_e`` directly. Width, depth,
number of groups and vocabulary are configurable.

Training follows the paper: Gumbel-softmax relaxation of the code distribution (temperature annealed),
a logit-Laplace reconstruction likelihood on ``map_pixels``-ed images and a KL term to the uniform prior
whose weight is raised over the first steps.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mdm.config import from_dict, to_dict
from mdm.tokenizers.base import VisualTokenizer
from mdm.tokenizers.config import DVAEConfig

__all__ = ["DVAE", "DalleEncoder", "DalleDecoder", "map_pixels", "unmap_pixels", "LOGIT_LAPLACE_EPS"]

LOGIT_LAPLACE_EPS = 0.1


def map_pixels(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] → [eps, 1 - eps], the range the logit-Laplace likelihood is defined on."""
    return (1 - 2 * LOGIT_LAPLACE_EPS) * x + LOGIT_LAPLACE_EPS


def unmap_pixels(x: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`map_pixels`, clamped to [0, 1]."""
    return ((x - LOGIT_LAPLACE_EPS) / (1 - 2 * LOGIT_LAPLACE_EPS)).clamp(0, 1)


class Conv2d(nn.Module):
    """Same-padded convolution with parameters named ``w`` and ``b`` (the ``dall_e`` names)."""

    def __init__(self, n_in: int, n_out: int, kw: int) -> None:
        super().__init__()
        self.kw = kw
        self.w = nn.Parameter(torch.randn(n_out, n_in, kw, kw) / math.sqrt(n_in * kw**2))
        self.b = nn.Parameter(torch.zeros(n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.w, self.b, padding=(self.kw - 1) // 2)


class _ResBlock(nn.Module):
    """``id_path(x) + post_gain * res_path(x)``; the bottleneck is ``n_out / 4`` wide."""

    def __init__(self, n_in: int, n_out: int, n_layers: int, kernels: tuple[int, int, int, int]) -> None:
        super().__init__()
        n_hid = n_out // 4
        self.post_gain = 1 / n_layers**2
        self.id_path = Conv2d(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        dims = [(n_in, n_hid), (n_hid, n_hid), (n_hid, n_hid), (n_hid, n_out)]
        layers: list[tuple[str, nn.Module]] = []
        for i, ((a, b), k) in enumerate(zip(dims, kernels), start=1):
            layers += [(f"relu_{i}", nn.ReLU()), (f"conv_{i}", Conv2d(a, b, k))]
        self.res_path = nn.Sequential(OrderedDict(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.id_path(x) + self.post_gain * self.res_path(x)


class DalleEncoder(nn.Module):
    """Images (B, 3, H, W) after ``map_pixels`` → code logits (B, vocab, H / 2^(G-1), W / 2^(G-1))."""

    def __init__(self, hidden_dim: int, blocks_per_group: int, num_groups: int, vocab_size: int) -> None:
        super().__init__()
        n_layers = num_groups * blocks_per_group
        blocks: list[tuple[str, nn.Module]] = [("input", Conv2d(3, hidden_dim, 7))]
        n_prev = hidden_dim
        for g in range(1, num_groups + 1):
            width = hidden_dim * 2 ** (g - 1)
            group: list[tuple[str, nn.Module]] = []
            for i in range(blocks_per_group):
                group.append((f"block_{i + 1}", _ResBlock(n_prev, width, n_layers, (3, 3, 3, 1))))
                n_prev = width
            if g < num_groups:
                group.append(("pool", nn.MaxPool2d(kernel_size=2)))
            blocks.append((f"group_{g}", nn.Sequential(OrderedDict(group))))
        out = OrderedDict([("relu", nn.ReLU()), ("conv", Conv2d(n_prev, vocab_size, 1))])
        blocks.append(("output", nn.Sequential(out)))
        self.blocks = nn.Sequential(OrderedDict(blocks))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


class DalleDecoder(nn.Module):
    """(Soft) one-hot codes (B, vocab, h, w) → 6 channels (B, 6, H, W): logit-Laplace μ and log-scale."""

    def __init__(
        self, init_dim: int, hidden_dim: int, blocks_per_group: int, num_groups: int, vocab_size: int
    ):
        super().__init__()
        n_layers = num_groups * blocks_per_group
        blocks: list[tuple[str, nn.Module]] = [("input", Conv2d(vocab_size, init_dim, 1))]
        n_prev = init_dim
        for g in range(1, num_groups + 1):
            width = hidden_dim * 2 ** (num_groups - g)
            group: list[tuple[str, nn.Module]] = []
            for i in range(blocks_per_group):
                group.append((f"block_{i + 1}", _ResBlock(n_prev, width, n_layers, (1, 3, 3, 3))))
                n_prev = width
            if g < num_groups:
                group.append(("upsample", nn.Upsample(scale_factor=2, mode="nearest")))
            blocks.append((f"group_{g}", nn.Sequential(OrderedDict(group))))
        out = OrderedDict([("relu", nn.ReLU()), ("conv", Conv2d(n_prev, 6, 1))])
        blocks.append(("output", nn.Sequential(out)))
        self.blocks = nn.Sequential(OrderedDict(blocks))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.blocks(z)


def gumbel_softmax(
    logits: torch.Tensor, tau: float, generator: torch.Generator | None, dim: int = 1
) -> torch.Tensor:
    """Relaxed one-hot samples; noise drawn from ``generator`` (never the global RNG when one is given)."""
    u = torch.rand(logits.shape, generator=generator, device=logits.device, dtype=logits.dtype)
    exponential = -torch.log(u.clamp_min(1e-10))  # Exp(1) samples
    gumbel = -torch.log(exponential.clamp_min(1e-10))
    return F.softmax((logits + gumbel) / tau, dim=dim)


class DVAE(VisualTokenizer):
    """DALL-E dVAE: encoder for the codes, decoder for reconstructions.

    Args:
        cfg: architecture.
    """

    kind = "dvae"

    def __init__(self, cfg: DVAEConfig) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.encoder = DalleEncoder(cfg.hidden_dim, cfg.blocks_per_group, cfg.num_groups, cfg.vocab_size)
        self.decoder: DalleDecoder | None = None
        if cfg.with_decoder:
            self.decoder = DalleDecoder(
                cfg.decoder_init_dim,
                cfg.decoder_hidden_dim,
                cfg.blocks_per_group,
                cfg.num_groups,
                cfg.vocab_size,
            )

    @property
    def codebook_size(self) -> int:
        return self.cfg.vocab_size

    @property
    def img_size(self) -> int:
        return self.cfg.img_size

    @property
    def grid_size(self) -> tuple[int, int]:
        side = self.cfg.img_size // 2 ** (self.cfg.num_groups - 1)
        return side, side

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        return map_pixels(images)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """Code logits (B, vocab, h, w) of [0, 1] images (any size; resized)."""
        return self.encoder(self.prepare(images))

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x).argmax(dim=1)  # (B, h, w)

    @property
    def can_decode(self) -> bool:
        return self.decoder is not None

    def _decoder(self) -> DalleDecoder:
        if self.decoder is None:
            raise NotImplementedError("this dVAE has no decoder (imported without decoder.pkl)")
        return self.decoder

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        one_hot = F.one_hot(codes.long(), self.codebook_size).permute(0, 3, 1, 2).float()  # (B, K, h, w)
        out = self._decoder()(one_hot.to(self.encoder.blocks.input.w.device))
        return unmap_pixels(torch.sigmoid(out[:, :3]))

    def forward(
        self,
        images: torch.Tensor,
        temperature: float = 1.0,
        kl_weight: float = 0.0,
        recon: str = "logit_laplace",
        generator: torch.Generator | None = None,
        diversity_weight: float = 0.0,
    ) -> dict[str, torch.Tensor]:
        """Training losses on [0, 1] images: ``{"loss", "recon_loss", "kl_loss", "diversity_loss", ...}``.

        ``loss`` is the per-dimension negative ELBO: mean reconstruction NLL plus
        ``kl_weight * KL(q(z|x) || uniform)`` summed over code positions and divided by the number of
        pixel values, so both terms are on one scale. ``diversity_weight`` adds wav2vec 2.0's diversity
        loss (Baevski et al., 2020), ``1 - H(mean q) / log K`` over the batch: it keeps the encoder from
        sending every position to one code, which small models on simple images otherwise do early on.
        """
        x = self.prepare(images)  # (B, 3, H, W) in [eps, 1 - eps]
        logits = self.encoder(x)  # (B, K, h, w)
        soft = gumbel_softmax(logits, temperature, generator, dim=1)
        out = self._decoder()(soft)  # (B, 6, H, W)
        mu, log_scale = out[:, :3], out[:, 3:]
        if recon == "logit_laplace":
            nll = _logit_laplace_nll(x, mu, log_scale)
        elif recon == "mse":
            nll = (torch.sigmoid(mu) - x).pow(2)
        else:
            raise ValueError(f"unknown reconstruction loss {recon!r} (logit_laplace, mse)")
        log_q = F.log_softmax(logits, dim=1)
        kl = (log_q.exp() * (log_q + math.log(self.codebook_size))).sum(dim=1)  # (B, h, w)
        recon_loss = nll.mean()
        kl_loss = kl_weight * kl.sum() / nll.numel()
        mean_q = log_q.exp().mean(dim=(0, 2, 3))  # (K,) aggregate posterior of the batch
        entropy = -(mean_q * mean_q.clamp_min(1e-12).log()).sum()
        diversity_loss = diversity_weight * (1 - entropy / math.log(self.codebook_size))
        with torch.no_grad():
            mse = (unmap_pixels(torch.sigmoid(mu)) - unmap_pixels(x)).pow(2).mean()
        return {
            "loss": recon_loss + kl_loss + diversity_loss,
            "recon_loss": recon_loss,
            "kl_loss": kl_loss,
            "diversity_loss": diversity_loss,
            "kl": kl.mean().detach(),
            "mse": mse,
            "codes": logits.argmax(dim=1).detach(),
        }

    @torch.no_grad()
    def init_codes(
        self,
        images: torch.Tensor,
        scale: float = 10.0,
        iters: int = 10,
        generator: torch.Generator | None = None,
    ) -> None:
        """Data-dependent initialisation of the code-logit layer (the encoder's last 1×1 convolution).

        A randomly initialised encoder gives every position nearly the same logits (their spread across
        positions is a fraction of their spread across codes), so the relaxed samples carry no
        information, the decoder learns the mean image and the encoder then sends every position to one
        code. As VQ-KD seeds its codebook, this runs spherical k-means (k-means++ seeds) on the encoder's
        penultimate features of ``images`` and makes code ``k``'s logit ``scale · cos(feature, centroid_k)``
        (times the mean feature norm), so that from the first step the argmax differs between inputs.

        Args:
            images: a training batch (B, 3, H, W) in [0, 1].
            scale: logit gap per unit of cosine.
            iters: k-means iterations.
            generator: randomness of the k-means++ seeding.
        """
        from mdm.tokenizers.quantizer import cosine_kmeans

        body = self.encoder.blocks[:-1]
        h = F.relu(body(self.prepare(images)))  # (B, C, h, w), the input of the output convolution
        feats = h.permute(0, 2, 3, 1).reshape(-1, h.shape[1])  # (B*h*w, C)
        norm = feats.norm(dim=1).mean().clamp_min(1e-6)
        centroids, _ = cosine_kmeans(F.normalize(feats, dim=1), self.codebook_size, iters, generator)
        conv = self.encoder.blocks.output.conv
        conv.w.copy_((scale / norm * centroids).view_as(conv.w))
        conv.b.zero_()

    def config_dict(self) -> dict[str, Any]:
        return to_dict(self.cfg)

    @classmethod
    def from_config(cls, config: dict[str, Any], source: str = "<config>") -> DVAE:
        return cls(from_dict(DVAEConfig, config, source=source))


def _logit_laplace_nll(x: torch.Tensor, mu: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """Per-value NLL of ``x`` ∈ (0, 1) under the logit-Laplace distribution (DALL-E eq. 2).

    p(x | μ, b) = exp(-|logit(x) - μ| / b) / (2 b x (1 - x)).
    """
    logit_x = torch.log(x) - torch.log1p(-x)
    return (logit_x - mu).abs() * torch.exp(-log_scale) + log_scale + math.log(2.0) + torch.log(x * (1 - x))
