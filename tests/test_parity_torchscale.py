"""Parity of ``beit3_*`` models with torchscale's ``BEiT3`` (the backbone of microsoft/unilm ``beit3``).

A tiny torchscale BEiT3 with random weights (LayerNorms, tokens and the two unused fairseq position rows
included) is written as a unilm checkpoint, converted with the real ``mdm import unilm`` command, loaded
with ``mdm.from_pretrained`` and compared on ``encoder_out``: image only, text with padding, image+text
with padding, a captioning mask and MIM mask tokens. Tolerance 1e-5 (fp32) at non-padding positions.
Inputs with padding are compared on both of mdm's paths: packed real tokens (``unpad``, the default) and
the padded computation (``unpad=False``).
The last test swaps the vision/text experts in the key map and checks that the comparison then fails.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import mdm
import mdm.export.unilm as unilm
from mdm.export.cli import main as import_main

pytestmark = pytest.mark.parity

TOL = 1e-5
VOCAB = 100


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one intra-op thread avoids OpenMP spinning on the shared 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@dataclass(frozen=True)
class Tiny:
    """A tiny torchscale EncoderConfig and how its checkpoint is stored."""

    dim: int
    heads: int
    layers: int
    img: int
    normalize_output: bool
    prefixed: bool  # {"model": {"beit3." + k: v}} (unilm) or a bare state dict without prefix

    @property
    def grid(self) -> int:
        return self.img // 16


CONFIGS = {
    "d64-norm-unilm": Tiny(64, 4, 3, 32, normalize_output=True, prefixed=True),
    "d96-nonorm-bare": Tiny(96, 6, 2, 48, normalize_output=False, prefixed=False),
}


def build_torchscale(c: Tiny, seed: int) -> torch.nn.Module:
    """torchscale BEiT3 (reference notes §1.5) with every parameter randomised."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torchscale.architecture.config import EncoderConfig
        from torchscale.model.BEiT3 import BEiT3

    cfg = EncoderConfig(
        img_size=c.img, patch_size=16, in_chans=3, vocab_size=VOCAB, multiway=True,
        layernorm_embedding=False, normalize_output=c.normalize_output, no_output_layer=True,
        drop_path_rate=0.0, encoder_embed_dim=c.dim, encoder_attention_heads=c.heads,
        encoder_ffn_embed_dim=4 * c.dim, encoder_layers=c.layers,
    )  # fmt: skip
    torch.manual_seed(seed)
    ref = BEiT3(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "layer_norm" in name or "_ln" in name or "layernorm" in name:
                p.copy_((1.0 + 0.3 * noise) if name.endswith("weight") else 0.3 * noise)
            elif name.endswith("bias") or name.endswith("_token"):
                p.copy_(0.3 * noise)
            elif "embed_positions" in name:
                p.copy_(noise)  # rows 0-1 too: a wrong fairseq offset would show
    return ref


@pytest.fixture(scope="module", params=list(CONFIGS), ids=list(CONFIGS))
def pair(request, tmp_path_factory) -> tuple[Tiny, torch.nn.Module, torch.nn.Module]:
    """(config, torchscale model, the mdm model imported from its checkpoint by the real command)."""
    c = CONFIGS[request.param]
    ref = build_torchscale(c, seed=len(request.param))
    sd = {k: v.clone() for k, v in ref.state_dict().items()}
    if c.normalize_output:
        assert "encoder.layer_norm.A.weight" in sd
    else:
        assert not any(k.startswith("encoder.layer_norm") for k in sd)
    tmp = tmp_path_factory.mktemp(request.param)
    ckpt = tmp / "beit3.pth"
    torch.save({"model": {"beit3." + k: v for k, v in sd.items()}} if c.prefixed else sd, ckpt)
    out = tmp / "mdm"
    assert import_main(["unilm", str(ckpt), str(out), "--num-heads", str(c.heads)]) == 0
    model = mdm.from_pretrained(out).eval()
    assert model.cfg.normalize_output == c.normalize_output
    return c, ref, model


def inputs(c: Tiny, seed: int = 0, B: int = 3, T: int = 9) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    pad = torch.zeros(B, T, dtype=torch.bool)
    pad[1, 6:] = True
    pad[2, 3:] = True
    return {
        "image": torch.randn(B, 3, c.img, c.img, generator=g),
        "text": torch.randint(0, VOCAB, (B, T), generator=g),
        "pad": pad,
        "image_mask": torch.rand(B, c.grid**2, generator=g) < 0.5,
    }


def captioning_blocked(n_img: int, T: int) -> torch.Tensor:
    """unilm BEiT3ForCaptioning's mask, nonzero = blocked: image↛text, text→text causal."""
    N = n_img + T
    blocked = torch.zeros(N, N)
    blocked[:n_img, n_img:] = 1
    blocked[n_img:, n_img:] = torch.triu(torch.ones(T, T), diagonal=1)
    return blocked


def max_err(a: torch.Tensor, b: torch.Tensor, keep: torch.Tensor | None = None) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    d = (a - b).abs()
    return (d[keep] if keep is not None else d).max().item()


@pytest.fixture(params=[True, False], ids=["unpad", "padded"])
def unpad(request, pair):
    """Runs a test on mdm's packed path and on its padded path."""
    model = pair[2]
    model.unpad = request.param
    yield request.param
    model.unpad = True


def joint_keep(n_img: int, pad: torch.Tensor) -> torch.Tensor:
    return torch.cat([torch.ones(pad.shape[0], n_img, dtype=torch.bool), ~pad], dim=1)  # (B, N)


@torch.no_grad()
def test_image_only(pair):
    c, ref, model = pair
    x = inputs(c)
    a = ref(visual_tokens=x["image"])["encoder_out"]
    assert max_err(a, model(image=x["image"])) <= TOL


@torch.no_grad()
def test_text_only_with_padding(pair, unpad):
    c, ref, model = pair
    x = inputs(c)
    a = ref(textual_tokens=x["text"], text_padding_position=x["pad"])["encoder_out"]
    b = model(text=x["text"], text_padding_mask=x["pad"])
    assert max_err(a, b, ~x["pad"]) <= TOL


@torch.no_grad()
def test_image_text_with_padding(pair, unpad):
    c, ref, model = pair
    x = inputs(c)
    a = ref(textual_tokens=x["text"], visual_tokens=x["image"], text_padding_position=x["pad"])["encoder_out"]
    b = model(image=x["image"], text=x["text"], text_padding_mask=x["pad"])
    assert max_err(a, b, joint_keep(1 + c.grid**2, x["pad"])) <= TOL


@torch.no_grad()
def test_image_text_captioning_mask(pair, unpad):
    c, ref, model = pair
    x = inputs(c)
    n_img, T = 1 + c.grid**2, x["text"].shape[1]
    blocked = captioning_blocked(n_img, T)
    a = ref(
        textual_tokens=x["text"], visual_tokens=x["image"], text_padding_position=x["pad"], attn_mask=blocked
    )["encoder_out"]
    b = model(image=x["image"], text=x["text"], text_padding_mask=x["pad"], attn_mask=blocked == 0)
    assert max_err(a, b, joint_keep(n_img, x["pad"])) <= TOL
    # the mask matters: without it the outputs differ
    free = model(image=x["image"], text=x["text"], text_padding_mask=x["pad"])
    assert max_err(a, free, joint_keep(n_img, x["pad"])) > 1e-3


@torch.no_grad()
def test_mim_mask_tokens(pair, unpad):
    c, ref, model = pair
    x = inputs(c)
    m = x["image_mask"]
    a = ref(visual_tokens=x["image"], vision_masked_position=m)["encoder_out"]
    assert max_err(a, model(image=x["image"], image_mask=m)) <= TOL
    a = ref(
        textual_tokens=x["text"],
        visual_tokens=x["image"],
        text_padding_position=x["pad"],
        vision_masked_position=m,
    )["encoder_out"]
    b = model(image=x["image"], text=x["text"], text_padding_mask=x["pad"], image_mask=m)
    assert max_err(a, b, joint_keep(1 + c.grid**2, x["pad"])) <= TOL


@torch.no_grad()
def test_swapped_experts_are_detected(pair, tmp_path: Path, monkeypatch):
    """The comparison can fail: importing with vision/text experts swapped gives large errors."""
    c, ref, _ = pair
    monkeypatch.setattr(unilm, "EXPERT", {"A": "text", "B": "vision"})
    ckpt = tmp_path / "ckpt.pth"
    torch.save({k: v.clone() for k, v in ref.state_dict().items()}, ckpt)
    assert import_main(["unilm", str(ckpt), str(tmp_path / "out"), "--num-heads", str(c.heads)]) == 0
    wrong = mdm.from_pretrained(tmp_path / "out").eval()
    x = inputs(c)
    a = ref(visual_tokens=x["image"])["encoder_out"]
    assert max_err(a, wrong(image=x["image"])) > 1e-2
    a = ref(textual_tokens=x["text"], visual_tokens=x["image"], text_padding_position=x["pad"])["encoder_out"]
    b = wrong(image=x["image"], text=x["text"], text_padding_mask=x["pad"])
    assert max_err(a, b, joint_keep(1 + c.grid**2, x["pad"])) > 1e-2
