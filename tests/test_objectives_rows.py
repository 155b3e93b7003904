"""Loss only where it counts: the vocabulary-sized heads see the masked rows only, ITC's projections see
[CLS]/[bos] only, and the text experts of the backbone see the real (non-padding) tokens only.

Forward hooks count the rows entering each head; a head applied to every position (VLMo's MLM head
scores all text positions and ignores the unmasked ones) would give B·T rows and fail.
"""

from __future__ import annotations

import pytest
import torch

from mdm.models.config import make_config
from mdm.objectives import ObjectivesConfig, build_pretrain_model

V, B, P, T = 64, 3, 16, 10  # vlmo_tiny: 64 px / 16 → 4x4 patches


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def batches() -> dict[str, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    image_mask = torch.rand(B, P, generator=g) < 0.4
    image_mask[:, 0] = True
    text = torch.randint(4, 1024, (B, T), generator=g)
    pad = torch.zeros(B, T, dtype=torch.bool)
    pad[0, 4:], pad[1, 8:] = True, True
    text_mask = torch.rand(B, T, generator=g) < 0.4
    text_mask[:, 1] = True
    text_mask[0, 6] = True  # a masked position under padding: must not be predicted
    img = dict(
        image=torch.randn(B, 3, 64, 64, generator=g),
        image_mask=image_mask,
        image_tokens=torch.randint(0, V, (B, P), generator=g),
    )
    txt = dict(
        text=text, text_input=text.masked_fill(text_mask, 3), text_mask=text_mask, text_padding_mask=pad
    )
    return {"image": img, "text": txt, "pair": {**img, **txt}}


def rows_of(module: torch.nn.Module, log: list[int]):
    return module.register_forward_hook(lambda m, a, o: log.append(a[0].numel() // a[0].shape[-1]))


@pytest.mark.parametrize("arch", ["vlmo_tiny", "beit3_tiny"])
def test_heads_see_masked_rows_only(arch):
    torch.manual_seed(0)
    cfg = make_config(arch, depth=2)
    model = build_pretrain_model(
        cfg, ObjectivesConfig(objectives=["mim", "mlm", "mvlm", "itc"], codebook_size=V)
    )
    b = batches()
    seen: dict[str, list[int]] = {"mim": [], "mlm": [], "itc_v": [], "itc_t": [], "text_ffn": []}
    hooks = [
        rows_of(model.heads["mim"].proj, seen["mim"]),
        rows_of(model.heads["mlm"].dense, seen["mlm"]),
        rows_of(model.heads["itc"].vision_head, seen["itc_v"]),
        rows_of(model.heads["itc"].language_head, seen["itc_t"]),
        rows_of(model.backbone.layers[0].ffn.text.fc1, seen["text_ffn"]),
    ]
    out = model(b)
    for h in hooks:
        h.remove()
    img_masked = int(b["image"]["image_mask"].sum())
    txt_masked = int((b["text"]["text_mask"] & ~b["text"]["text_padding_mask"]).sum())
    real = int((~b["text"]["text_padding_mask"]).sum())
    assert seen["mim"] == [img_masked, img_masked]  # MIM, then MVLM's image side
    assert seen["mlm"] == [txt_masked, txt_masked]  # MLM, then MVLM's text side
    assert seen["itc_v"] == [B] and seen["itc_t"] == [B]
    # the text experts run on real tokens only: in MLM's, MVLM's and ITC's text passes (layer 0 has no VL-FFN)
    assert all(n == real for n in seen["text_ffn"]) and len(seen["text_ffn"]) == 3
    assert out["mlm_count"].item() == txt_masked and out["mvlm_image_count"].item() == img_masked
