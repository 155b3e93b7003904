"""``mdm tokenizer`` end to end on tiny data: train, eval, encode, show; images, shards and teachers."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mdm.config import load_config
from mdm.tokenizers import load
from mdm.tokenizers.cli import main
from mdm.tokenizers.config import TeacherConfig, TokenizerTrainConfig
from mdm.tokenizers.data import ImageReadError, decode_image, iter_shard, to_tensor
from mdm.tokenizers.encode import read_npy
from mdm.tokenizers.teacher import build_teacher, to_grid
from mdm.tokenizers.train import train_tokenizer

ROOT = Path(__file__).resolve().parents[1]
TINY_TEACHER = "{img_size: 32, patch_size: 8, embed_dim: 32, depth: 1, num_heads: 2}"
TINY_VQKD = [
    "vqkd.img_size=32", "vqkd.patch_size=8", "vqkd.codebook_size=64", "vqkd.code_dim=8",
    "vqkd.encoder.embed_dim=32", "vqkd.encoder.depth=1", "vqkd.encoder.num_heads=2",
    "vqkd.decoder.embed_dim=32", "vqkd.decoder.depth=1", "vqkd.decoder.num_heads=2",
    "teacher.name=vit_tiny_patch16_224", f"teacher.kwargs={TINY_TEACHER}", "teacher.img_size=32",
    "data.num_images=64", "data.demo_size=32", "optim.steps=6", "optim.batch_size=8", "optim.lr=1e-3",
    "optim.warmup_steps=2", "optim.eval_images=16", "optim.log_every=3",
]  # fmt: skip


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def vqkd_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tok") / "vqkd"
    cfg = ROOT / "configs/tokenizer/vqkd_demo.yaml"
    assert main(["train", "--config", str(cfg), f"out_dir={out}", *TINY_VQKD, "--no-progress"]) == 0
    return out


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shards")
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8), "RGB")
    members = {
        "000000.jpg": _jpeg(rgb),
        "000000.txt": b"a noisy square",
        "000001.png": _png(rgb.convert("L")),  # grey-scale
        "000002.png": _png(rgb.convert("RGBA")),  # with alpha
        "000003.txt": b"a sample without an image",
        "000004.png": _png(rgb.resize((37, 51))),  # odd size
    }
    _write_tar(root / "train-000000.tar", members)
    (root / "index.json").write_text('{"kind": "pair", "shards": ["train-000000.tar"]}')
    return root


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG")
    return buf.getvalue()


def _write_tar(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_train_writes_a_loadable_tokenizer_with_metrics(vqkd_dir):
    meta = json.loads((vqkd_dir / "config.json").read_text())
    assert meta["kind"] == "vqkd" and meta["tokenizer_id"].startswith("vqkd-")
    assert 0 < meta["metrics"]["usage"] <= 1 and meta["metrics"]["perplexity"] >= 1
    assert (vqkd_dir / "teacher.safetensors").exists()
    tok = load(vqkd_dir)
    assert tok.encode(torch.rand(2, 3, 32, 32)).shape == (2, 4, 4) and tok.codebook_size == 64


def test_eval_reports_usage_perplexity_and_teacher_cosine(vqkd_dir, capsys):
    assert main(["eval", "--tokenizer", str(vqkd_dir), "--demo", "16"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) >= {"usage", "perplexity", "teacher_cosine", "tokenizer_id"}
    counts_bound = min(64, 16 * 16)
    assert 1 / 64 <= out["usage"] <= counts_bound / 64 and -1 <= out["teacher_cosine"] <= 1


def test_encode_adds_codes_beside_each_image(vqkd_dir, shards, tmp_path):
    out = tmp_path / "encoded"
    assert main(["encode", "--tokenizer", str(vqkd_dir), "--shards", str(shards), "--out", str(out)]) == 0
    tok = load(vqkd_dir)
    samples = {s["__key__"]: s for s in iter_shard(out / "train-000000.tar")}
    assert set(samples) == {"000000", "000001", "000002", "000003", "000004"}
    assert "tok.npy" not in samples["000003"] and samples["000000"]["txt"] == b"a noisy square"
    for key in ("000000", "000001", "000002", "000004"):
        ext = "jpg" if key == "000000" else "png"
        codes = read_npy(samples[key]["tok.npy"])
        assert codes.shape == (4, 4) and codes.dtype == np.int16
        img = decode_image(samples[key][ext]).resize((32, 32), Image.Resampling.BICUBIC)
        assert np.array_equal(codes, tok.encode(to_tensor(img)[None])[0].numpy())
    info = json.loads((out / "tokens.json").read_text())
    assert (
        info["tokenizer_id"] == tok.tokenizer_id and info["member"] == "tok.npy" and info["num_samples"] == 4
    )


def test_unreadable_image_in_a_shard_is_named(vqkd_dir, tmp_path, capsys):
    _write_tar(tmp_path / "bad.tar", {"000007.jpg": b"not a jpeg"})
    assert (
        main(["encode", "--tokenizer", str(vqkd_dir), "--shards", str(tmp_path / "bad.tar"), "--in-place"])
        == 2
    )
    err = capsys.readouterr().err
    assert "bad.tar:000007.jpg" in err and "cannot read image" in err


def test_show_writes_one_png(vqkd_dir, tmp_path):
    out = tmp_path / "show.png"
    assert main(["show", "--tokenizer", str(vqkd_dir), "--demo", "4", "--num", "4", "--out", str(out)]) == 0
    img = Image.open(out)
    assert img.width > 4 * 128 and img.height >= 2 * 128  # inputs and code maps (no pixel decoder)


def test_dvae_train_eval_show(tmp_path, capsys):
    out = tmp_path / "dvae"
    tiny = ["dvae.img_size=32", "dvae.vocab_size=512", "dvae.hidden_dim=16", "dvae.decoder_init_dim=16",
            "dvae.decoder_hidden_dim=16", "data.num_images=16", "data.demo_size=32", "optim.steps=3",
            "optim.batch_size=4", "optim.eval_images=4"]  # fmt: skip
    cfg = str(ROOT / "configs/tokenizer/dvae_demo.yaml")
    assert main(["train", "--config", cfg, f"out_dir={out}", *tiny, "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["eval", "--tokenizer", str(out), "--demo", "4"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert 0 <= metrics["mse"] <= 1 and "teacher_cosine" not in metrics
    assert (
        main(["show", "--tokenizer", str(out), "--demo", "2", "--num", "2", "--out", str(tmp_path / "s.png")])
        == 0
    )
    assert Image.open(tmp_path / "s.png").height >= 3 * 128  # inputs, reconstructions, code maps


def test_training_state_is_saved_and_resumed(tmp_path, caplog):
    out = tmp_path / "vqkd"
    args = ["train", "--config", str(ROOT / "configs/tokenizer/vqkd_demo.yaml"), f"out_dir={out}", *TINY_VQKD]
    assert main([*args, "optim.steps=2", "optim.save_every=2", "--no-progress"]) == 0
    state = torch.load(out / "train_state.pt", weights_only=True)
    assert state["step"] == 2
    with caplog.at_level("INFO", logger="mdm.tokenizers.train"):
        assert main([*args, "optim.steps=4", "optim.save_every=2", "--resume", "--no-progress"]) == 0
    assert "resumed from" in caplog.text and "at step 2" in caplog.text
    assert torch.load(out / "train_state.pt", weights_only=True)["step"] == 4


def test_image_files_are_converted_or_named(tmp_path):
    rgb = Image.new("RGB", (9, 7), (10, 200, 30))
    cases = {
        "grey.png": rgb.convert("L"),
        "rgba.png": Image.new("RGBA", (9, 7), (10, 200, 30, 0)),
        "palette.png": rgb.convert("P"),
        "deep.png": Image.fromarray(np.full((7, 9), 40000, dtype=np.uint16)),
    }
    for name, img in cases.items():
        img.save(tmp_path / name)
        out = decode_image(tmp_path / name)
        assert out.mode == "RGB" and out.size == (9, 7), name
    assert decode_image(tmp_path / "rgba.png").getpixel((0, 0)) == (255, 255, 255)  # transparent → white
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8garbage")
    with pytest.raises(ImageReadError, match="broken.jpg"):
        decode_image(tmp_path / "broken.jpg")


def test_train_on_a_folder_of_mixed_images(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for i, mode in enumerate(["RGB", "L", "RGBA", "RGB"]):
        arr = rng.integers(0, 255, (33 + i, 47, 4 if mode == "RGBA" else 3), dtype=np.uint8)
        img = Image.fromarray(arr, "RGBA" if mode == "RGBA" else "RGB").convert(mode)
        img.save(folder / f"{i}.png")
    cfg = load_config(TokenizerTrainConfig, ROOT / "configs/tokenizer/vqkd_demo.yaml",
                      [*TINY_VQKD, f"out_dir={tmp_path / 'out'}", "data.source=folder", f"data.paths=[{folder}]",
                       "optim.steps=2", "optim.eval_images=4", "data.shuffle_buffer=2"])  # fmt: skip
    metrics = train_tokenizer(cfg, progress=False)
    assert metrics["num_tokens"] == 4 * 16
    (folder / "4.png").write_bytes(b"truncated")
    with pytest.raises(ImageReadError, match="4.png"):
        train_tokenizer(cfg, progress=False)


def test_teachers_are_pluggable(tmp_path):
    import timm
    from safetensors.torch import save_file

    from mdm.models import create_model, save_pretrained

    kwargs = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2}
    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, **kwargs)
    save_file(ref.state_dict(), str(tmp_path / "teacher.safetensors"))
    cfg = TeacherConfig(name="vit_tiny_patch16_224", weights=str(tmp_path / "teacher.safetensors"), kwargs=kwargs,
                        img_size=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), seed=123)  # fmt: skip
    x = torch.rand(2, 3, 32, 32)
    feats = build_teacher(cfg)(x, (4, 4))  # weights from the local file, not the seed
    assert torch.allclose(feats, ref.eval().forward_features(x * 2 - 1)[:, 1:].view(2, 4, 4, 32), atol=1e-5)
    assert build_teacher(cfg)(x, (2, 2)).shape == (2, 2, 2, 32)  # resampled to another code grid
    backbone = create_model("vlmo_tiny", depth=1, img_size=32, patch_size=8)
    save_pretrained(backbone, tmp_path / "backbone")
    mdm_teacher = build_teacher(TeacherConfig(kind="mdm", name=str(tmp_path / "backbone")))
    assert mdm_teacher(x, (4, 4)).shape == (2, 4, 4, backbone.cfg.embed_dim)
    fn_teacher = build_teacher(
        TeacherConfig(kind="none", img_size=32), fn=lambda t: t.mean(1, keepdim=True).permute(0, 2, 3, 1)
    )
    assert fn_teacher(x, (8, 8)).shape == (2, 8, 8, 1)
    with pytest.raises(ValueError, match="square"):
        to_grid(torch.zeros(1, 5, 3), (2, 2))


@pytest.mark.slow
def test_demo_vqkd_reaches_90_percent_usage(tmp_path):
    """The acceptance run at reduced size (32 px, 4×4 codes, 128 codes): the demo's quantizer defaults
    (k-means++ init, D²-sampled dead-code restarts) reach ≥ 90 % held-out codebook usage."""
    small = [
        "vqkd.img_size=32", "vqkd.codebook_size=128", "teacher.img_size=32", "data.demo_size=32",
        "teacher.kwargs={img_size: 32, patch_size: 8, embed_dim: 96, depth: 2, num_heads: 3}",
        "data.num_images=1024", "optim.steps=150", "optim.eval_images=512",
    ]  # fmt: skip
    cfg = load_config(
        TokenizerTrainConfig, ROOT / "configs/tokenizer/vqkd_demo.yaml", [f"out_dir={tmp_path}", *small]
    )
    metrics = train_tokenizer(cfg, progress=False)
    assert metrics["usage"] >= 0.9, metrics
