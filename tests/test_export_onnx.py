"""ONNX export: onnxruntime reproduces the PyTorch image and text encoders within 1e-4."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mdm.cli import main as mdm_main
from mdm.models import create_model, save_pretrained

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")


@pytest.mark.parametrize("arch", ["beit3_tiny", "vlmo_tiny"])
def test_onnxruntime_matches_pytorch(tmp_path, arch):
    torch.manual_seed(0)
    model = create_model(arch, depth=2).eval()
    save_pretrained(model, tmp_path / "m")
    assert (
        mdm_main(
            ["export", "--checkpoint", str(tmp_path / "m"), "--format", "onnx", "--out", str(tmp_path / "o")]
        )
        == 0
    )
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1  # the test machine is shared
    image_sess = ort.InferenceSession(str(tmp_path / "o" / "image_encoder.onnx"), opts)
    text_sess = ort.InferenceSession(str(tmp_path / "o" / "text_encoder.onnx"), opts)

    # batch and text length differ from the tracing example (2, 8): the axes are dynamic
    image = torch.randn(3, 3, 64, 64)
    text = torch.randint(0, model.cfg.vocab_size, (3, 13))
    pad = torch.zeros(3, 13, dtype=torch.bool)
    pad[1, 6:] = True
    with torch.no_grad():
        ref_image = model(image=image).numpy()
        ref_text = model(text=text, text_padding_mask=pad).numpy()
        ref_nopad = model(text=text).numpy()
    got_image = image_sess.run(None, {"image": image.numpy()})[0]
    got_text = text_sess.run(None, {"text": text.numpy(), "text_padding_mask": pad.numpy()})[0]
    got_nopad = text_sess.run(
        None, {"text": text.numpy(), "text_padding_mask": np.zeros((3, 13), dtype=bool)}
    )[0]
    assert got_image.shape == (3, 17, 128) and got_text.shape == (3, 13, 128)
    assert np.abs(got_image - ref_image).max() <= 1e-4
    assert np.abs(got_text - ref_text).max() <= 1e-4
    assert np.abs(got_nopad - ref_nopad).max() <= 1e-4
    # padding changes the unpadded tokens of row 1 only if the mask is honoured
    assert np.abs(got_text[1, :6] - got_nopad[1, :6]).max() > 1e-3
