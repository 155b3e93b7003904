"""Test-only re-statement of the released BEATs code paths (microsoft/unilm ``beats/BEATs.py``,
``backbone.py``, ``modules.py``), written from the reference's facts in its own layout: time-first
(T, B, C) tensors, (B·H)-batched ``bmm`` attention with the query pre-scaled by ``1/(√d · 32)`` and the
``(w - max) · 32`` stabilisation, the relative bias added after the padding fill, ``nn.utils.weight_norm``
for the position conv, ``logits[padding_mask] = 0`` for the predictor. Module names are the release's,
so ``state_dict()`` is the layout of a released ``{"cfg", "model"}`` file. Never imported by mdm.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
import torchaudio.compliance.kaldi as ta_kaldi
from torch import nn

DEFAULTS = dict(
    input_patch_size=16,
    embed_dim=512,
    conv_bias=False,
    encoder_layers=12,
    encoder_embed_dim=768,
    encoder_ffn_embed_dim=3072,
    encoder_attention_heads=12,
    activation_fn="gelu",
    layer_wise_gradient_decay_ratio=1.0,
    layer_norm_first=False,
    deep_norm=False,
    dropout=0.1,
    attention_dropout=0.1,
    activation_dropout=0.0,
    encoder_layerdrop=0.0,
    dropout_input=0.0,
    conv_pos=128,
    conv_pos_groups=16,
    relative_position_embedding=False,
    num_buckets=320,
    max_distance=1280,
    gru_rel_pos=False,
    finetuned_model=False,
    predictor_dropout=0.1,
    predictor_class=527,
)


class Cfg:
    def __init__(self, cfg: dict):
        self.__dict__.update(DEFAULTS)
        self.__dict__.update(cfg)


class RefSamePad(nn.Module):
    def __init__(self, kernel_size):
        super().__init__()
        self.remove = 1 if kernel_size % 2 == 0 else 0

    def forward(self, x):
        return x[:, :, : -self.remove] if self.remove > 0 else x


class RefMultiheadAttention(nn.Module):
    def __init__(self, c: Cfg, has_bias: bool):
        super().__init__()
        self.embed_dim, self.num_heads = c.encoder_embed_dim, c.encoder_attention_heads
        self.head_dim = self.embed_dim // self.num_heads
        self.scaling = self.head_dim**-0.5
        self.num_buckets, self.max_distance = c.num_buckets, c.max_distance
        self.has_relative_attention_bias = has_bias
        if has_bias:
            self.relative_attention_bias = nn.Embedding(c.num_buckets, self.num_heads)
        self.k_proj = nn.Linear(self.embed_dim, self.embed_dim)
        self.v_proj = nn.Linear(self.embed_dim, self.embed_dim)
        self.q_proj = nn.Linear(self.embed_dim, self.embed_dim)
        self.out_proj = nn.Linear(self.embed_dim, self.embed_dim)
        self.gru_rel_pos = c.gru_rel_pos
        if self.gru_rel_pos:
            self.grep_linear = nn.Linear(self.head_dim, 8)
            self.grep_a = nn.Parameter(torch.ones(1, self.num_heads, 1, 1))

    def _bucket(self, relative_positions):
        num_buckets = self.num_buckets // 2
        buckets = (relative_positions > 0).to(torch.long) * num_buckets
        relative_positions = torch.abs(relative_positions)
        max_exact = num_buckets // 2
        is_small = relative_positions < max_exact
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            large = max_exact + (
                torch.log(relative_positions.float() / max_exact)
                / math.log(self.max_distance / max_exact)
                * (num_buckets - max_exact)
            ).to(torch.long)
        large = torch.min(large, torch.full_like(large, num_buckets - 1))
        return buckets + torch.where(is_small, relative_positions, large)

    def compute_bias(self, q_len, k_len):
        ctx = torch.arange(q_len, dtype=torch.long)[:, None]
        mem = torch.arange(k_len, dtype=torch.long)[None, :]
        values = self.relative_attention_bias(self._bucket(mem - ctx))
        return values.permute([2, 0, 1])

    def forward(self, query, key_padding_mask=None, position_bias=None):
        tgt_len, bsz, embed_dim = query.size()
        if self.has_relative_attention_bias and position_bias is None:
            position_bias = self.compute_bias(tgt_len, tgt_len)
            position_bias = (
                position_bias.unsqueeze(0).repeat(bsz, 1, 1, 1).view(bsz * self.num_heads, tgt_len, tgt_len)
            )
        q, k, v = self.q_proj(query), self.k_proj(query), self.v_proj(query)
        q = q * self.scaling
        alpha = 32
        q = q * (1 / alpha)
        q = q.contiguous().view(tgt_len, bsz * self.num_heads, self.head_dim).transpose(0, 1)
        k = k.contiguous().view(-1, bsz * self.num_heads, self.head_dim).transpose(0, 1)
        v = v.contiguous().view(-1, bsz * self.num_heads, self.head_dim).transpose(0, 1)
        w = torch.bmm(q, k.transpose(1, 2))
        w = (w - w.max(dim=-1, keepdim=True)[0]) * alpha
        if key_padding_mask is not None:
            w = w.view(bsz, self.num_heads, tgt_len, tgt_len)
            w = w.masked_fill(key_padding_mask.unsqueeze(1).unsqueeze(2).to(torch.bool), float("-inf"))
            w = w.view(bsz * self.num_heads, tgt_len, tgt_len)
        if position_bias is not None:
            rel = position_bias
            if self.gru_rel_pos:
                ql = q.view(bsz, self.num_heads, tgt_len, self.head_dim) * alpha / self.scaling
                _B, _H, _L, __ = ql.size()
                gate_a, gate_b = torch.sigmoid(self.grep_linear(ql).view(_B, _H, _L, 2, 4).sum(-1)).chunk(
                    2, dim=-1
                )
                gate_a_1 = gate_a * (gate_b * self.grep_a - 1.0) + 2.0
                rel = gate_a_1.view(bsz * self.num_heads, tgt_len, 1) * position_bias
            w = w + rel.view(w.size())
        p = F.softmax(w, dim=-1)
        attn = torch.bmm(p, v).transpose(0, 1).contiguous().view(tgt_len, bsz, embed_dim)
        return self.out_proj(attn), position_bias


class RefLayer(nn.Module):
    def __init__(self, c: Cfg, has_bias: bool):
        super().__init__()
        self.self_attn = RefMultiheadAttention(c, has_bias)
        self.self_attn_layer_norm = nn.LayerNorm(c.encoder_embed_dim)
        self.fc1 = nn.Linear(c.encoder_embed_dim, c.encoder_ffn_embed_dim)
        self.fc2 = nn.Linear(c.encoder_ffn_embed_dim, c.encoder_embed_dim)
        self.final_layer_norm = nn.LayerNorm(c.encoder_embed_dim)
        self.layer_norm_first = c.layer_norm_first
        self.alpha = math.pow(2 * c.encoder_layers, 1 / 4) if c.deep_norm else 1
        self.act = (lambda x: F.gelu(x.float()).type_as(x)) if c.activation_fn == "gelu" else F.relu

    def forward(self, x, padding_mask, pos_bias):
        residual = x
        if self.layer_norm_first:
            x = self.self_attn_layer_norm(x)
            x, pos_bias = self.self_attn(x, padding_mask, pos_bias)
            x = residual + x
            residual = x
            x = self.fc2(self.act(self.fc1(self.final_layer_norm(x))))
            return residual + x, pos_bias
        x, pos_bias = self.self_attn(x, padding_mask, pos_bias)
        x = self.self_attn_layer_norm(residual * self.alpha + x)
        residual = x
        x = self.fc2(self.act(self.fc1(x)))
        return self.final_layer_norm(residual * self.alpha + x), pos_bias


class RefEncoder(nn.Module):
    def __init__(self, c: Cfg):
        super().__init__()
        D = c.encoder_embed_dim
        conv = nn.Conv1d(D, D, kernel_size=c.conv_pos, padding=c.conv_pos // 2, groups=c.conv_pos_groups)
        nn.init.normal_(conv.weight, mean=0, std=math.sqrt(4 / (c.conv_pos * D)))
        nn.init.normal_(conv.bias, std=0.1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            conv = nn.utils.weight_norm(conv, name="weight", dim=2)
        self.pos_conv = nn.Sequential(conv, RefSamePad(c.conv_pos), nn.GELU())
        rel = c.relative_position_embedding
        self.layers = nn.ModuleList([RefLayer(c, rel) for _ in range(c.encoder_layers)])
        if rel:
            for i in range(1, c.encoder_layers):
                del self.layers[i].self_attn.relative_attention_bias
                self.layers[i].self_attn.relative_attention_bias = self.layers[
                    0
                ].self_attn.relative_attention_bias
        self.layer_norm_first = c.layer_norm_first
        self.layer_norm = nn.LayerNorm(D)

    def forward(self, x, padding_mask=None):
        if padding_mask is not None:
            x[padding_mask] = 0
        x_conv = self.pos_conv(x.transpose(1, 2)).transpose(1, 2)
        x = x + x_conv
        if not self.layer_norm_first:
            x = self.layer_norm(x)
        x = x.transpose(0, 1)  # B x T x C -> T x B x C
        pos_bias = None
        for layer in self.layers:
            x, pos_bias = layer(x, padding_mask, pos_bias)
        x = x.transpose(0, 1)
        return self.layer_norm(x) if self.layer_norm_first else x


class RefBEATs(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        c = self.c = Cfg(cfg)
        self.post_extract_proj = (
            nn.Linear(c.embed_dim, c.encoder_embed_dim) if c.embed_dim != c.encoder_embed_dim else None
        )
        self.patch_embedding = nn.Conv2d(
            1, c.embed_dim, kernel_size=c.input_patch_size, stride=c.input_patch_size, bias=c.conv_bias
        )
        self.encoder = RefEncoder(c)
        self.layer_norm = nn.LayerNorm(c.embed_dim)
        if c.finetuned_model:
            self.predictor = nn.Linear(c.encoder_embed_dim, c.predictor_class)
        else:
            self.predictor = None

    @staticmethod
    def forward_padding_mask(features, padding_mask):
        extra = padding_mask.size(1) % features.size(1)
        if extra > 0:
            padding_mask = padding_mask[:, :-extra]
        return padding_mask.view(padding_mask.size(0), features.size(1), -1).all(-1)

    @staticmethod
    def preprocess(source, fbank_mean=15.41663, fbank_std=6.55582, num_mel_bins=128):
        fbanks = []
        for waveform in source:
            waveform = waveform.unsqueeze(0) * 2**15
            fbanks.append(
                ta_kaldi.fbank(
                    waveform,
                    num_mel_bins=num_mel_bins,
                    sample_frequency=16000,
                    frame_length=25,
                    frame_shift=10,
                )
            )
        return (torch.stack(fbanks, dim=0) - fbank_mean) / (2 * fbank_std)

    def extract_features(self, source, padding_mask=None, num_mel_bins=128):
        fbank = self.preprocess(source, num_mel_bins=num_mel_bins)
        if padding_mask is not None:
            padding_mask = self.forward_padding_mask(fbank, padding_mask)
        features = self.patch_embedding(fbank.unsqueeze(1))
        features = features.reshape(features.shape[0], features.shape[1], -1).transpose(1, 2)
        features = self.layer_norm(features)
        if padding_mask is not None:
            padding_mask = self.forward_padding_mask(features, padding_mask)
        if self.post_extract_proj is not None:
            features = self.post_extract_proj(features)
        x = self.encoder(features, padding_mask=padding_mask)
        if self.predictor is None:
            return x, padding_mask
        logits = self.predictor(x)
        if padding_mask is not None and padding_mask.any():
            logits[padding_mask] = 0
            logits = logits.sum(dim=1)
            logits = logits / (~padding_mask).sum(dim=1).unsqueeze(-1).expand_as(logits)
        else:
            logits = logits.mean(dim=1)
        return torch.sigmoid(logits), padding_mask
