"""``mdm tokenizer train`` for the acoustic tokenizers (``kind: acoustic_rp | acoustic_vqkd``) and their
held-out evaluation (``mdm tokenizer eval`` on clips).

* ``acoustic_rp`` (BEATs iteration 1) trains nothing: the random projection and codebook come from
  ``acoustic_rp.seed``; the command evaluates codebook usage on held-out clips and writes the directory.
* ``acoustic_vqkd`` (iterations ≥ 2) distils ``audio_teacher.model_dir`` — an mdm audio model directory,
  e.g. the previous iteration's ``mdm pretrain`` output — into encoder + codebook: AdamW, warm-up then
  cosine, k-means initialisation and dead-code restarts from the run's generator, usage logged over a
  window of steps; the teacher's last-layer patch features are the targets.

Clips come from the sound world rendered in memory (``audio.source: demo``), audio files (``folder``)
or audio shards (``shards``), through the audio front end (:mod:`mdm.data.audio`), and are held in
memory (``audio.num_clips`` for training, ``audio.eval_clips`` held out). This module (with ``cli.py``)
is where the acoustic tokenizer commands touch files.
"""

from __future__ import annotations

import glob
import logging
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from mdm.data.audio import AUDIO_EXTS, AudioFrontendConfig, AudioReadError, collate_fbanks, load_fbank

log = logging.getLogger(__name__)

__all__ = [
    "AudioClipsConfig",
    "AudioTeacherConfig",
    "ClipSet",
    "evaluate_acoustic",
    "load_clips",
    "train_acoustic",
]


@dataclass
class AudioClipsConfig:
    """Where the acoustic tokenizer's clips come from.

    Attributes:
        source: ``demo`` (the generated sound world, :mod:`mdm.data.demo.sounds`), ``folder`` (audio files
            under ``paths``) or ``shards`` (audio WebDataset tars matching ``paths``).
        paths: folders, files or glob patterns.
        eval_paths: held-out clips for ``folder``/``shards`` (default: the last ``eval_clips`` of ``paths``).
        num_clips: training clips held in memory.
        eval_clips: held-out clips for the final evaluation (demo: another world seed).
        demo_seed: world seed of the demo clips (held-out clips use ``demo_seed + 1000003``).
        demo_duration: seconds per demo clip.
        frontend: waveform → normalised filterbank (``target_frames: 0`` keeps each clip's length).
    """

    source: Literal["demo", "folder", "shards"] = "demo"
    paths: list[str] = field(default_factory=list)
    eval_paths: list[str] = field(default_factory=list)
    num_clips: int = 512
    eval_clips: int = 128
    demo_seed: int = 0
    demo_duration: float = 3.0
    frontend: AudioFrontendConfig = field(default_factory=lambda: AudioFrontendConfig(target_frames=0))


@dataclass
class AudioTeacherConfig:
    """The frozen audio model whose last-layer patch features ``acoustic_vqkd`` regresses.

    Attributes:
        model_dir: an mdm model directory with the audio expert (e.g. ``<pretrain out_dir>/model``).
    """

    model_dir: str = ""


@dataclass
class ClipSet:
    """Filterbanks in memory: ``fbanks[i]`` (T_i, F) and its real frames ``frames[i]``."""

    fbanks: list[torch.Tensor]
    frames: list[int]

    def __len__(self) -> int:
        return len(self.fbanks)

    def batch(self, idx: list[int], pad_value: float) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(audio (B, T, F), padding (B, T) | None) of the clips ``idx``."""
        return collate_fbanks([self.fbanks[i] for i in idx], [self.frames[i] for i in idx], pad_value)


def _files(specs: list[str]) -> list[Path]:
    out: list[Path] = []
    for spec in specs:
        p = Path(spec)
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.suffix.lstrip(".").lower() in AUDIO_EXTS)
        elif any(c in spec for c in "*?["):
            out += [Path(f) for f in sorted(glob.glob(spec))]
        elif p.exists():
            out.append(p)
        else:
            raise FileNotFoundError(f"audio.paths: {spec!r} matches no file")
    return out


def _demo(n: int, seed: int, duration: float, frontend: AudioFrontendConfig) -> ClipSet:
    from mdm.data.audio import compute_fbank, pad_or_crop
    from mdm.data.demo.sounds import make_clip, render

    fbanks, frames = [], []
    for i in range(n):
        clip = make_clip(seed, i, duration)
        wav = torch.from_numpy(render(clip))
        fb, valid = pad_or_crop(
            compute_fbank(wav, clip.sample_rate, frontend), frontend.target_frames, frontend.pad_value
        )
        fbanks.append(fb)
        frames.append(valid)
    return ClipSet(fbanks, frames)


def _from_sources(specs: list[str], source: str, limit: int, frontend: AudioFrontendConfig) -> ClipSet:
    fbanks, frames = [], []
    if source == "folder":
        items = ((str(f), f) for f in _files(specs))
    else:
        from mdm.data.shards import iter_tar_samples
        from mdm.data.streams import expand_shards

        def shard_items():
            for shard in expand_shards(specs, "audio.paths"):
                for _, sample in iter_tar_samples(shard):
                    ext = next((e for e in AUDIO_EXTS if e in sample), None)
                    if ext is not None:
                        yield f"{shard}:{sample['__key__']}.{ext}", sample[ext]

        items = shard_items()
    skipped = 0
    for name, src in items:
        if len(fbanks) >= limit:
            break
        try:
            fb, valid = load_fbank(src, name, frontend)
        except AudioReadError as e:
            skipped += 1
            log.warning("skipped clip: %s", e)
            continue
        fbanks.append(fb)
        frames.append(valid)
    if not fbanks:
        raise ValueError(f"audio: no readable clip in {specs} ({skipped} skipped)")
    return ClipSet(fbanks, frames)


def load_clips(cfg: AudioClipsConfig, held_out: bool = False) -> ClipSet:
    """The training clips, or the held-out ones (``held_out``)."""
    fe = cfg.frontend
    fe.validate()
    n = cfg.eval_clips if held_out else cfg.num_clips
    if cfg.source == "demo":
        return _demo(n, cfg.demo_seed + (1_000_003 if held_out else 0), cfg.demo_duration, fe)
    if held_out and cfg.eval_paths:
        return _from_sources(cfg.eval_paths, cfg.source, n, fe)
    if held_out:  # the last eval_clips of the training sources
        clips = _from_sources(cfg.paths, cfg.source, cfg.num_clips + cfg.eval_clips, fe)
        return ClipSet(clips.fbanks[-n:], clips.frames[-n:])
    return _from_sources(cfg.paths, cfg.source, n, fe)


class AudioTeacher(nn.Module):
    """A frozen mdm audio model: (B, T, F) → last-layer patch features (B, P, D), [CLS] dropped."""

    def __init__(self, model_dir: str) -> None:
        super().__init__()
        from mdm.models import from_pretrained

        if not model_dir:
            raise ValueError("audio_teacher.model_dir: set the teacher (an mdm audio model directory)")
        self.backbone = from_pretrained(model_dir).eval().requires_grad_(False)
        if not self.backbone.cfg.has_audio:
            raise ValueError(
                f"audio_teacher.model_dir {model_dir}: {self.backbone.cfg.arch} has no audio expert"
            )

    def train(self, mode: bool = True) -> AudioTeacher:
        """Stays in eval mode: a teacher is frozen."""
        return super().train(False)

    @property
    def feature_dim(self) -> int:
        return self.backbone.cfg.embed_dim

    @torch.no_grad()
    def forward(self, audio: torch.Tensor, padding: torch.Tensor | None = None) -> torch.Tensor:
        return self.backbone(audio=audio, audio_padding_mask=padding)[:, 1:].float()


@torch.no_grad()
def evaluate_acoustic(
    tok: Any, clips: ClipSet, pad_value: float, teacher: AudioTeacher | None = None, batch_size: int = 32
) -> dict[str, float]:
    """Codebook usage and perplexity over the non-padded patches of ``clips`` (and, for ``acoustic_vqkd``
    with a teacher, the mean cosine between the estimator's features and the teacher's)."""
    from mdm.tokenizers.evaluate import CodeHistogram

    was = tok.training
    tok.eval()
    hist = CodeHistogram(tok.codebook_size)
    cos_sum, cos_n = 0.0, 0
    p, fp = tok.patch_size, tok.mel_bins // tok.patch_size
    for start in range(0, len(clips), batch_size):
        audio, pad = clips.batch(list(range(start, min(start + batch_size, len(clips)))), pad_value)
        codes = tok.encode(audio, pad)  # (b, P)
        keep = torch.ones_like(codes, dtype=torch.bool)
        if pad is not None:
            keep = ~pad[:, : audio.shape[1] // p * p].reshape(pad.shape[0], -1, p).all(-1).repeat_interleave(
                fp, 1
            )
        hist.update(codes[keep])
        if teacher is not None and hasattr(tok, "decode_features"):
            pred = tok.decode_features(codes, (audio.shape[1] // p, fp))
            cos = F.cosine_similarity(pred, teacher(audio, pad), dim=-1)  # (b, P)
            cos_sum, cos_n = cos_sum + float(cos[keep].sum()), cos_n + int(keep.sum())
    tok.train(was)
    out = {"usage": hist.usage, "perplexity": hist.perplexity, "num_tokens": float(hist.counts.sum())}
    if cos_n:
        out["teacher_cosine"] = cos_sum / cos_n
    return out


def _lr(step: int, lr: float, min_lr: float, warmup: int, steps: int) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * min(1.0, t)))


def build_acoustic(cfg: Any, teacher_dim: int = 0) -> Any:
    """The tokenizer of ``cfg.kind`` (a :class:`~mdm.tokenizers.config.TokenizerTrainConfig`), its
    initial weights depending only on ``cfg.seed`` (the global RNG is left as it was)."""
    from mdm.tokenizers.acoustic import AcousticVQKD, RandomProjectionTokenizer

    if cfg.kind == "acoustic_rp":
        return RandomProjectionTokenizer(cfg.acoustic_rp)
    if cfg.acoustic_vqkd.teacher_dim <= 0:
        cfg.acoustic_vqkd.teacher_dim = teacher_dim
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return AcousticVQKD(cfg.acoustic_vqkd)


def _fit(cfg: Any, tok: Any, teacher: AudioTeacher, clips: ClipSet, progress: bool) -> None:
    from tqdm import tqdm

    from mdm.tokenizers.evaluate import CodeHistogram
    from mdm.tokenizers.train import USAGE_WINDOW, _param_groups

    o = cfg.optim
    g = torch.Generator().manual_seed(cfg.seed)
    order = random.Random(cfg.seed)
    opt = torch.optim.AdamW(_param_groups(tok, o.weight_decay), lr=o.lr, betas=o.betas)
    hist = CodeHistogram(tok.codebook_size)
    pad_value = cfg.audio.frontend.pad_value
    idx: list[int] = []
    tok.train()
    for step in tqdm(range(o.steps), disable=not progress, desc=cfg.kind, dynamic_ncols=True):
        lr = _lr(step, o.lr, o.min_lr, o.warmup_steps, o.steps)
        for group in opt.param_groups:
            group["lr"] = lr
        if len(idx) < o.batch_size:  # epochs of a seeded shuffle
            more = list(range(len(clips)))
            order.shuffle(more)
            idx += more
        batch, idx = idx[: o.batch_size], idx[o.batch_size :]
        audio, pad = clips.batch(batch, pad_value)
        out = tok(audio, teacher(audio, pad), pad, generator=g)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        if o.grad_clip > 0:
            nn.utils.clip_grad_norm_(tok.parameters(), o.grad_clip)
        opt.step()
        if step % USAGE_WINDOW == 0:
            hist.reset()
        hist.update(out["codes"])
        if (step + 1) % o.log_every == 0 or step + 1 == o.steps:
            log.info(
                "step %d loss %.4f cosine %.4f usage %.1f%% restarts %d lr %.2e",
                step + 1, float(out["loss"].detach()), float(out["cosine"]), 100 * hist.usage, tok.quantizer.last_restarts, lr,
            )  # fmt: skip


def train_acoustic(cfg: Any, progress: bool = True) -> dict[str, Any]:
    """Builds (and for ``acoustic_vqkd`` trains) the acoustic tokenizer of ``cfg`` and writes it to
    ``cfg.out_dir``; returns the held-out metrics plus ``tokenizer_id`` and ``out_dir``."""
    from mdm.config import to_dict
    from mdm.tokenizers.io import save_tokenizer

    teacher = AudioTeacher(cfg.audio_teacher.model_dir) if cfg.kind == "acoustic_vqkd" else None
    tok = build_acoustic(cfg, teacher.feature_dim if teacher is not None else 0)
    if teacher is not None:
        clips = load_clips(cfg.audio)
        log.info("distilling %s into acoustic_vqkd on %d clips", cfg.audio_teacher.model_dir, len(clips))
        _fit(cfg, tok, teacher, clips, progress)
    metrics = evaluate_acoustic(
        tok, load_clips(cfg.audio, held_out=True), cfg.audio.frontend.pad_value, teacher
    )
    log.info("held-out evaluation: %s", ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
    extra: dict[str, Any] = {
        "train_config": to_dict(cfg),
        "metrics": metrics,
        "frontend": to_dict(cfg.audio.frontend),
    }
    if teacher is not None:
        extra["audio_teacher"] = to_dict(cfg.audio_teacher)
    tok_id = save_tokenizer(tok.freeze(), cfg.out_dir, extra=extra)
    log.info("wrote %s (%s)", cfg.out_dir, tok_id)
    return {**metrics, "tokenizer_id": tok_id, "out_dir": cfg.out_dir}
