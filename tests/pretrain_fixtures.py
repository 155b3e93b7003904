"""A tiny pretraining world for tests: shards of rendered scenes, captions, a text corpus, a SentencePiece
model and a (random, frozen) tiny VQ-KD tokenizer. Built once per test session (see conftest.py)."""

from __future__ import annotations

import json
import random
from pathlib import Path

from mdm.data.demo.scenes import make_scenes, render
from mdm.data.shards import WriteReport, from_image_folder, from_jsonl, from_text_files, write_shards


def caption(scene) -> str:
    parts = [
        f"a {o.size} {o.colour} {o.shape} at the {('top', 'middle', 'bottom')[o.row]}" for o in scene.objects
    ]
    return " and ".join(parts)


def build_world(root: Path, n_images: int = 96, img_size: int = 32, seed: int = 0) -> dict[str, str]:
    """Writes images, shards and tokenizers under ``root``; returns their paths."""
    from mdm.tokenizers import VQKD, save_tokenizer
    from mdm.tokenizers.config import ViTConfig, VQKDConfig
    from mdm.tokenizers.text import train_sentencepiece

    root.mkdir(parents=True, exist_ok=True)
    scenes = make_scenes(n_images, seed, "test")
    img_dir = root / "images"
    img_dir.mkdir(exist_ok=True)
    lines = []
    for i, s in enumerate(scenes):
        render(s, img_size).save(img_dir / f"{i:05d}.png")
        lines.append(json.dumps({"image": f"images/{i:05d}.png", "text": [caption(s), caption(s).upper()]}))
    (root / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    corpus = [caption(s) for s in make_scenes(300, seed + 1, "text")]
    (root / "corpus.txt").write_text("\n".join(corpus) + "\n")
    for kind, samples in (
        ("image", lambda r: from_image_folder(img_dir, r)),
        ("pair", lambda r: from_jsonl(root / "pairs.jsonl", r)),
        ("text", lambda r: from_text_files([root / "corpus.txt"], r)),
    ):
        report = WriteReport(kind)
        write_shards(samples(report), root / "shards" / kind, kind, max_count=24, report=report)
    tok = train_sentencepiece(corpus, vocab_size=60)
    save_tokenizer(tok, root / "spm")
    rng = random.Random(seed)
    del rng
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
