"""Unpadded expert compute (``ModelConfig.unpad``, :mod:`mdm.models.layers.packing`).

The same model with packing switched on and off must agree: outputs at every position (the encoder returns
0 at padded positions on both paths), gradients of every parameter and of the image, within 1e-5 in fp32 (relative to a gradient's scale
above 1), with attention batched and per sample. Covered: padding patterns (none, one sample padded down to [bos], ragged, every sample but one padded
down to [bos], holes in the middle), image-only / text-only / joint input, both layouts (``beit3`` multiway
attention with Sub-LN; ``vlmo`` shared attention with a VL-FFN on top), drop path in training (same seed,
same per-sample draw), gradient checkpointing, a captioning mask and ``return_hidden``. The padded path
itself is compared with torchscale in ``tests/test_parity_torchscale.py``. Row-count hooks check that the
experts really see only the real tokens.
"""

from __future__ import annotations

import pytest
import torch

from mdm.models import create_model
from mdm.models.layers import attention
from mdm.models.layers.attention import seq2seq_mask
from mdm.models.layers.packing import Layout, Packing

TOL = 1e-5
B, T, IMG = 4, 9, 32  # 2x2 patches: n_vision = 5


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(params=["batched", "per_sample"])
def attend(request, monkeypatch):
    """Both attention paths of a packed layout: the padded key-masked batch (what tiny models pick) and
    per-sample attention over the real tokens (forced by a zero threshold)."""
    if request.param == "per_sample":
        monkeypatch.setattr(attention, "PER_SAMPLE_WORK", 0)
    return request.param


def tiny(arch: str, **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = {"depth": 2, "embed_dim": 64, "num_heads": 4, "ffn_dim": 128, "img_size": IMG, "vocab_size": 100}
    if arch.startswith("vlmo"):
        cfg["vl_ffn_layers"] = 1  # the top layer has a VL-FFN: joint input uses it
    model = create_model(arch, **{**cfg, **kw})
    with torch.no_grad():  # non-trivial norms and biases, so a wrong row mapping shows
        g = torch.Generator().manual_seed(1)
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.2 * torch.randn(p.shape, generator=g))
    return model


def padding(pattern: str) -> torch.Tensor:
    """(B, T) True at padding; position 0 ([bos]) is always real."""
    pad = torch.zeros(B, T, dtype=torch.bool)
    if pattern == "bos_only":
        pad[1, 1:] = True
    elif pattern == "ragged":
        for b, length in enumerate((9, 3, 6, 1)):
            pad[b, length:] = True
    elif pattern == "all_but_one":
        pad[1:, 1:] = True
    elif pattern == "holes":  # not a tail: the packing must not assume right padding
        pad[0, 2:4] = pad[2, 5] = pad[3, 1::2] = True
    else:
        assert pattern == "none"
    return pad


PATTERNS = ["none", "bos_only", "ragged", "all_but_one", "holes"]


def inputs(modality: str, pattern: str, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    if modality in ("image", "joint"):
        out["image"] = torch.randn(B, 3, IMG, IMG, generator=g).requires_grad_()
    if modality in ("text", "joint"):
        out["text"] = torch.randint(0, 100, (B, T), generator=g)
        out["text_padding_mask"] = padding(pattern)
    return out


def run(model, unpad: bool, x: dict, seed: int = 0, **kw) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Output and gradients (parameters, and ``image`` if given) of ``sum(out * w)`` for a fixed w."""
    model.unpad = unpad
    model.zero_grad(set_to_none=True)
    if "image" in x:
        x["image"].grad = None
    torch.manual_seed(seed)
    out = model(**x, **kw)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(7))
    (out * w).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    if "image" in x:
        grads["<image>"] = x["image"].grad.clone()
    return out.detach(), grads


def assert_same(a: tuple, b: tuple) -> None:
    (out_a, g_a), (out_b, g_b) = a, b
    torch.testing.assert_close(out_a, out_b, rtol=0, atol=TOL)
    assert g_a.keys() == g_b.keys()
    for n in g_a:
        # 1e-5, relative to the gradient's scale where that exceeds 1: weight gradients here reach ~90,
        # where one fp32 ulp is 7.6e-6, and per-sample attention sums in another order than the batch
        atol = TOL * max(1.0, float(g_b[n].abs().max()))
        torch.testing.assert_close(g_a[n], g_b[n], rtol=0, atol=atol, msg=n)


def real_positions(x: dict, out: torch.Tensor) -> torch.Tensor:
    """(B, N) True at non-padding positions."""
    if "text_padding_mask" not in x:
        return torch.ones(out.shape[:2], dtype=torch.bool)
    n_vision = out.shape[1] - T
    return torch.cat([torch.ones(B, n_vision, dtype=torch.bool), ~x["text_padding_mask"]], dim=1)


@pytest.mark.parametrize("arch", ["beit3_tiny", "vlmo_tiny"])
@pytest.mark.parametrize("modality", ["text", "joint"])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_unpadded_equals_padded_forward_and_backward(arch, modality, pattern, attend):
    model = tiny(arch).eval()
    x = inputs(modality, pattern)
    packed, padded = run(model, True, x), run(model, False, x)
    assert_same(packed, padded)
    keep = real_positions(x, packed[0])
    assert torch.all(packed[0][~keep] == 0.0)  # padded positions are 0
    assert packed[0][keep].abs().min() > 0.0
    if pattern == "none":  # no padding: the very same dense computation, bit for bit
        assert torch.equal(packed[0], padded[0])


def test_image_only_is_untouched():
    for arch in ("beit3_tiny", "vlmo_tiny"):
        model = tiny(arch).eval()
        x = inputs("image", "none")
        assert_same(run(model, True, x), run(model, False, x))


def count_rows(model, arch: str) -> dict[str, list[int]]:
    """Forward hooks recording how many rows enter the text FFN / attention experts of layer 0."""
    seen: dict[str, list[int]] = {"ffn": [], "qkv": []}
    layer = model.layers[0]
    qkv = layer.attn.qkv.text if arch.startswith("beit3") else layer.attn.qkv
    hooks = [
        layer.ffn.text.fc1.register_forward_hook(
            lambda m, a, o: seen["ffn"].append(a[0].numel() // a[0].shape[-1])
        ),
        qkv.register_forward_hook(lambda m, a, o: seen["qkv"].append(a[0].numel() // a[0].shape[-1])),
    ]
    return seen, hooks


@pytest.mark.parametrize("arch", ["beit3_tiny", "vlmo_tiny"])
def test_experts_see_only_real_tokens(arch):
    """Would fail if the packing were silently off: the text FFN runs on n_real rows, not B*T."""
    model = tiny(arch).eval()
    x = inputs("text", "ragged")
    n_real = int((~x["text_padding_mask"]).sum())
    for unpad, rows in ((True, n_real), (False, B * T)):
        model.unpad = unpad
        seen, hooks = count_rows(model, arch)
        with torch.no_grad():
            model(**x)
        for h in hooks:
            h.remove()
        assert seen["ffn"] == [rows] and seen["qkv"] == [rows], (unpad, seen)
    # no padding: nothing is packed, every layer sees the dense (B, T, D) part
    x = inputs("text", "none")
    layout = Layout.build(["text"], [T], B, [x["text_padding_mask"]], unpad=True)
    assert not layout.packed and layout.rows == () and layout.key_keep() is None


@pytest.mark.parametrize("arch", ["beit3_tiny", "vlmo_tiny"])
def test_drop_path_same_seed_same_per_sample_draw(arch, attend):
    model = tiny(arch, drop_path_rate=0.5).train()
    x = inputs("joint", "ragged")
    packed, padded = run(model, True, x, seed=3), run(model, False, x, seed=3)
    assert_same(packed, padded)
    no_drop = run(tiny(arch).train(), True, x, seed=3)
    assert not torch.allclose(packed[0], no_drop[0])  # drop path did act


@pytest.mark.parametrize("arch", ["beit3_tiny", "vlmo_tiny"])
def test_grad_checkpointing_with_packing(arch, attend):
    model = tiny(arch).train()
    x = inputs("joint", "ragged")
    ref = run(model, False, x)
    model.set_grad_checkpointing(True)
    assert_same(run(model, True, x), ref)


@pytest.mark.parametrize("arch", ["beit3_tiny", "vlmo_tiny"])
@pytest.mark.parametrize("pattern", ["ragged", "all_but_one"])
def test_captioning_mask(arch, pattern, attend):
    """The seq2seq mask of caption decoding: image ↛ text, text causal over itself, text → image."""
    model = tiny(arch).eval()
    x = inputs("joint", pattern)
    n_img = 1 + (IMG // 16) ** 2
    N = n_img + T
    allowed = seq2seq_mask(n_img, T)
    # the library mask is the hand-written one: image ↛ text, text → image, text causal incl. itself
    assert allowed.shape == (N, N) and allowed[:n_img, :n_img].all() and not allowed[:n_img, n_img:].any()
    assert allowed[n_img:, :n_img].all()
    assert torch.equal(allowed[n_img:, n_img:], torch.ones(T, T, dtype=torch.bool).tril())
    packed = run(model, True, x, attn_mask=allowed)
    assert_same(packed, run(model, False, x, attn_mask=allowed))
    assert not torch.allclose(packed[0], run(model, True, x)[0], atol=1e-3)  # the mask mattered
    # text alone with a causal mask, and a per-sample (B, N, N) mask
    xt = inputs("text", pattern)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    assert_same(run(model, True, xt, attn_mask=causal), run(model, False, xt, attn_mask=causal))
    per_sample = torch.stack([allowed, torch.ones(N, N, dtype=torch.bool)] * (B // 2))
    assert_same(run(model, True, x, attn_mask=per_sample), run(model, False, x, attn_mask=per_sample))


@pytest.mark.parametrize("arch", ["beit3_tiny", "vlmo_tiny"])
def test_per_sample_attention_is_taken(arch, monkeypatch):
    """Per sample: one unmasked kernel per sample and layer over its real tokens; a captioning mask keeps
    the batched masked call (one per layer)."""
    model = tiny(arch).eval()
    x = inputs("joint", "ragged")
    calls = []
    sdpa = attention.F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, dropout_p=0.0):
        calls.append((tuple(q.shape), attn_mask is None))
        return sdpa(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)

    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", spy)
    monkeypatch.setattr(attention, "PER_SAMPLE_WORK", 0)
    n_img, H = 1 + (IMG // 16) ** 2, 4
    with torch.no_grad():
        model(**x)
    lengths = [n_img + n for n in (9, 3, 6, 1)] * 2  # two layers
    assert calls == [((H, n, 16), True) for n in lengths]
    calls.clear()
    with torch.no_grad():
        model(**x, attn_mask=torch.ones(n_img + T, n_img + T, dtype=torch.bool))
    assert calls == [((B, H, n_img + T, 16), False)] * 2


def test_per_sample_rule():
    """CPU: per sample for a base-width text batch with much padding; batched for image-caption pairs
    (little padding relative to 197 patches) and for the demo's tiny width."""

    def pays(dim: int, text: list[int], n_vision: int = 0) -> bool:
        pad = torch.arange(max(text)).expand(len(text), -1) >= torch.tensor(text).unsqueeze(1)
        kinds, lengths, padding = ["text"], [max(text)], [pad]
        if n_vision:
            kinds, lengths, padding = ["vision", *kinds], [n_vision, *lengths], [None, *padding]
        layout = Layout.build(kinds, lengths, len(text), padding, unpad=True)
        return attention.per_sample_pays(torch.zeros(1, dim), layout)

    assert pays(768, [28, 33, 52, 30, 86, 11, 39, 14])
    assert not pays(768, [11, 16, 11, 10, 13, 14, 14, 14], n_vision=197)
    assert not pays(128, [32, 17, 29, 18, 6, 13, 21, 20] * 4)
    assert not pays(768, [86, 86, 86, 85])  # almost nothing to skip


@pytest.mark.parametrize("arch", ["beit3_tiny", "vlmo_tiny"])
def test_return_hidden(arch):
    model = tiny(arch).eval()
    x = inputs("joint", "ragged")
    outs = {}
    for unpad in (True, False):
        model.unpad = unpad
        with torch.no_grad():
            outs[unpad] = model.forward_features(**x, return_hidden=True)
    (a, ha), (b, hb) = outs[True], outs[False]
    torch.testing.assert_close(a, b, rtol=0, atol=TOL)
    assert len(ha) == len(hb) == model.num_layers
    keep = real_positions(x, a)
    for h1, h2 in zip(ha, hb):
        torch.testing.assert_close(h1, h2, rtol=0, atol=TOL)
        assert h1.shape == a.shape and torch.all(h1[~keep] == 0.0)


def test_packing_round_trip_and_indices():
    pad = padding("holes")
    p = Packing.from_padding_mask(pad)
    assert p.n_real == int((~pad).sum()) and p.batch == B and p.length == T
    x = torch.randn(B, T, 3)
    packed = p.pack(x)  # row-major over (b, t)
    torch.testing.assert_close(packed, x[~pad])
    torch.testing.assert_close(p.unpack(packed), x.masked_fill(pad.unsqueeze(-1), 0.0))
    assert torch.equal(p.sample, (~pad).nonzero()[:, 0]) and torch.equal(p.positions, (~pad).nonzero()[:, 1])
    # a layout of a dense and a packed part: scatter/gather are inverse, rows index the joint sequence
    layout = Layout.build(["vision", "text"], [2, T], B, [None, pad], unpad=True)
    parts = [torch.randn(B, 2, 3), packed]
    joint = layout.scatter(parts)  # (B, 2 + T, 3)
    torch.testing.assert_close(joint, torch.cat([parts[0], x.masked_fill(pad.unsqueeze(-1), 0.0)], 1))
    back = layout.gather(joint)
    torch.testing.assert_close(back[0], parts[0])
    torch.testing.assert_close(back[1], packed)


@pytest.mark.parametrize("arch", ["beit3_tiny", "vlmo_tiny"])
def test_same_module_calls_and_gradient_order_with_and_without_padding(arch):
    """ZeRO-3 turns every module call into a parameter all-gather and reduces gradients in the order they
    become ready, so ranks whose batches differ only in padding must call the same modules and produce
    gradients in the same order (a difference aborted a 2-rank ZeRO-3 run with a collective mismatch)."""
    model = tiny(arch).train()
    calls, ready = [], []
    for n, m in model.named_modules():
        m.register_forward_pre_hook(lambda m, a, n=n: calls.append(n))
    for n, p in model.named_parameters():
        p.register_post_accumulate_grad_hook(lambda p, n=n: ready.append(n))
    traces = {}
    for pattern in ("none", "ragged"):
        calls.clear(), ready.clear()
        for modality in ("text", "joint"):
            model(**inputs(modality, pattern)).square().mean().backward()
        traces[pattern] = (list(calls), list(ready))
    assert traces["none"][0] == traces["ragged"][0]
    assert traces["none"][1] == traces["ragged"][1] and len(traces["none"][1]) > 10
