"""Acoustic tokenizers of BEATs (Chen et al., 2023, "BEATs: Audio Pre-Training with Acoustic Tokenizers",
§3.2; reference ``microsoft/unilm beats/Tokenizers.py``): normalised log-mel filterbanks (B, T, F) →
one discrete code per 16 × 16 spectrogram patch, (B, P) long, time-major like the backbone's patches.

* :class:`RandomProjectionTokenizer` (``acoustic_rp``, iteration 1, the cold start): a frozen random
  projection ``W`` of each patch and a frozen random codebook ``V``; the code is the nearest codebook
  vector (``argmin ‖v_i − W x‖``). Here both ``W x`` and the ``v_i`` are l2-normalised (nearest = largest
  cosine) and each patch is standardised first (``patch_norm``): without that, the clip-level loudness
  that every patch shares dominates ``W x`` and a handful of codes take everything. Nothing is trained;
  the projection and the codebook are drawn from ``seed`` and saved with the tokenizer.
* :class:`AcousticVQKD` (``acoustic_vqkd``, iterations ≥ 2, the self-distilled tokenizer): a
  Transformer encoder over the spectrogram patches (an audio-only mdm backbone), BEATs'
  ``quantize_layer`` (Linear, Tanh, Linear to the code dimension), the l2-normalised EMA codebook of
  VQ-KD (:class:`~mdm.tokenizers.quantizer.NormEMAQuantizer`: k-means initialisation, dead-code
  restarts, usage tracking; 1024 × 256 as every BEATs tokenizer), and a 3-layer Transformer estimator
  that regresses the last-layer features of a teacher — the previous iteration's audio model — with a
  cosine loss. Only the encoder and the codebook are needed to tokenize.

Model code only: no files, no global RNG (the random tokenizer draws from its own generator).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from mdm.config import from_dict, to_dict
from mdm.models.layers.embeddings import audio_pos_table
from mdm.tokenizers.quantizer import NormEMAQuantizer

__all__ = [
    "AcousticTokenizer",
    "AcousticVQKD",
    "AcousticVQKDConfig",
    "RandomProjectionConfig",
    "RandomProjectionTokenizer",
    "spectrogram_patches",
]


def spectrogram_patches(audio: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, T, F) → (B, P, p·p): 16 × 16 patches time-major (``t · F/p + f``), values of a patch
    time-major then frequency."""
    B, T, Fr = audio.shape
    p = patch_size
    x = audio[:, : T // p * p].reshape(B, T // p, p, Fr // p, p)
    return x.permute(0, 1, 3, 2, 4).reshape(B, (T // p) * (Fr // p), p * p)


def _patch_padding(
    padding_mask: torch.Tensor | None, T: int, freq_patches: int, p: int
) -> torch.Tensor | None:
    """(B, T) frame padding → (B, P) patch padding (a patch is padding when all its frames are)."""
    if padding_mask is None:
        return None
    B = padding_mask.shape[0]
    frames = padding_mask[:, : T // p * p].reshape(B, T // p, p).all(-1)  # (B, T/p)
    return frames.repeat_interleave(freq_patches, dim=1)


class AcousticTokenizer(nn.Module):
    """Base class: ``encode(audio (B, T, F), padding_mask (B, T) | None) -> (B, P) long``.

    Subclasses set ``kind`` and implement :meth:`_codes`, :meth:`config_dict`, :meth:`from_config`.
    """

    kind: ClassVar[str] = ""
    #: Marks acoustic tokenizers for the commands (``mdm tokenizer eval``) and the pretraining engine.
    modality: ClassVar[str] = "audio"

    def __init__(self, codebook_size: int, patch_size: int, mel_bins: int) -> None:
        super().__init__()
        self._codebook_size, self.patch_size, self.mel_bins = codebook_size, patch_size, mel_bins

    @property
    def codebook_size(self) -> int:
        """Number of distinct codes."""
        return self._codebook_size

    def check(self, audio: torch.Tensor) -> None:
        """Raises ValueError for input that is not (B, T, mel_bins) float with T a multiple of the patch."""
        if audio.ndim != 3 or audio.shape[-1] != self.mel_bins or not audio.is_floating_point():
            raise ValueError(
                f"expected normalised filterbanks (B, T, {self.mel_bins}) float, got {tuple(audio.shape)} {audio.dtype}"
            )
        if audio.shape[1] % self.patch_size:
            raise ValueError(f"{audio.shape[1]} frames is not a multiple of the patch size {self.patch_size}")

    @torch.no_grad()
    def encode(self, audio: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Codes of a batch of clips.

        Args:
            audio: (B, T, F) normalised log-mel filterbanks (the features the backbone sees).
            padding_mask: (B, T) bool, True at padded frames (codes of padded patches are meaningless
                and never predicted).

        Returns:
            LongTensor (B, P), P = (T/p)·(F/p), values in ``[0, codebook_size)``.
        """
        self.check(audio)
        return self._codes(audio, padding_mask).long()

    def _codes(self, audio: torch.Tensor, padding_mask: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def config_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def from_config(cls, config: dict[str, Any], source: str = "<config>") -> AcousticTokenizer:
        raise NotImplementedError

    def freeze(self) -> AcousticTokenizer:
        """Eval mode and no gradients: how a tokenizer is used as a masked-prediction target."""
        self.eval()
        for p in self.parameters():
            p.requires_grad_(False)
        return self


# ------------------------------------------------------------------------------------ iteration 1


@dataclass
class RandomProjectionConfig:
    """The random-projection tokenizer.

    Attributes:
        codebook_size: codes K (1024 in BEATs).
        code_dim: projection / code dimension (256 in BEATs).
        patch_size: spectrogram patch side.
        mel_bins: mel bins of the input.
        patch_norm: ``standardize`` (each patch minus its mean, over its std), ``center`` (minus its
            mean) or ``none`` before the projection.
        seed: the projection and the codebook are drawn from ``torch.Generator().manual_seed(seed)``.
    """

    codebook_size: int = 1024
    code_dim: int = 256
    patch_size: int = 16
    mel_bins: int = 128
    patch_norm: Literal["standardize", "center", "none"] = "standardize"
    seed: int = 0


class RandomProjectionTokenizer(AcousticTokenizer):
    """BEATs' iteration-1 tokenizer: frozen random projection + frozen random codebook, nearest neighbour.

    Args:
        cfg: sizes and seed.
    """

    kind = "acoustic_rp"

    def __init__(self, cfg: RandomProjectionConfig) -> None:
        super().__init__(cfg.codebook_size, cfg.patch_size, cfg.mel_bins)
        self.cfg = cfg
        g = torch.Generator().manual_seed(cfg.seed)
        n_in = cfg.patch_size**2
        # Xavier-scaled projection and unit-norm codes (saved: loading never depends on an RNG)
        self.register_buffer("projection", torch.randn(n_in, cfg.code_dim, generator=g) / n_in**0.5)
        self.register_buffer(
            "codebook", F.normalize(torch.randn(cfg.codebook_size, cfg.code_dim, generator=g), dim=-1)
        )

    def project(self, audio: torch.Tensor) -> torch.Tensor:
        """(B, T, F) → l2-normalised projections (B, P, code_dim)."""
        x = spectrogram_patches(audio.float(), self.patch_size)  # (B, P, p·p)
        if self.cfg.patch_norm != "none":
            x = x - x.mean(dim=-1, keepdim=True)
        if self.cfg.patch_norm == "standardize":
            x = x / (x.std(dim=-1, keepdim=True) + 1e-5)
        return F.normalize(x @ self.projection, dim=-1)

    def _codes(self, audio: torch.Tensor, padding_mask: torch.Tensor | None) -> torch.Tensor:
        return (self.project(audio) @ self.codebook.t()).argmax(dim=-1)  # (B, P)

    def config_dict(self) -> dict[str, Any]:
        return to_dict(self.cfg)

    @classmethod
    def from_config(cls, config: dict[str, Any], source: str = "<config>") -> RandomProjectionTokenizer:
        return cls(from_dict(RandomProjectionConfig, config, source=source))


# ------------------------------------------------------------------------------------ iterations >= 2


@dataclass
class AcousticVQKDConfig:
    """The self-distilled acoustic tokenizer.

    Attributes:
        patch_size: spectrogram patch side.
        mel_bins: mel bins of the input.
        audio_frames: frames the encoder's position table is built for (other lengths crop it or
            interpolate it, as the backbone's).
        embed_dim / depth / num_heads: the encoder (12 × 768, 12 heads in BEATs).
        decoder_dim / decoder_depth / decoder_heads: the estimator (3 layers in BEATs).
        codebook_size: codes (1024 in BEATs).
        code_dim: code dimension (256 in BEATs).
        teacher_dim: width of the regressed teacher features (0 = from the teacher at build time).
        decay / beta / kmeans_init / kmeans_iters / restart_every / dead_code_threshold: the quantizer
            (:class:`~mdm.tokenizers.quantizer.NormEMAQuantizer`).
    """

    patch_size: int = 16
    mel_bins: int = 128
    audio_frames: int = 1024
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    decoder_dim: int = 768
    decoder_depth: int = 3
    decoder_heads: int = 12
    codebook_size: int = 1024
    code_dim: int = 256
    teacher_dim: int = 0
    decay: float = 0.99
    beta: float = 1.0
    kmeans_init: bool = True
    kmeans_iters: int = 10
    restart_every: int = 50
    dead_code_threshold: float = 0.1

    def encoder_config(self) -> Any:
        """The encoder as an audio-only mdm backbone config (pre-LN ViT blocks, learned positions)."""
        from mdm.models.config import make_config

        return make_config(
            "audiomae_base",
            embed_dim=self.embed_dim,
            depth=self.depth,
            num_heads=self.num_heads,
            ffn_dim=4 * self.embed_dim,
            audio_frames=self.audio_frames,
            audio_mel_bins=self.mel_bins,
            audio_patch_size=self.patch_size,
            audio_pos_trainable=True,
            normalize_output=True,
        )


class EstimatorBlock(nn.Module):
    """A pre-LN transformer block (shared attention, one FFN) with a key mask, for the estimator."""

    def __init__(self, dim: int, num_heads: int, norm_eps: float = 1e-6) -> None:
        super().__init__()
        from mdm.models.layers.attention import MultiwayAttention
        from mdm.models.layers.ffn import FeedForward

        self.attn_norm = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = MultiwayAttention(dim, num_heads, multiway=False, norm_eps=norm_eps)
        self.ffn = FeedForward(dim, 4 * dim, norm_eps=norm_eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, N, D) → (B, N, D); ``mask`` (B, 1, 1, N) True where attending is allowed."""
        x = x + self.attn(self.attn_norm(x), x.shape[1], mask)
        return x + self.ffn(x)


def _task_layer(dim: int, out: int) -> nn.Sequential:
    layer = nn.Sequential(nn.Linear(dim, dim), nn.Tanh(), nn.Linear(dim, out))
    for m in layer:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)
    return layer


class AcousticVQKD(AcousticTokenizer):
    """Encoder → quantizer → estimator, trained to regress a teacher's last-layer patch features.

    Args:
        cfg: architecture; ``cfg.teacher_dim`` must be set.
    """

    kind = "acoustic_vqkd"

    def __init__(self, cfg: AcousticVQKDConfig) -> None:
        super().__init__(cfg.codebook_size, cfg.patch_size, cfg.mel_bins)
        if cfg.teacher_dim <= 0:
            raise ValueError(
                "AcousticVQKDConfig.teacher_dim must be set (the width of the teacher's features)"
            )
        from mdm.models.multiway import MultiwayTransformer

        self.cfg = cfg
        self.encoder = MultiwayTransformer(cfg.encoder_config())
        self.quantize_layer = _task_layer(cfg.embed_dim, cfg.code_dim)  # BEATs' name
        self.quantizer = NormEMAQuantizer(
            cfg.codebook_size,
            cfg.code_dim,
            decay=cfg.decay,
            beta=cfg.beta,
            kmeans_init=cfg.kmeans_init,
            kmeans_iters=cfg.kmeans_iters,
            restart_every=cfg.restart_every,
            dead_code_threshold=cfg.dead_code_threshold,
        )
        self.decoder_embed = nn.Linear(cfg.code_dim, cfg.decoder_dim)
        self.decoder = nn.ModuleList(
            EstimatorBlock(cfg.decoder_dim, cfg.decoder_heads) for _ in range(cfg.decoder_depth)
        )
        self.decoder_norm = nn.LayerNorm(cfg.decoder_dim, eps=1e-6)
        self.decode_proj = _task_layer(cfg.decoder_dim, cfg.teacher_dim)
        for m in (self.decoder_embed, self.decoder):
            for sub in m.modules():
                if isinstance(sub, nn.Linear):
                    nn.init.trunc_normal_(sub.weight, std=0.02)
                    nn.init.zeros_(sub.bias)

    def quantize(
        self,
        audio: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(z_q (B, P, d) with straight-through gradients, codes (B, P), commitment loss, patch padding).

        In training, only the non-padded patches update the codebook (padding is not audio)."""
        B, T, _ = audio.shape
        pad = _patch_padding(padding_mask, T, self.mel_bins // self.patch_size, self.patch_size)
        feats = self.encoder(audio=audio, audio_padding_mask=padding_mask)[:, 1:]  # (B, P, D)
        z = self.quantize_layer(feats.float())  # (B, P, d)
        if pad is None or not self.training:
            z_q, codes, loss = self.quantizer(z, generator)
            return z_q, codes, loss, pad
        keep = ~pad
        zq_real, codes_real, loss = self.quantizer(z[keep], generator)  # (M, d), (M,)
        z_q = F.normalize(z, dim=-1).masked_scatter(keep[..., None], zq_real)
        codes = torch.zeros(B, z.shape[1], dtype=torch.long, device=z.device).masked_scatter(keep, codes_real)
        return z_q, codes, loss, pad

    def _codes(self, audio: torch.Tensor, padding_mask: torch.Tensor | None) -> torch.Tensor:
        return self.quantize(audio, padding_mask)[1]

    def estimate(
        self, z_q: torch.Tensor, grid: tuple[int, int], pad: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Code vectors (B, P, d) → predicted teacher features (B, P, teacher_dim)."""
        x = self.decoder_embed(z_q) + audio_pos_table(*grid, self.cfg.decoder_dim)[1:].to(z_q)  # (B, P, d')
        mask = None if pad is None else (~pad)[:, None, None, :]
        for block in self.decoder:
            x = block(x, mask)
        return self.decode_proj(self.decoder_norm(x))

    @torch.no_grad()
    def decode_features(self, codes: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Predicted teacher features (B, P, teacher_dim) of codes (B, P)."""
        return self.estimate(self.quantizer.lookup(codes.long()), grid)

    def forward(
        self,
        audio: torch.Tensor,
        target: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        """Training losses.

        Args:
            audio: (B, T, F) normalised filterbanks.
            target: the teacher's features (B, P, teacher_dim).
            padding_mask: (B, T) bool, True at padded frames (ignored in the loss and the codebook).
            generator: randomness of k-means initialisation and dead-code restarts.

        Returns:
            ``{"loss", "rec_loss", "quant_loss", "cosine", "codes"}``; ``loss = rec_loss + quant_loss``.
        """
        self.check(audio)
        grid = (audio.shape[1] // self.patch_size, self.mel_bins // self.patch_size)
        z_q, codes, quant_loss, pad = self.quantize(audio, padding_mask, generator)
        pred = self.estimate(z_q, grid, pad)
        cos = F.cosine_similarity(pred.float(), target.float(), dim=-1)  # (B, P)
        keep = torch.ones_like(cos, dtype=torch.bool) if pad is None else ~pad
        rec_loss = 1 - cos[keep].mean()
        return {
            "loss": rec_loss + quant_loss,
            "rec_loss": rec_loss,
            "quant_loss": quant_loss,
            "cosine": (1 - rec_loss).detach(),
            "codes": codes[keep].detach(),
        }

    def no_weight_decay(self) -> set[str]:
        """Parameters kept out of weight decay (besides biases and norms)."""
        return {f"encoder.{n}" for n in self.encoder.no_weight_decay()}

    def config_dict(self) -> dict[str, Any]:
        return to_dict(self.cfg)

    @classmethod
    def from_config(cls, config: dict[str, Any], source: str = "<config>") -> AcousticVQKD:
        return cls(from_dict(AcousticVQKDConfig, config, source=source))
