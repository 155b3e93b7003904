"""``mdm finetune``: VQAv2, NLVR2, retrieval and classification on the pretraining engine.

    mdm finetune --config configs/finetune/vqav2_base.yaml data.root=/data/vqav2 \
        init=runs/pretrain/model text_tokenizer=runs/spm

``init`` is ``scratch``, an mdm model directory (``mdm pretrain`` output, ``mdm import``,
``mdm export --format safetensors``) or a unilm/torchscale BEiT-3 ``.pth``. The backbone is built from
``model`` in the config; the checkpoint must have the same layout (a different ``img_size`` is handled
by resizing the position table, a missing/extra final norm by ``model.normalize_output``).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path

import torch

from mdm.config import ConfigError, dump_yaml, load_config, to_dict
from mdm.distributed.strategy import build_strategy
from mdm.models.config import ModelConfig
from mdm.models.layers.embeddings import resize_vision_pos_table
from mdm.models.multiway import MultiwayTransformer
from mdm.train.loader import EpochLoader
from mdm.train.loop import Trainer

log = logging.getLogger(__name__)


def load_backbone(init: str, cfg: ModelConfig) -> torch.nn.Module:
    """The backbone of ``cfg`` with weights from ``init`` (see the module docstring); an imported BEATs
    directory (``mdm import beats``) is loaded as its own encoder and ``model`` is not used."""
    path = Path(init)
    if init not in ("", "scratch") and path.is_dir():
        from mdm.models.io import from_pretrained, model_family

        if model_family(path) == "beats":
            log.info("backbone: the BEATs encoder of %s (the model: section is not used)", init)
            return from_pretrained(path)
    model = MultiwayTransformer(cfg)
    if init in ("", "scratch"):
        return model
    if path.is_dir():
        from safetensors.torch import load_file

        from mdm.models.io import WEIGHTS, read_model_config

        saved_cfg, _ = read_model_config(path)
        sd = load_file(str(path / WEIGHTS))
        if saved_cfg.shared_attention != cfg.shared_attention or saved_cfg.embed_dim != cfg.embed_dim:
            raise ConfigError(
                f"init={init} is a {saved_cfg.arch} model (width {saved_cfg.embed_dim}, "
                f"{'shared' if saved_cfg.shared_attention else 'multiway'} attention) but model.arch is "
                f"{cfg.arch}; set model.arch={saved_cfg.arch}"
            )
    elif path.is_file():
        from mdm.export.unilm import load_unilm_checkpoint, strip_prefix, torchscale_to_mdm

        sd = torchscale_to_mdm(strip_prefix(load_unilm_checkpoint(path))[0], str(path))
    else:
        raise FileNotFoundError(f"init={init}: no such model directory or checkpoint file")
    pos = sd.get("vision_pos_embed.weight")
    if pos is not None and pos.shape[0] != model.vision_pos_embed.weight.shape[0]:
        sd["vision_pos_embed.weight"] = resize_vision_pos_table(pos, cfg.grid_size)
    if not cfg.normalize_output:
        sd = {k: v for k, v in sd.items() if not k.startswith("norm.")}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.startswith("norm.")]  # a fresh final norm is fine
    if missing or unexpected:
        raise ConfigError(
            f"init={init} does not fit model.arch={cfg.arch}: missing {missing[:6]}, unexpected {unexpected[:6]}"
        )
    log.info("backbone initialised from %s", init)
    return model


def load_pretraining_heads(model: torch.nn.Module, init: str) -> None:
    """Starts the task head from pretraining heads where the task says how (``TaskModel.PRETRAINED_HEADS``,
    e.g. retrieval's projections from ``heads.itc.*`` and its ITM head from ``heads.itm.*``), when ``init``
    is a model directory that has them. Each pretraining head (``heads.<name>.``) loads whole or not at
    all: a pretraining without ITM leaves a task's ITM head at its fresh init."""
    mapping = getattr(model, "PRETRAINED_HEADS", {})
    path = Path(init) / "heads.safetensors" if init not in ("", "scratch") else None
    if not mapping or path is None or not path.is_file():
        return
    from safetensors.torch import load_file

    saved = load_file(str(path))
    own = model.state_dict()
    groups: dict[str, dict[str, str]] = {}
    for ours, theirs in mapping.items():
        groups.setdefault(".".join(theirs.split(".")[:2]), {})[ours] = theirs
    for group, part in sorted(groups.items()):
        found = {  # a (1,) temperature from a ZeRO-3 consolidation fits a 0-dim one
            ours: saved[theirs].reshape(own[ours].shape)
            if saved[theirs].numel() == own[ours].numel()
            else saved[theirs]
            for ours, theirs in part.items()
            if theirs in saved
        }
        if not found:
            log.info("%s has no %s.*: that part of the task head starts fresh", path, group)
            continue
        if len(found) != len(part):
            missing = sorted(theirs for theirs in part.values() if theirs not in saved)
            raise ConfigError(f"init={init}: {path.name} has some of {group}.* but lacks {missing}")
        model.load_state_dict(found, strict=False)
        log.info("task head initialised from %s (%s)", path, ", ".join(sorted(part.values())))


def _steps_per_epoch(loader: EpochLoader, grad_accum: int) -> int:
    return max(loader.batches_per_epoch() // grad_accum, 1)


def _eval_hook(task, val_loader_fn, every: int):
    def hook(trainer: Trainer) -> None:
        if every and trainer.step % every == 0 and trainer.step < trainer.train.steps:
            with trainer.strategy.autocast():  # as training: DeepSpeed's 16-bit weights need it
                metrics = task.evaluate(trainer.model, val_loader_fn())
            trainer.sink.log(trainer.step, {f"val_{k}": v for k, v in metrics.items()})
            log.info("step %d: %s", trainer.step, metrics)

    return hook


def run_finetune(cfg, metrics_json: str | None = None) -> dict[str, float]:
    """Trains, evaluates on the validation split, saves ``<out_dir>/model``; returns the metrics."""
    from mdm.tasks.base import build_task
    from mdm.tasks.cli_common import load_text_tokenizer
    from mdm.tasks.io import save_task_model

    strategy = build_strategy(cfg.distributed)
    text_tok = load_text_tokenizer(cfg.text_tokenizer) if cfg.text_tokenizer else None
    task = build_task(cfg.task, cfg.data)
    torch.manual_seed(cfg.train.seed)
    model = task.build_model(load_backbone(cfg.init, cfg.model))
    load_pretraining_heads(model, cfg.init)
    if not cfg.optim.head_prefixes:
        cfg.optim.head_prefixes = list(model.HEAD_PREFIXES)
    train_set = task.build_dataset("train", text_tok)
    loader = EpochLoader(
        train_set,
        cfg.batch_size,
        task.collate,
        strategy.rank,
        strategy.world_size,
        cfg.train.seed,
        cfg.data.num_workers,
    )
    per_epoch = _steps_per_epoch(loader, cfg.train.grad_accum)
    if cfg.epochs > 0:
        cfg.train.steps = max(int(math.ceil(cfg.epochs * per_epoch)), 1)
    if cfg.warmup_epochs > 0:
        cfg.optim.warmup_steps = int(cfg.warmup_epochs * per_epoch)
    if cfg.freeze_backbone_epochs > 0:
        cfg.optim.freeze_backbone_steps = int(cfg.freeze_backbone_epochs * per_epoch)
    from mdm.train.optim import apply_trainable, build_optimizer

    apply_trainable(model, cfg.optim)
    optimizer = build_optimizer(model, cfg.optim, model.num_layers)
    strategy.configure(cfg.batch_size, cfg.train.grad_accum, cfg.optim.clip_grad)

    def val_loader():
        from torch.utils.data import DataLoader
        from torch.utils.data.distributed import DistributedSampler

        ds = task.build_dataset("val", text_tok)
        sampler = DistributedSampler(ds, shuffle=False) if strategy.world_size > 1 else None
        return DataLoader(
            ds,
            batch_size=cfg.eval_batch_size,
            sampler=sampler,
            collate_fn=task.collate,
            num_workers=cfg.data.num_workers,
        )

    trainer = Trainer(
        model,
        optimizer,
        strategy,
        loader,
        cfg.train,
        cfg.optim,
        cfg.logging,
        run_config=to_dict(cfg),
        hooks=[_eval_hook(task, val_loader, cfg.eval_every)],
    )
    trainer.fit()
    if trainer.step < cfg.train.steps:
        strategy.close()
        return {}
    with strategy.autocast():
        metrics = task.evaluate(trainer.model, val_loader())
    full = strategy.full_state_dict()
    if strategy.is_main:
        out = save_task_model(
            Path(cfg.train.out_dir) / "model",
            model,
            task,
            text_tokenizer=cfg.text_tokenizer or None,
            extra={"metrics": metrics, "init": cfg.init},
            state_dict=full,
        )
        print(
            f"{task.cfg.name}: " + "  ".join(f"{k}={v:.2f}" for k, v in metrics.items()) + f"\nmodel: {out}"
        )
        if metrics_json:
            Path(metrics_json).parent.mkdir(parents=True, exist_ok=True)
            Path(metrics_json).write_text(json.dumps(metrics, indent=2) + "\n")
    strategy.close()
    return metrics


def main(argv: list[str]) -> int:
    from mdm.tasks.config import FinetuneConfig

    p = argparse.ArgumentParser(
        prog="mdm finetune",
        description="Fine-tune a Multiway Transformer on a task.",
        epilog="Override any key: data.root=DIR init=runs/pretrain/model optim.lr=1e-4",
    )
    p.add_argument("--config", required=True, help="YAML config (see configs/finetune/)")
    p.add_argument("--metrics-json", default=None, help="also write the final metrics to this JSON file")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    args = p.parse_args(argv)
    try:
        cfg = load_config(FinetuneConfig, args.config, args.overrides)
        if args.print_config:
            print(dump_yaml(cfg))
            return 0
        from mdm.tasks.audio_classification import run_cross_validation, wants_cross_validation

        if wants_cross_validation(cfg):  # ESC-50 with data.fold=0: the five folds in turn
            run_cross_validation(cfg, run_finetune, args.metrics_json)
        else:
            run_finetune(cfg, args.metrics_json)
    except (ConfigError, FileNotFoundError) as e:
        print(f"mdm finetune: {e}", file=sys.stderr)
        return 2
    return 0
