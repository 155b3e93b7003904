"""BEATs as released: an audio encoder whose layers are not the Multiway layer (imported, not rebuilt).

BEATs (Chen et al., "BEATs: Audio Pre-Training with Acoustic Tokenizers", 2022; microsoft/unilm
``beats/BEATs.py`` and ``beats/backbone.py``, itself wav2vec 2.0 / WavLM code from fairseq) computes:

1. a (B, T, 128) filterbank (:func:`mdm.data.audio.compute_fbank`, style ``beats``) as a 1-channel image;
2. ``patch_embedding``: Conv2d(1, 512, 16, stride 16, no bias) → (B, P, 512), P = (T/16)·8 time-major;
3. ``layer_norm`` (LayerNorm 512) → ``post_extract_proj`` (Linear 512 → 768);
4. the encoder: padded patches zeroed; a convolutional position embedding added — a weight-normed
   (``weight_g``/``weight_v``, norm over all but the kernel dim) grouped Conv1d (kernel ``conv_pos`` 128,
   16 groups, padding 64), its last output frame dropped (even kernel), GELU — then ``encoder.layer_norm``;
5. post-LN layers (``layer_norm_first=False``): ``x = LN(α·x + attn(x))``, ``x = LN(α·x + fc2(gelu(fc1(x))))``
   with α = (2·layers)^¼ under deep norm (1 otherwise); attention with a T5-style bucketed relative
   position bias (``num_buckets`` 320, ``max_distance`` 1280) computed once from layer 0's table and
   shared, scaled per head and query by the WavLM gate ``gru_rel_pos``:
   ``a, b = sigmoid(sum4(grep_linear(q)))``, ``bias · (a · (b · grep_a − 1) + 2)`` with q the query
   projection before scaling; padding keys masked;
6. fine-tuned checkpoints: ``predictor`` (Linear 768 → 527) on every patch, mean over the non-padding
   patches, sigmoid.

Parameter names are the released checkpoint's (``{"cfg": dict, "model": state_dict}``), so
``load_state_dict`` takes its ``model`` as is; ``mdm import beats`` (:mod:`mdm.export.beats`) writes an
mdm model directory. The frame→patch padding rule of unilm's ``forward_padding_mask`` reshapes the frame
mask to (B, P, T/P) (patch p ↔ frames 2p, 2p+1 with 128 bins) rather than following each patch's time
span; ``padding_rule="reference"`` (default) keeps it for exact parity, ``"time"`` uses the time span.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from mdm.data.audio import PATCH, patch_padding_mask


@dataclass
class BEATsConfig:
    """BEATs architecture; field names are those of the released checkpoints' ``cfg`` dict.

    Attributes:
        input_patch_size: patch side of the spectrogram patch embedding (16).
        embed_dim: patch embedding width (512).
        conv_bias: bias in the patch embedding conv.
        encoder_layers / encoder_embed_dim / encoder_ffn_embed_dim / encoder_attention_heads: the encoder.
        activation_fn: ``gelu`` or ``relu``.
        layer_wise_gradient_decay_ratio: gradients entering each layer are scaled by this (1 = off).
        layer_norm_first: pre-LN layers (False in BEATs: post-LN).
        deep_norm: DeepNorm residual scaling α = (2·layers)^¼ (post-LN only).
        dropout / attention_dropout / activation_dropout / encoder_layerdrop / dropout_input: dropouts.
        conv_pos / conv_pos_groups: kernel and groups of the convolutional position embedding.
        relative_position_embedding / num_buckets / max_distance / gru_rel_pos: the gated relative bias.
        finetuned_model: the model has the AudioSet ``predictor``.
        predictor_dropout / predictor_class: the predictor.
        num_mel_bins: filterbank bins F of the input (128).
        padding_rule: frame → patch padding: ``reference`` (unilm's reshape) or ``time`` (a patch is padding
            when all frames of its time span are).
        arch: a name for logs (``beats``).
    """

    input_patch_size: int = 16
    embed_dim: int = 512
    conv_bias: bool = False
    encoder_layers: int = 12
    encoder_embed_dim: int = 768
    encoder_ffn_embed_dim: int = 3072
    encoder_attention_heads: int = 12
    activation_fn: str = "gelu"
    layer_wise_gradient_decay_ratio: float = 1.0
    layer_norm_first: bool = False
    deep_norm: bool = False
    dropout: float = 0.1
    attention_dropout: float = 0.1
    activation_dropout: float = 0.0
    encoder_layerdrop: float = 0.0
    dropout_input: float = 0.0
    conv_pos: int = 128
    conv_pos_groups: int = 16
    relative_position_embedding: bool = False
    num_buckets: int = 320
    max_distance: int = 1280
    gru_rel_pos: bool = False
    finetuned_model: bool = False
    predictor_dropout: float = 0.1
    predictor_class: int = 527
    num_mel_bins: int = 128
    padding_rule: Literal["reference", "time"] = "reference"
    arch: str = "beats"

    def validate(self) -> None:
        """Raises ValueError on unsupported values."""
        if self.input_patch_size != PATCH:
            raise ValueError(f"input_patch_size {self.input_patch_size}: only {PATCH} is supported")
        if self.encoder_embed_dim % self.encoder_attention_heads:
            raise ValueError("encoder_embed_dim must be divisible by encoder_attention_heads")
        if self.activation_fn not in ("gelu", "relu"):
            raise ValueError(f"activation_fn {self.activation_fn!r}: only gelu and relu are supported")
        if self.deep_norm and self.layer_norm_first:
            raise ValueError(
                "deep_norm needs post-LN layers (layer_norm_first=False), as the reference asserts"
            )


class _GradMultiply(torch.autograd.Function):
    """Identity forward; gradients scaled by ``scale`` (fairseq's GradMultiply)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:  # type: ignore[override]
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return grad * ctx.scale, None


def relative_position_bucket(n_query: int, n_key: int, num_buckets: int, max_distance: int) -> torch.Tensor:
    """(Nq, Nk) bucket of the offset ``key - query`` (bidirectional T5 buckets: exact below a quarter of
    the buckets, logarithmic up to ``max_distance``, one side per half)."""
    rel = torch.arange(n_key)[None, :] - torch.arange(n_query)[:, None]  # (Nq, Nk)
    half = num_buckets // 2
    exact = half // 2
    dist = rel.abs()
    log_ratio = torch.log(dist.clamp(min=1).float() / exact) / math.log(max_distance / exact)
    far = (exact + (log_ratio * (half - exact)).long()).clamp(max=half - 1)
    return (rel > 0).long() * half + torch.where(dist < exact, dist, far)


class WeightNormConv1d(nn.Module):
    """Grouped Conv1d with weight normalisation over all dims but the kernel dim (``weight_g`` (1, 1, K),
    ``weight_v`` (D, D/groups, K)): weight = g · v / ‖v‖, the norm taken per kernel position."""

    def __init__(self, dim: int, kernel: int, groups: int) -> None:
        super().__init__()
        self.kernel, self.groups = kernel, groups
        self.weight_g = nn.Parameter(torch.ones(1, 1, kernel))
        self.weight_v = nn.Parameter(torch.empty(dim, dim // groups, kernel))
        self.bias = nn.Parameter(torch.zeros(dim))
        nn.init.normal_(self.weight_v, std=math.sqrt(4.0 / (kernel * dim)))
        with torch.no_grad():
            self.weight_g.copy_(self.weight_v.norm(dim=(0, 1), keepdim=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, D, N) → (B, D, N + 1 - K % 2)."""
        weight = self.weight_v * (self.weight_g / self.weight_v.norm(dim=(0, 1), keepdim=True))
        return F.conv1d(x, weight, self.bias, padding=self.kernel // 2, groups=self.groups)


class ConvPositionEmbedding(nn.Module):
    """wav2vec 2.0's convolutional relative position embedding: conv → drop the extra frame → GELU.

    A ``Sequential``-style container so that the conv's parameters are named ``0.weight_g`` etc.
    """

    def __init__(self, dim: int, kernel: int, groups: int) -> None:
        super().__init__()
        self.add_module("0", WeightNormConv1d(dim, kernel, groups))
        self.remove = 1 if kernel % 2 == 0 else 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, D) → (B, N, D)."""
        y = getattr(self, "0")(x.transpose(1, 2))  # (B, D, N [+1])
        if self.remove:
            y = y[:, :, : -self.remove]
        return F.gelu(y).transpose(1, 2)


class BEATsAttention(nn.Module):
    """Multi-head self-attention with the gated relative position bias (parameter names of the release)."""

    def __init__(self, cfg: BEATsConfig, with_bias_table: bool) -> None:
        super().__init__()
        D, H = cfg.encoder_embed_dim, cfg.encoder_attention_heads
        self.num_heads, self.head_dim = H, D // H
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(D, D) for _ in range(4))
        self.attn_drop = cfg.attention_dropout
        if with_bias_table:
            self.relative_attention_bias = nn.Embedding(cfg.num_buckets, H)
        self.gated = cfg.gru_rel_pos
        if self.gated:
            self.grep_linear = nn.Linear(self.head_dim, 8)
            self.grep_a = nn.Parameter(torch.ones(1, H, 1, 1))

    def forward(
        self, x: torch.Tensor, padding_mask: torch.Tensor | None, position_bias: torch.Tensor | None
    ) -> torch.Tensor:
        """(B, N, D) → (B, N, D); ``padding_mask`` (B, N) True = padding; ``position_bias`` (H, N, N)."""
        B, N, D = x.shape
        H, d = self.num_heads, self.head_dim
        q = self.q_proj(x).view(B, N, H, d).transpose(1, 2)  # (B, H, N, d)
        k = self.k_proj(x).view(B, N, H, d).transpose(1, 2)
        v = self.v_proj(x).view(B, N, H, d).transpose(1, 2)
        bias = None
        if position_bias is not None:
            bias = position_bias.unsqueeze(0)  # (1, H, N, N)
            if self.gated:
                # WavLM gate from the unscaled query: two sigmoid gates (sums of 4 of 8 outputs each)
                gate_a, gate_b = torch.sigmoid(self.grep_linear(q).view(B, H, N, 2, 4).sum(-1)).chunk(
                    2, dim=-1
                )
                bias = (gate_a * (gate_b * self.grep_a - 1.0) + 2.0) * bias  # (B, H, N, N)
        if padding_mask is not None:
            pad = torch.zeros(B, 1, 1, N, dtype=q.dtype, device=q.device).masked_fill(
                padding_mask[:, None, None, :], float("-inf")
            )
            bias = pad if bias is None else bias + pad
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias, dropout_p=self.attn_drop if self.training else 0.0
        )  # (B, H, N, d)
        return self.out_proj(out.transpose(1, 2).reshape(B, N, D))


class BEATsLayer(nn.Module):
    """fairseq ``TransformerSentenceEncoderLayer``: post-LN (optionally DeepNorm) or pre-LN."""

    def __init__(self, cfg: BEATsConfig, with_bias_table: bool) -> None:
        super().__init__()
        D = cfg.encoder_embed_dim
        self.self_attn = BEATsAttention(cfg, with_bias_table)
        self.self_attn_layer_norm = nn.LayerNorm(D)
        self.fc1 = nn.Linear(D, cfg.encoder_ffn_embed_dim)
        self.fc2 = nn.Linear(cfg.encoder_ffn_embed_dim, D)
        self.final_layer_norm = nn.LayerNorm(D)
        self.pre_norm = cfg.layer_norm_first
        self.alpha = math.pow(2 * cfg.encoder_layers, 0.25) if cfg.deep_norm else 1.0
        self.dropout, self.act_dropout = cfg.dropout, cfg.activation_dropout
        self.relu = cfg.activation_fn == "relu"

    def _ffn(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        h = F.relu(h) if self.relu else F.gelu(h.float()).type_as(h)
        h = F.dropout(h, self.act_dropout, self.training)
        return F.dropout(self.fc2(h), self.dropout, self.training)

    def forward(
        self, x: torch.Tensor, padding_mask: torch.Tensor | None, position_bias: torch.Tensor | None
    ) -> torch.Tensor:
        """(B, N, D) → (B, N, D)."""
        if self.pre_norm:
            x = x + F.dropout(
                self.self_attn(self.self_attn_layer_norm(x), padding_mask, position_bias),
                self.dropout,
                self.training,
            )
            return x + self._ffn(self.final_layer_norm(x))
        h = F.dropout(self.self_attn(x, padding_mask, position_bias), self.dropout, self.training)
        x = self.self_attn_layer_norm(x * self.alpha + h)
        return self.final_layer_norm(x * self.alpha + self._ffn(x))


class BEATsTransformer(nn.Module):
    """The encoder: conv positions, LayerNorm, layers (the bias table is layer 0's, shared by all)."""

    def __init__(self, cfg: BEATsConfig) -> None:
        super().__init__()
        D = cfg.encoder_embed_dim
        self.cfg = cfg
        self.pos_conv = ConvPositionEmbedding(D, cfg.conv_pos, cfg.conv_pos_groups)
        rel = cfg.relative_position_embedding
        self.layers = nn.ModuleList(
            BEATsLayer(cfg, with_bias_table=rel and i == 0) for i in range(cfg.encoder_layers)
        )
        if rel:  # one table, reachable under every layer's name (as the released state dicts list it)
            for layer in self.layers[1:]:
                layer.self_attn.relative_attention_bias = self.layers[0].self_attn.relative_attention_bias
        self.layer_norm = nn.LayerNorm(D)
        self.grad_checkpointing = False

    def position_bias(self, n: int) -> torch.Tensor | None:
        """(H, N, N) relative position bias from layer 0's table (None without relative positions)."""
        if not self.cfg.relative_position_embedding:
            return None
        table = self.layers[0].self_attn.relative_attention_bias
        buckets = relative_position_bucket(n, n, self.cfg.num_buckets, self.cfg.max_distance)
        return table(buckets.to(table.weight.device)).permute(2, 0, 1)  # (H, N, N)

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, N, D) → (B, N, D); ``padding_mask`` (B, N) True at padded patches."""
        if padding_mask is not None:
            x = x.masked_fill(padding_mask.unsqueeze(-1), 0.0)
        x = x + self.pos_conv(x)
        if not self.cfg.layer_norm_first:
            x = self.layer_norm(x)
        x = F.dropout(x, self.cfg.dropout, self.training)
        bias = self.position_bias(x.shape[1])
        ratio = self.cfg.layer_wise_gradient_decay_ratio
        for layer in self.layers:
            if ratio != 1.0:
                x = _GradMultiply.apply(x, ratio)
            if self.training and self.cfg.encoder_layerdrop > 0:
                if float(torch.rand(())) < self.cfg.encoder_layerdrop:
                    continue
            if self.grad_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(layer, x, padding_mask, bias, use_reentrant=False)
            else:
                x = layer(x, padding_mask, bias)
        return self.layer_norm(x) if self.cfg.layer_norm_first else x


def reference_patch_padding(frame_padding: torch.Tensor, num_patches: int) -> torch.Tensor:
    """unilm ``forward_padding_mask``: (B, T) → (B, P) by dropping ``T mod P`` trailing entries and
    reshaping to (B, P, T // P); a patch is padding when all of its entries are."""
    B, T = frame_padding.shape
    extra = T % num_patches
    if extra:
        frame_padding = frame_padding[:, :-extra]
    return frame_padding.view(B, num_patches, -1).all(-1)


class BEATsEncoder(nn.Module):
    """The released BEATs model with the mdm audio backbone API.

    ``forward(audio=(B, T, F), audio_padding_mask=(B, T) | None)`` → ``(features (B, P, D), patch padding
    (B, P) | None)``; BEATs has no [CLS] (``has_audio_cls = False``). ``predict`` is the fine-tuned
    AudioSet head; ``extract_features`` is the reference's waveform entry point.

    Args:
        cfg: the architecture.
    """

    has_audio_cls = False
    family = "beats"

    def __init__(self, cfg: BEATsConfig) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.patch_embedding = nn.Conv2d(1, cfg.embed_dim, PATCH, stride=PATCH, bias=cfg.conv_bias)
        self.layer_norm = nn.LayerNorm(cfg.embed_dim)
        self.post_extract_proj = (
            nn.Linear(cfg.embed_dim, cfg.encoder_embed_dim)
            if cfg.embed_dim != cfg.encoder_embed_dim
            else None
        )
        self.encoder = BEATsTransformer(cfg)
        if cfg.finetuned_model:
            self.predictor = nn.Linear(cfg.encoder_embed_dim, cfg.predictor_class)

    @property
    def num_features(self) -> int:
        """Output width D."""
        return self.cfg.encoder_embed_dim

    @property
    def num_layers(self) -> int:
        return self.cfg.encoder_layers

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """The per-head gate scales (besides biases and norms, which the optimizer exempts anyway)."""
        return {n for n, _ in self.named_parameters() if n.endswith("grep_a")}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """timm-style parameter groups: the stem, then one group per layer."""
        return {
            "stem": r"^patch_embedding|^layer_norm|^post_extract_proj|^encoder\.pos_conv|^encoder\.layer_norm",
            "blocks": r"^encoder\.layers\.(\d+)",
        }

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.encoder.grad_checkpointing = enable

    def patch_padding(self, frame_padding: torch.Tensor, num_patches: int) -> torch.Tensor:
        """(B, T) frame padding → (B, P) patch padding by ``cfg.padding_rule``."""
        if self.cfg.padding_rule == "reference":
            return reference_patch_padding(frame_padding, num_patches)
        return patch_padding_mask(frame_padding, self.cfg.num_mel_bins // PATCH)

    def forward_features(
        self, audio: torch.Tensor, audio_padding_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, T, F) filterbank → ((B, P, D) features, (B, P) patch padding or None)."""
        x = self.patch_embedding(audio.unsqueeze(1))  # (B, E, T/16, F/16)
        x = x.flatten(2).transpose(1, 2)  # (B, P, E), time-major
        x = self.layer_norm(x)
        pad = None if audio_padding_mask is None else self.patch_padding(audio_padding_mask, x.shape[1])
        if self.post_extract_proj is not None:
            x = self.post_extract_proj(x)  # (B, P, D)
        x = F.dropout(x, self.cfg.dropout_input, self.training)
        return self.encoder(x, pad), pad

    def forward(
        self, audio: torch.Tensor, audio_padding_mask: torch.Tensor | None = None, **unused: Any
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """:meth:`forward_features` (other modalities' keyword arguments must be None)."""
        given = [k for k, v in unused.items() if v is not None]
        if given:
            raise ValueError(f"BEATs is an audio-only encoder; got {given}")
        return self.forward_features(audio, audio_padding_mask)

    def predict(self, audio: torch.Tensor, audio_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Fine-tuned models: (B, C) class probabilities (per-patch logits averaged over real patches)."""
        if not self.cfg.finetuned_model:
            raise ValueError("this BEATs model has no predictor (cfg.finetuned_model is False)")
        x, pad = self.forward_features(audio, audio_padding_mask)
        logits = self.predictor(F.dropout(x, self.cfg.predictor_dropout, self.training))  # (B, P, C)
        if pad is not None and pad.any():
            keep = (~pad).unsqueeze(-1).to(logits.dtype)  # (B, P, 1)
            logits = (logits * keep).sum(1) / keep.sum(1)
        else:
            logits = logits.mean(1)
        return torch.sigmoid(logits)

    def extract_features(
        self,
        source: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
        fbank_mean: float = 15.41663,
        fbank_std: float = 6.55582,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The reference entry point: (B, N) 16 kHz waveforms and (B, N) sample padding → features
        (or probabilities for fine-tuned models) and the patch padding mask."""
        from mdm.data.audio import AudioFrontendConfig, compute_fbank

        fe = AudioFrontendConfig(
            style="beats", num_mel_bins=self.cfg.num_mel_bins, mean=fbank_mean, std=fbank_std
        )
        fbank = torch.stack([compute_fbank(w, fe.sample_rate, fe) for w in source])  # (B, T, F)
        frames = None if padding_mask is None else reference_patch_padding(padding_mask, fbank.shape[1])
        if not self.cfg.finetuned_model:
            return self.forward_features(fbank, frames)
        P = (fbank.shape[1] // PATCH) * (fbank.shape[2] // PATCH)
        return self.predict(fbank, frames), None if frames is None else self.patch_padding(frames, P)


def build_beats(cfg: BEATsConfig) -> BEATsEncoder:
    """A freshly initialised BEATs encoder (:func:`init_beats_weights`)."""
    model = BEATsEncoder(cfg)
    init_beats_weights(model)
    return model


def init_beats_weights(model: BEATsEncoder) -> None:
    """The reference initialisation of a fresh model (BERT normal 0.02 for Linear/Embedding, DeepNorm
    Xavier gains) — for training from scratch; imports overwrite every tensor."""
    cfg = model.cfg
    for m in model.encoder.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
    if cfg.deep_norm:
        beta = math.pow(8 * cfg.encoder_layers, -0.25)
        for layer in model.encoder.layers:
            a = layer.self_attn
            for w, gain in ((a.k_proj, 1.0), (a.v_proj, beta), (a.q_proj, 1.0), (a.out_proj, beta)):
                nn.init.xavier_normal_(w.weight, gain=gain)
            nn.init.xavier_normal_(layer.fc1.weight, gain=beta)
            nn.init.xavier_normal_(layer.fc2.weight, gain=beta)


def load_beats(
    model_dir: Any, map_location: Any = "cpu", strict: bool = True, **overrides: Any
) -> BEATsEncoder:
    """A BEATs model directory (``mdm import beats``) → :class:`BEATsEncoder` (via ``mdm.from_pretrained``).

    ``overrides`` change :class:`BEATsConfig` fields that do not affect weights (dropouts,
    ``padding_rule``, ``layer_wise_gradient_decay_ratio``).
    """
    from pathlib import Path

    from safetensors.torch import load_file

    from mdm.models.io import WEIGHTS, read_meta

    meta = read_meta(model_dir)
    cfg = beats_config_from_meta(meta, str(Path(model_dir) / "config.json"))
    for k, v in overrides.items():
        if not hasattr(cfg, k):
            raise TypeError(f"unknown BEATsConfig field {k!r}")
        setattr(cfg, k, v)
    weights = Path(model_dir) / WEIGHTS
    if not weights.exists():
        raise FileNotFoundError(f"{model_dir}: missing {WEIGHTS}")
    sd = load_file(str(weights), device=str(map_location))
    with torch.device("meta"):
        model = BEATsEncoder(cfg)
    missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
    if missing or (strict and unexpected):
        raise ValueError(
            f"{weights}: weights do not match the config: missing {missing[:8]}, unexpected {unexpected[:8]}"
        )
    if model.encoder.cfg.relative_position_embedding:  # assign=True replaced the shared table per name
        table = model.encoder.layers[0].self_attn.relative_attention_bias
        for layer in model.encoder.layers[1:]:
            layer.self_attn.relative_attention_bias = table
    return model.to(map_location)


def beats_config_from_meta(meta: dict[str, Any], source: str) -> BEATsConfig:
    """The :class:`BEATsConfig` stored in a model directory's ``config.json``."""
    from mdm.config import from_dict

    if "model" not in meta:
        raise ValueError(f"{source}: missing key 'model'")
    return from_dict(BEATsConfig, meta["model"], source=source, prefix="model.")
