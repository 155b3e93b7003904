"""``mdm tokenizer train``: a single-process training loop for the dVAE and VQ-KD tokenizers.

AdamW (no decay on biases, norms, tokens and positions), linear warm-up then cosine decay, a tqdm bar,
codebook usage and perplexity over a sliding window of steps, an atomic training-state checkpoint every
``optim.save_every`` steps (resumable with ``--resume``), and at the end the tokenizer directory
(:mod:`mdm.tokenizers.io`) with its evaluation on held-out images. The main pretraining engine
(:mod:`mdm.train`) is separate: a tokenizer is trained once, then frozen.

Under ``torchrun`` (``WORLD_SIZE`` > 1) the same loop runs data-parallel over a gloo/NCCL process group:
each rank draws its own batches (generator seed ``seed + rank``), gradients are averaged, and the
quantizer's ``reduce_fn`` / ``broadcast_fn`` make the codebook EMA counts and sums global and the
k-means initialisation and dead-code restarts rank 0's, so every rank holds the same tokenizer. Rank 0
writes the checkpoints and the tokenizer directory.
"""

from __future__ import annotations

import io
import logging
import math
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from mdm.config import to_dict
from mdm.models.io import atomic_write_bytes
from mdm.tokenizers.base import VisualTokenizer
from mdm.tokenizers.config import ImageDataConfig, OptimConfig, TokenizerTrainConfig
from mdm.tokenizers.data import BatchStream, load_images
from mdm.tokenizers.dvae import DVAE
from mdm.tokenizers.evaluate import CodeHistogram, evaluate
from mdm.tokenizers.io import save_tokenizer
from mdm.tokenizers.teacher import Teacher, build_teacher
from mdm.tokenizers.teacher_cache import CachedTargets, cached_targets
from mdm.tokenizers.vqkd import VQKD

__all__ = ["train_tokenizer", "lr_at", "cosine_ramp", "build_for_training", "eval_images"]

log = logging.getLogger(__name__)
STATE = "train_state.pt"
USAGE_WINDOW = 20  # steps whose codes make up the logged usage


def lr_at(step: int, cfg: OptimConfig) -> float:
    """Linear warm-up to ``lr`` then cosine decay to ``min_lr`` at ``steps``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(1.0, t)))


def cosine_ramp(step: int, steps: int, start: float, end: float) -> float:
    """``start`` → ``end`` along a half cosine over ``steps``, then ``end``."""
    t = min(1.0, step / steps) if steps > 0 else 1.0
    return end + 0.5 * (start - end) * (1 + math.cos(math.pi * t))


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    skip = getattr(model, "no_weight_decay", lambda: set())()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(".b") or name in skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_for_training(
    cfg: TokenizerTrainConfig, teacher_fn: Callable[[torch.Tensor], torch.Tensor] | None = None
) -> tuple[VisualTokenizer, Teacher | None]:
    """The tokenizer to train and, for VQ-KD, its teacher (whose width sets ``vqkd.teacher_dim``).

    The initial weights depend only on ``cfg.seed``; the global RNG is left as it was.
    """
    if cfg.kind == "dvae":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            return DVAE(cfg.dvae), None
    teacher = build_teacher(cfg.teacher, fn=teacher_fn)
    if cfg.vqkd.teacher_dim <= 0:
        cfg.vqkd.teacher_dim = teacher.feature_dim()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return VQKD(cfg.vqkd), teacher


def eval_images(data: ImageDataConfig, size: int, n: int, seed: int) -> torch.Tensor:
    """Held-out evaluation images: other demo scenes (another seed), else the first ``n`` images."""
    if data.source == "demo":
        held_out = ImageDataConfig(source="demo", num_images=n, demo_size=data.demo_size)
        return load_images(held_out, size, n, seed=seed + 1_000_003)
    return load_images(data, size, n, seed=seed)


def _step_loss(
    tok: VisualTokenizer, teacher: Teacher | None, images: torch.Tensor, step: int,
    cfg: TokenizerTrainConfig, g: torch.Generator, target: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:  # fmt: skip
    if isinstance(tok, DVAE):
        t = cfg.dvae_train
        tau = cosine_ramp(step, t.temperature_steps, *t.temperature)
        beta = cosine_ramp(step, t.kl_warmup_steps, *t.kl_weight)
        out = tok(
            images,
            temperature=tau,
            kl_weight=beta,
            recon=t.recon,
            generator=g,
            diversity_weight=t.diversity_weight,
        )
        out["tau"], out["kl_weight"] = torch.tensor(tau), torch.tensor(beta)
        return out
    if target is None:  # not cached: the teacher runs on this step's views
        assert teacher is not None
        target = teacher(images, tok.grid_size)  # (B, h, w, C)
    return tok(images, target, generator=g)


def _stream(
    cfg: TokenizerTrainConfig, tok: VisualTokenizer, teacher: Teacher | None, g: torch.Generator
) -> Iterator[torch.Tensor] | CachedTargets:
    """Training images (cropped and flipped on the fly), or (images, teacher features) from the cache."""
    if teacher is not None and cfg.teacher.cache:
        return cached_targets(cfg, teacher, tok.img_size, tok.grid_size, g)
    return BatchStream(cfg.data, tok.img_size, cfg.optim.batch_size, g, seed=cfg.seed)


def _save_state(
    path: Path, tok: nn.Module, opt: torch.optim.Optimizer, step: int, g: torch.Generator,
    generators: list[torch.Tensor] | None = None,
) -> None:  # fmt: skip
    state = {"model": tok.state_dict(), "optim": opt.state_dict(), "step": step, "generator": g.get_state()}
    if generators is not None and len(generators) > 1:
        state["generators"] = generators  # one per rank
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())


def _log_line(step: int, out: dict[str, torch.Tensor], hist: CodeHistogram, lr: float) -> str:
    parts = [f"step {step}"] + [
        f"{k} {float(v.detach()):.4f}" for k, v in out.items() if k != "codes" and v.numel() == 1
    ]
    return " ".join(parts + [f"usage {100 * hist.usage:.1f}%", f"ppl {hist.perplexity:.1f}", f"lr {lr:.2e}"])


class _DataParallel:
    """The process group of a ``torchrun`` launch and what the training loop does with it."""

    def __init__(self) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", 1))
        self.rank = 0
        if self.world > 1:
            import torch.distributed as dist

            if not dist.is_initialized():
                dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
            self.rank, self.dist = dist.get_rank(), dist

    def wire(self, tok: nn.Module) -> None:
        """Global EMA statistics and rank 0's k-means seeds and restarts for the quantizer."""
        quantizer = getattr(tok, "quantizer", None)
        if self.world > 1 and quantizer is not None:
            quantizer.reduce_fn = lambda t: self.dist.all_reduce(t)
            quantizer.broadcast_fn = lambda t: self.dist.broadcast(t, 0)

    def average_gradients(self, tok: nn.Module) -> None:
        """Mean of every trainable parameter's gradient over ranks (one all-reduce of a flat buffer)."""
        if self.world == 1:
            return
        params = [p for p in tok.parameters() if p.requires_grad]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        self.dist.all_reduce(flat)
        flat /= self.world
        for p, chunk in zip(params, flat.split([p.numel() for p in params])):
            p.grad = chunk.view_as(p).clone()

    def generator_states(self, g: torch.Generator) -> list[torch.Tensor]:
        """Every rank's generator state, in rank order (for resumable checkpoints)."""
        if self.world == 1:
            return [g.get_state()]
        out: list[Any] = [None] * self.world
        self.dist.all_gather_object(out, g.get_state())
        return out

    def close(self) -> None:
        if self.world > 1:
            self.dist.barrier()
            self.dist.destroy_process_group()


def train_tokenizer(
    cfg: TokenizerTrainConfig,
    teacher_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    resume: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Trains the configured tokenizer and writes it to ``cfg.out_dir``.

    Args:
        cfg: the training config.
        teacher_fn: a VQ-KD teacher given in Python (``teacher.kind: none``).
        resume: continue from ``<out_dir>/train_state.pt`` if present.
        progress: show a progress bar.

    Returns:
        The evaluation metrics on held-out images plus ``tokenizer_id`` and ``out_dir``.
    """
    if cfg.kind.startswith("acoustic"):
        from mdm.tokenizers.acoustic_train import train_acoustic

        return train_acoustic(cfg, progress=progress)
    out_dir = Path(cfg.out_dir)
    ranks = _DataParallel()
    g = torch.Generator().manual_seed(cfg.seed + ranks.rank)  # rank 0: the single-process stream
    tok, teacher = build_for_training(cfg, teacher_fn)
    ranks.wire(tok)
    tok.train()
    opt = torch.optim.AdamW(
        _param_groups(tok, cfg.optim.weight_decay), lr=cfg.optim.lr, betas=cfg.optim.betas
    )
    start = 0
    if resume and (out_dir / STATE).exists():
        state = torch.load(out_dir / STATE, map_location="cpu", weights_only=True)
        tok.load_state_dict(state["model"])
        opt.load_state_dict(state["optim"])
        generators = state.get("generators", [state["generator"]])
        if len(generators) != ranks.world:
            raise ValueError(
                f"{out_dir / STATE} was written by {len(generators)} process(es); resume it with as many"
            )
        g.set_state(generators[ranks.rank])
        start = int(state["step"])
        log.info("resumed from %s at step %d", out_dir / STATE, start)
    stream = _stream(cfg, tok, teacher, g)
    if isinstance(tok, DVAE) and cfg.dvae_train.init_codes and start == 0:
        tok.init_codes(next(stream), scale=cfg.dvae_train.init_scale, generator=g)
    hist = CodeHistogram(tok.codebook_size)
    n_params = sum(p.numel() for p in tok.parameters() if p.requires_grad)
    log.info(
        "training %s (%.2fM trainable parameters) for %d steps on %d process(es)",
        cfg.kind, n_params / 1e6, cfg.optim.steps, ranks.world,
    )  # fmt: skip
    progress = progress and ranks.rank == 0
    bar = tqdm(range(start, cfg.optim.steps), disable=not progress, desc=f"{cfg.kind}", dynamic_ncols=True)
    for step in bar:
        lr = lr_at(step, cfg.optim)
        for group in opt.param_groups:
            group["lr"] = lr
        batch = next(stream)
        images, target = batch if isinstance(batch, tuple) else (batch, None)
        out = _step_loss(tok, teacher, images, step, cfg, g, target)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        ranks.average_gradients(tok)
        if isinstance(tok, DVAE) and step < cfg.dvae_train.encoder_warmup_steps:
            for p in tok.encoder.parameters():  # the decoder learns to read the initial codes first
                p.grad = None
        if cfg.optim.grad_clip > 0:
            nn.utils.clip_grad_norm_(tok.parameters(), cfg.optim.grad_clip)
        opt.step()
        if step % USAGE_WINDOW == 0:
            hist.reset()
        hist.update(out["codes"])
        bar.set_postfix(loss=f"{float(out['loss'].detach()):.4f}", usage=f"{100 * hist.usage:.0f}%")
        if ranks.rank == 0 and ((step + 1) % cfg.optim.log_every == 0 or step + 1 == cfg.optim.steps):
            log.info(_log_line(step + 1, out, hist, lr))
        if cfg.optim.save_every and (step + 1) % cfg.optim.save_every == 0:
            generators = ranks.generator_states(g)
            if ranks.rank == 0:
                _save_state(out_dir / STATE, tok, opt, step + 1, g, generators)
    metrics = _finish(cfg, tok, teacher) if ranks.rank == 0 else {"out_dir": cfg.out_dir}
    ranks.close()
    return metrics


def _finish(cfg: TokenizerTrainConfig, tok: VisualTokenizer, teacher: Teacher | None) -> dict[str, Any]:
    images = eval_images(cfg.data, tok.img_size, cfg.optim.eval_images, cfg.seed)
    metrics = evaluate(tok, images, teacher)
    log.info("held-out evaluation: %s", ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
    teacher_state = None
    if teacher is not None and cfg.teacher.kind == "timm" and teacher.module is not None:
        teacher_state = teacher.module.state_dict()
    extra = {"train_config": to_dict(cfg), "metrics": metrics}
    if cfg.kind == "vqkd":
        extra["teacher"] = to_dict(cfg.teacher)
    tok_id = save_tokenizer(tok, cfg.out_dir, extra=extra, teacher_state=teacher_state)
    log.info("wrote %s (%s)", cfg.out_dir, tok_id)
    return {**metrics, "tokenizer_id": tok_id, "out_dir": cfg.out_dir}
