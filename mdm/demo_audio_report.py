"""The report of ``mdm demo --modality audio``: numbers from the runs' files, curves, the spectrogram figure.

* pretraining: AudioMAE's reconstruction loss and BEATs' token loss / accuracy (first and last logged
  windows) from ``pretrain/*/metrics.jsonl``; BEATs' accuracy is set against chance (1 / codebook size)
  and against the best constant guess (the most frequent code among held-out patches);
* tokenizers: held-out codebook usage and perplexity from each tokenizer directory's ``config.json``;
* fine-tuning: fold-5 accuracy of every run from ``finetune/*/metrics.json``;
* ``spectrograms.png``: held-out clips of the labelled world — the input fbank, the input with AudioMAE's
  80 % hidden patches blanked, and the reconstruction (hidden patches predicted by the pretrained
  encoder + decoder, de-normalised with each patch's own mean and variance, as AudioMAE shows them).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mdm.report import markdown_table, plot_curves, text_table


def _window(rows: list[dict[str, Any]], key: str, first: bool, n: int = 3) -> float | None:
    vals = [r[key] for r in rows if r.get(key) is not None]
    if not vals:
        return None
    part = vals[:n] if first else vals[-n:]
    return sum(part) / len(part)


def _majority_rate(tok_dir: Path, plan: Any, seed: int) -> float:
    """Share of the most frequent code among the non-padded patches of held-out clips (best constant guess)."""
    import torch

    import mdm.tokenizers as T
    from mdm.config import from_dict
    from mdm.data.audio import AudioFrontendConfig
    from mdm.tokenizers.acoustic_train import AudioClipsConfig, load_clips

    tok = T.load(tok_dir)
    meta = json.loads((tok_dir / "config.json").read_text())
    fe = from_dict(AudioFrontendConfig, meta["frontend"], source=str(tok_dir))
    clips = load_clips(
        AudioClipsConfig(eval_clips=32, demo_seed=1000 + seed, demo_duration=plan.duration, frontend=fe),
        held_out=True,
    )
    audio, pad = clips.batch(list(range(len(clips))), fe.pad_value)
    codes = tok.encode(audio, pad)
    if pad is not None:
        p, f = tok.patch_size, tok.mel_bins // tok.patch_size
        keep = ~pad[:, : audio.shape[1] // p * p].reshape(pad.shape[0], -1, p).all(-1).repeat_interleave(f, 1)
        codes = codes[keep]
    counts = torch.bincount(codes.flatten(), minlength=tok.codebook_size)
    return float(counts.max()) / float(counts.sum())


def collect(out: Path, plan: Any, seed: int) -> dict[str, Any]:
    """Every number of the report, also written to ``<out>/results.json``."""
    from mdm.train.metrics import read_metrics

    res: dict[str, Any] = {"seed": seed, "quick": plan.quick}
    amae = read_metrics(out / "pretrain" / "audiomae" / "metrics.jsonl")
    beats = read_metrics(out / "pretrain" / "beats" / "metrics.jsonl")
    res["amae_loss"] = {"first": _window(amae, "amae_loss", True), "last": _window(amae, "amae_loss", False)}
    res["beats_acc"] = {
        "first": _window(beats, "beats_acc", True),
        "last": _window(beats, "beats_acc", False),
    }
    res["beats_loss"] = {
        "first": _window(beats, "beats_loss", True),
        "last": _window(beats, "beats_loss", False),
    }
    tokenizers = {}
    for name in ("iter1", "iter2"):
        path = out / "tokenizers" / name / "config.json"
        if path.is_file():
            meta = json.loads(path.read_text())
            tokenizers[name] = {
                "kind": meta["kind"],
                "codebook_size": meta["config"]["codebook_size"],
                **meta["metrics"],
            }
    res["tokenizers"] = tokenizers
    K = tokenizers["iter1"]["codebook_size"]
    res["beats_chance"] = {
        "uniform": 1.0 / K,
        "majority_code": _majority_rate(out / "tokenizers" / "iter1", plan, seed),
    }
    res["finetune"] = {}
    for run in sorted((out / "finetune").glob("*/metrics.json")):
        res["finetune"][run.parent.name] = json.loads(run.read_text())
    (out / "results.json").write_text(json.dumps(res, indent=2) + "\n")
    return res


def _colour(x: Any) -> Any:
    """(H, W) values in [0, 1] → (H, W, 3) uint8 on a dark-blue → yellow ramp."""
    import numpy as np

    anchors = np.array(
        [[0, 0, 4], [59, 15, 112], [140, 41, 129], [222, 73, 104], [254, 159, 109], [252, 253, 191]], float
    )
    pos = np.clip(x, 0, 1) * (len(anchors) - 1)
    lo = np.floor(pos).astype(int).clip(0, len(anchors) - 2)
    w = (pos - lo)[..., None]
    return (anchors[lo] * (1 - w) + anchors[lo + 1] * w).astype(np.uint8)


def spectrogram_figure(out: Path, n_clips: int = 3, seed: int = 0) -> Path:
    """input / masked / reconstruction rows for ``n_clips`` held-out clips of the labelled world."""
    import numpy as np
    import torch
    from PIL import Image, ImageDraw

    from mdm.config import load_config
    from mdm.data.audio import audio_mask, collate_fbanks, load_fbank
    from mdm.objectives import build_pretrain_model
    from mdm.objectives.amae import AudioMaskedAutoencoder
    from mdm.objectives.audio_common import audio_patches
    from mdm.train.checkpoint import latest_checkpoint
    from mdm.train.pretrain import PretrainConfig

    run = out / "pretrain" / "audiomae"
    cfg = load_config(PretrainConfig, run / "config.yaml")
    model = build_pretrain_model(cfg.model, cfg.objectives)
    ckpt = latest_checkpoint(run / "checkpoints")
    if ckpt is None:
        raise FileNotFoundError(f"{run}/checkpoints: no checkpoint to draw the reconstruction from")
    model.load_state_dict(torch.load(ckpt / "state.pt", map_location="cpu", weights_only=False)["model"])
    model.eval()
    amae: AudioMaskedAutoencoder = model.objectives["amae"]  # type: ignore[assignment]
    fe = cfg.data.audio_frontend
    files = sorted((out / "world" / "esc50" / "audio").glob("5-*.wav"))[:n_clips]  # fold 5: never trained on
    loaded = [load_fbank(str(f), f.name, fe) for f in files]
    audio, pad = collate_fbanks([x for x, _ in loaded], [n for _, n in loaded], fe.pad_value)
    p = cfg.model.audio_patch_size
    tp, fp = audio.shape[1] // p, audio.shape[2] // p
    import random

    rng = random.Random(seed)
    mask = torch.stack([audio_mask(tp, fp, 0.8, "random", rng) for _ in files])  # (B, P)
    batch = {"audio": audio, "audio_mask": mask}
    if pad is not None:
        batch["audio_padding_mask"] = pad
    with torch.no_grad():
        r = amae.reconstruct(model.backbone, batch)
    target = audio_patches(audio, p)  # (B, P, p·p), raw
    mean, std = target.mean(-1, keepdim=True), (target.var(-1, keepdim=True) + 1e-6) ** 0.5
    pred = r["pred"] * std + mean if amae.norm_pix_loss else r["pred"]
    recon = torch.where(mask[..., None], pred, target)
    masked = torch.where(mask[..., None], torch.full_like(target, float(audio.min())), target)

    def unpatch(x: torch.Tensor) -> np.ndarray:  # (P, p·p) → (F, T), low frequencies at the bottom
        img = x.reshape(tp, fp, p, p).permute(0, 2, 1, 3).reshape(tp * p, fp * p)  # (T, F)
        return img.t().flip(0).numpy()

    lo, hi = float(audio.min()), float(audio.max())
    rows = []
    for b in range(len(files)):
        for label, x in (("input", target[b]), ("masked 80 %", masked[b]), ("reconstruction", recon[b])):
            rows.append((f"{files[b].stem} {label}", _colour((unpatch(x) - lo) / (hi - lo + 1e-9))))
    h, w = rows[0][1].shape[:2]
    label_w, gap = 190, 6
    canvas = Image.new("RGB", (label_w + w + gap, len(rows) * (h + gap) + gap), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for i, (label, arr) in enumerate(rows):
        y = gap + i * (h + gap)
        draw.text((4, y + h // 2 - 6), label, fill=(0, 0, 0))
        canvas.paste(Image.fromarray(arr), (label_w, y))
    path = out / "spectrograms.png"
    canvas.save(path)
    return path


def _rows(res: dict[str, Any]) -> list[list[Any]]:
    ft = res["finetune"]
    rows = []
    for name, label in (("audiomae", "AudioMAE (amae)"), ("beats", "BEATs iteration 1 (beats)")):
        if name in ft and f"scratch-{name}" in ft:
            a, s = ft[name].get("acc", float("nan")), ft[f"scratch-{name}"].get("acc", float("nan"))
            rows.append([label, a, s, a - s])
    return rows


def print_table(res: dict[str, Any]) -> None:
    """The sound-classification table and the pretraining numbers, on the terminal."""
    print("\nsound classification (fold 5 accuracy, %):")
    print(text_table(["pretraining", "pretrained", "scratch", "margin"], _rows(res)))
    a, b, c = res["amae_loss"], res["beats_acc"], res["beats_chance"]
    print(f"AudioMAE reconstruction loss {a['first']:.3f} -> {a['last']:.3f}")
    print(
        f"BEATs token accuracy {b['first']:.3f} -> {b['last']:.3f} (chance {c['uniform']:.4f}, best constant {c['majority_code']:.3f})"
    )
    for name, t in res["tokenizers"].items():
        print(
            f"acoustic tokenizer {name} ({t['kind']}, {t['codebook_size']} codes): held-out usage {100 * t['usage']:.1f} %"
        )


def write_report(out: Path, res: dict[str, Any]) -> Path:
    """``<out>/report.md`` with curves, the spectrogram figure and the tables."""
    from mdm.train.metrics import read_metrics

    amae = read_metrics(out / "pretrain" / "audiomae" / "metrics.jsonl")
    beats = read_metrics(out / "pretrain" / "beats" / "metrics.jsonl")
    plot_curves(
        amae, ["amae_loss"], out / "curves_audiomae.png", "AudioMAE pretraining", "MSE (normalised patches)"
    )
    plot_curves(beats, ["beats_loss"], out / "curves_beats.png", "BEATs pretraining", "cross-entropy")
    plot_curves(beats, ["beats_acc"], out / "curves_beats_acc.png", "BEATs token accuracy", "accuracy")
    fig = spectrogram_figure(out, seed=res["seed"])
    a, b, c = res["amae_loss"], res["beats_acc"], res["beats_chance"]
    tok_rows = [
        [name, t["kind"], t["codebook_size"], 100 * t["usage"], t["perplexity"], t.get("teacher_cosine", "")]
        for name, t in res["tokenizers"].items()
    ]
    lines = [
        f"# mdm demo --modality audio (seed {res['seed']}{', quick' if res['quick'] else ''})",
        "",
        f"Wall time {res['wall_seconds']:.0f} s.",
        "",
        "## Sound classification (ESC-50 layout, folds 1-4 → fold 5, accuracy %)",
        "",
        markdown_table(["pretraining", "pretrained", "scratch (same recipe)", "margin"], _rows(res)),
        "",
        "## Pretraining",
        "",
        f"- AudioMAE reconstruction loss (first → last logged windows): {a['first']:.3f} → {a['last']:.3f}",
        f"- BEATs masked-token accuracy: {b['first']:.3f} → {b['last']:.3f}; chance 1/K = {c['uniform']:.4f}, "
        f"best constant guess (most frequent code) = {c['majority_code']:.3f}",
        "",
        "![AudioMAE](curves_audiomae.png) ![BEATs](curves_beats.png) ![BEATs accuracy](curves_beats_acc.png)",
        "",
        "## Acoustic tokenizers (held-out clips)",
        "",
        markdown_table(["iteration", "kind", "codes", "usage %", "perplexity", "teacher cosine"], tok_rows),
        "",
        "## Spectrograms: input, 80 % of the patches hidden, AudioMAE's reconstruction",
        "",
        f"![spectrograms]({fig.name})",
        "",
    ]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path
