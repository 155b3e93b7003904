"""BEATs' acoustic tokenizers: the frozen random-projection tokenizer (iteration 1) and the self-distilled
one (iterations ≥ 2, VQ-KD's quantizer on a teacher's features), saved and loaded like the visual ones."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import mdm.tokenizers as T
from mdm.cli import main as mdm_main
from mdm.models import create_model, save_pretrained
from mdm.tokenizers.acoustic import (
    AcousticVQKD,
    AcousticVQKDConfig,
    RandomProjectionConfig,
    RandomProjectionTokenizer,
    spectrogram_patches,
)

ROOT = Path(__file__).resolve().parents[1]


def fbank(B=2, T_=64, seed=0):
    return torch.randn(B, T_, 128, generator=torch.Generator().manual_seed(seed))


def test_random_projection_is_nearest_neighbour_and_patchwise(tmp_path):
    tok = RandomProjectionTokenizer(RandomProjectionConfig(codebook_size=64, code_dim=16, seed=3))
    a = fbank()
    codes = tok.encode(a)
    assert codes.shape == (2, 32) and codes.dtype == torch.long
    # by hand: standardised patches, projected, nearest unit codebook vector in l2 distance
    x = spectrogram_patches(a, 16)
    x = (x - x.mean(-1, keepdim=True)) / (x.std(-1, keepdim=True) + 1e-5)
    z = F.normalize(x @ tok.projection, dim=-1)
    want = torch.cdist(z, tok.codebook[None].expand(2, -1, -1)).argmin(-1)
    assert torch.equal(codes, want)
    # a code depends on its own patch only: changing the first 16 frames changes only time patch 0
    b = a.clone()
    b[:, :16] = torch.randn(2, 16, 128)
    changed = tok.encode(b) != codes
    assert changed[:, :8].any() and not changed[:, 8:].any()
    # frozen and seeded: the same seed gives the same tokenizer, another seed another one
    same = RandomProjectionTokenizer(RandomProjectionConfig(codebook_size=64, code_dim=16, seed=3))
    other = RandomProjectionTokenizer(RandomProjectionConfig(codebook_size=64, code_dim=16, seed=4))
    assert torch.equal(same.encode(a), codes) and not torch.equal(other.encode(a), codes)
    assert not list(tok.parameters())
    tok_id = T.save_tokenizer(tok, tmp_path / "rp")
    back = T.load(tmp_path / "rp")
    assert back.kind == "acoustic_rp" and back.tokenizer_id == tok_id and tok_id.startswith("acoustic_rp-")
    assert torch.equal(back.encode(a), codes)
    with pytest.raises(ValueError, match="128"):
        tok.encode(torch.randn(1, 64, 64))


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = create_model("audiomae_tiny", depth=1, embed_dim=32, ffn_dim=64, num_heads=2, audio_frames=64)
    return save_pretrained(model, tmp_path_factory.mktemp("teacher") / "model")


def small_vqkd(teacher_dim: int = 32, **kw) -> AcousticVQKD:
    cfg = AcousticVQKDConfig(
        audio_frames=64, embed_dim=32, depth=1, num_heads=2, decoder_dim=32, decoder_depth=1, decoder_heads=2,
        codebook_size=16, code_dim=8, teacher_dim=teacher_dim, **kw,
    )  # fmt: skip
    torch.manual_seed(0)
    return AcousticVQKD(cfg)


def test_vqkd_padding_codes_and_loss():
    tok = small_vqkd(kmeans_init=False).eval()
    clip = fbank(1, 32, seed=1)
    batch = torch.cat([torch.cat([clip, torch.zeros(1, 32, 128)], 1), fbank(1, 64, seed=2)])
    pad = torch.zeros(2, 64, dtype=torch.bool)
    pad[0, 32:] = True
    assert torch.equal(tok.encode(batch, pad)[0, :16], tok.encode(clip)[0])
    tok.train()
    target = torch.randn(2, 32, 32)
    out = tok(batch, target, pad, generator=torch.Generator().manual_seed(0))
    assert out["codes"].numel() == 16 + 32  # padded patches neither quantized into the codebook nor scored
    out["loss"].backward()
    assert tok.encoder.audio_embed.proj.weight.grad is not None


def test_train_distilled_tokenizer_from_config_and_eval_cli(tmp_path, teacher_dir, capsys):
    """``mdm tokenizer train --config configs/tokenizer/acoustic_demo_iter2.yaml`` at a tiny size: k-means
    initialisation on the first batch, the cosine to the teacher rises, the directory loads with
    mdm.tokenizers.load, and ``mdm tokenizer eval`` reports held-out usage."""
    out = tmp_path / "tok"
    argv = [
        "tokenizer", "train", "--config", str(ROOT / "configs/tokenizer/acoustic_demo_iter2.yaml"), "--no-progress",
        f"out_dir={out}", f"audio_teacher.model_dir={teacher_dir}", "audio.num_clips=16", "audio.eval_clips=8",
        "audio.demo_duration=1.0", "acoustic_vqkd.audio_frames=64", "acoustic_vqkd.embed_dim=32",
        "acoustic_vqkd.depth=1", "acoustic_vqkd.num_heads=2", "acoustic_vqkd.decoder_dim=32",
        "acoustic_vqkd.decoder_depth=1", "acoustic_vqkd.decoder_heads=2", "acoustic_vqkd.codebook_size=16",
        "acoustic_vqkd.restart_every=5", "optim.steps=12", "optim.batch_size=8", "optim.warmup_steps=2",
        "optim.log_every=4",
    ]  # fmt: skip
    assert mdm_main(argv) == 0
    capsys.readouterr()
    tok = T.load(out)
    assert tok.kind == "acoustic_vqkd" and bool(tok.quantizer.initted) and tok.codebook_size == 16
    meta = json.loads((out / "config.json").read_text())
    assert meta["metrics"]["usage"] > 0.5 and meta["metrics"]["teacher_cosine"] > 0
    assert meta["audio_teacher"]["model_dir"] == str(teacher_dir)
    assert mdm_main(["tokenizer", "eval", "--tokenizer", str(out), "--demo", "4"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert (
        0 < printed["usage"] <= 1
        and printed["tokenizer_id"] == tok.tokenizer_id
        and "teacher_cosine" in printed
    )


def test_random_projection_config_and_held_out_usage(tmp_path, capsys):
    """The shipped iteration-1 config: no training, held-out usage recorded; eval on an audio folder."""
    out = tmp_path / "rp"
    argv = [
        "tokenizer", "train", "--config", str(ROOT / "configs/tokenizer/acoustic_demo_iter1.yaml"), "--no-progress",
        f"out_dir={out}", "audio.eval_clips=16", "audio.demo_duration=1.0",
    ]  # fmt: skip
    assert mdm_main(argv) == 0
    meta = json.loads((out / "config.json").read_text())
    assert meta["kind"] == "acoustic_rp" and meta["metrics"]["usage"] > 0.5
    from mdm.data.demo.sound_writers import write_sound_world

    write_sound_world(tmp_path / "world", clips_per_class=1, seed=0, duration=1.0)
    capsys.readouterr()
    assert (
        mdm_main(["tokenizer", "eval", "--tokenizer", str(out), "--audio", str(tmp_path / "world" / "audio")])
        == 0
    )
    printed = json.loads(capsys.readouterr().out)
    assert printed["num_tokens"] > 0 and printed["tokenizer_id"] == meta["tokenizer_id"]
