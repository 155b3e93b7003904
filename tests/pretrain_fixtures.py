"""A tiny pretraining world for tests: shards of rendered scenes, captions, a text corpus, a SentencePiece
model and a (random, frozen) tiny VQ-KD tokenizer. Built once per test session (see conftest.py)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np

from mdm.data.demo.scenes import make_scenes, render
from mdm.data.shards import WriteReport, from_image_folder, from_jsonl, from_text_files, write_shards


def caption(scene) -> str:
    parts = [
        f"a {o.size} {o.colour} {o.shape} at the {('top', 'middle', 'bottom')[o.row]}" for o in scene.objects
    ]
    return " and ".join(parts)


def colour_codes(img, patch: int = 8) -> np.ndarray:
    """A meaningful stand-in tokenizer: each patch's mean colour quantised to 3 levels per channel (27 codes)."""
    arr = np.asarray(img, dtype=np.float32)  # (H, W, 3)
    g = arr.shape[0] // patch
    means = arr.reshape(g, patch, g, patch, 3).mean(axis=(1, 3))  # (g, g, 3)
    levels = np.clip((means / 256 * 3).astype(np.int64), 0, 2)
    return (levels[..., 0] * 9 + levels[..., 1] * 3 + levels[..., 2]).astype(np.int16)


def _with_codes(samples, images: dict[str, object]):
    for s in samples:
        src = json.loads(s["json"])["source"]
        buf = io.BytesIO()
        np.save(buf, colour_codes(images[Path(src).name]))
        s["tok.npy"] = buf.getvalue()
        yield s


def build_world(root: Path, n_images: int = 96, img_size: int = 32, seed: int = 0) -> dict[str, str]:
    """Writes images, shards and tokenizers under ``root``; returns their paths."""
    from mdm.tokenizers import VQKD, save_tokenizer
    from mdm.tokenizers.config import ViTConfig, VQKDConfig
    from mdm.tokenizers.text import train_sentencepiece

    root.mkdir(parents=True, exist_ok=True)
    scenes = make_scenes(n_images, seed, "test")
    img_dir = root / "images"
    img_dir.mkdir(exist_ok=True)
    lines, images = [], {}
    for i, s in enumerate(scenes):
        images[f"{i:05d}.png"] = render(s, img_size)
        images[f"{i:05d}.png"].save(img_dir / f"{i:05d}.png")
        lines.append(json.dumps({"image": f"images/{i:05d}.png", "text": [caption(s), caption(s).upper()]}))
    (root / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    corpus = [caption(s) for s in make_scenes(300, seed + 1, "text")]
    (root / "corpus.txt").write_text("\n".join(corpus) + "\n")
    for kind, samples in (
        ("image", lambda r: _with_codes(from_image_folder(img_dir, r), images)),
        ("pair", lambda r: _with_codes(from_jsonl(root / "pairs.jsonl", r), images)),
        ("text", lambda r: from_text_files([root / "corpus.txt"], r)),
    ):
        report = WriteReport(kind)
        write_shards(samples(report), root / "shards" / kind, kind, max_count=24, report=report)
    tok = train_sentencepiece(corpus, vocab_size=60)
    save_tokenizer(tok, root / "spm")
    vq = VQKD(
        VQKDConfig(
            img_size=img_size,
            patch_size=16,
            codebook_size=32,
            code_dim=8,
            teacher_dim=16,
            encoder=ViTConfig(embed_dim=32, depth=1, num_heads=2),
            decoder=ViTConfig(embed_dim=32, depth=1, num_heads=2),
        )
    )
    save_tokenizer(vq, root / "vqkd")
    return {
        "root": str(root),
        "spm": str(root / "spm"),
        "vqkd": str(root / "vqkd"),
        "vocab": str(tok.vocab_size),
    }


def pretrain_overrides(world: dict[str, str], out_dir: Path, steps: int = 6) -> list[str]:
    """Overrides for configs/pretrain/test_tiny.yaml pointing at ``world``."""
    r = world["root"]
    return [
        f"data.image.sources=[{{shards: [{r}/shards/image]}}]",
        f"data.pair.sources=[{{shards: [{r}/shards/pair]}}]",
        f"data.text.sources=[{{shards: [{r}/shards/text]}}]",
        f"text_tokenizer={world['spm']}",
        f"visual_tokenizer={world['vqkd']}",
        f"model.vocab_size={world['vocab']}",
        f"train.out_dir={out_dir}",
        f"train.steps={steps}",
    ]


def learning_overrides(world: dict[str, str], out_dir: Path, steps: int) -> list[str]:
    """Overrides for a run on precomputed colour codes (27 of 32 codes used), patch 8 at 32 px."""
    over = [o for o in pretrain_overrides(world, out_dir, steps) if not o.startswith("visual_tokenizer")]
    return over + ["data.precomputed_codes=true", "model.patch_size=8", "visual_tokenizer="]


def add_audio(world: dict[str, str], n_clips: int = 16) -> dict[str, str]:
    """Audio and audio-caption shards of short sound-world clips (0.5–0.95 s: padded batches) and a
    random-projection acoustic tokenizer, beside ``world``; returns ``world`` with their paths."""
    import soundfile

    from mdm.data.demo.sounds import make_clip
    from mdm.data.demo.sounds import render as render_clip
    from mdm.tokenizers import save_tokenizer
    from mdm.tokenizers.acoustic import RandomProjectionConfig, RandomProjectionTokenizer

    root = Path(world["root"])

    def samples(report):
        for i in range(n_clips):
            clip = make_clip(2, i, duration=0.5 + 0.15 * (i % 4))
            buf = io.BytesIO()
            soundfile.write(buf, render_clip(clip), clip.sample_rate, format="WAV", subtype="PCM_16")
            yield {"__key__": f"a{i:04d}", "wav": buf.getvalue(), "txt": clip.caption.encode()}

    for kind in ("audio", "audio_text"):
        write_shards(samples(None), root / "shards" / kind, kind, max_count=8, report=WriteReport(kind))
    tok = RandomProjectionTokenizer(RandomProjectionConfig(codebook_size=16, code_dim=8))
    save_tokenizer(tok, root / "acoustic")
    return {**world, "acoustic": str(root / "acoustic")}


def audio_overrides(world: dict[str, str], out_dir: Path, steps: int = 6) -> list[str]:
    """Overrides for configs/pretrain/test_tiny_audio.yaml: every stream of ``world`` (with audio)."""
    r = world["root"]
    return [
        *pretrain_overrides(world, out_dir, steps),
        f"data.audio.sources=[{{shards: [{r}/shards/audio]}}]",
        f"data.audio_text.sources=[{{shards: [{r}/shards/audio_text]}}]",
        f"audio_tokenizer={world['acoustic']}",
    ]
