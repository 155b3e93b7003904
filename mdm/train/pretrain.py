"""``mdm pretrain``: masked data modeling (MIM / MLM / MVLM, BEiT v2 [CLS] head, MAE) of a Multiway
Transformer on mixed WebDataset streams — one code path for a single process, ``torchrun`` and the
``deepspeed`` launcher.

Run it as::

    mdm pretrain --config configs/pretrain/vlmo_base_mdm.yaml [key=value ...]
    torchrun --nproc_per_node 8 -m mdm.cli pretrain --config ...       # DDP / ZeRO by config
    deepspeed --hostfile hosts -m mdm.cli pretrain --config ... distributed.zero_stage=3

The visual tokenizer is loaded frozen (eval, no grad), kept out of the optimizer and out of DDP/ZeRO;
it fills ``image_tokens`` for batches whose shards carry no precomputed codes. Objectives that need other
ranks' data (ITC's negatives, ITM's hard-negative candidates) get the collectives of
:mod:`mdm.distributed.ops` (:meth:`~mdm.objectives.PretrainModel.set_cross_rank`) under every strategy.
The acoustic tokenizer (``audio_tokenizer``, BEATs' targets) is held like the visual one and fills
``audio_tokens`` of audio batches.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mdm.config import ConfigError, dump_yaml, load_config, to_dict
from mdm.data.streams import PretrainDataConfig
from mdm.distributed.strategy import DistributedConfig, build_strategy
from mdm.models.config import ModelConfig
from mdm.objectives import CrossRank, ObjectivesConfig, build_pretrain_model, fill_visual_tokens
from mdm.train.flops import train_step_flops
from mdm.train.loop import TrainConfig, Trainer
from mdm.train.metrics import LoggingConfig
from mdm.train.optim import OptimConfig, apply_trainable, build_optimizer

log = logging.getLogger(__name__)


@dataclass
class PretrainConfig:
    """Schema of ``mdm pretrain`` (``configs/pretrain/*.yaml``).

    Attributes:
        model: the backbone (``arch`` preset + overrides).
        objectives: which objectives, their weights and heads.
        data: the streams (shards, batch sizes, masking, transforms).
        visual_tokenizer: directory of a saved visual tokenizer (``mdm tokenizer train``/``import``);
            empty when every image shard carries precomputed codes or no objective needs codes.
        text_tokenizer: directory of a saved text tokenizer (``mdm tokenizer train-text``).
        audio_tokenizer: directory of a saved acoustic tokenizer (``kind: acoustic_rp | acoustic_vqkd``),
            needed by the ``beats`` objective.
        init: start the backbone from this mdm model directory (e.g. VLMo's stage-wise schedule).
        optim: optimizer, schedule, layer decay, frozen parameters.
        train: steps, checkpoints, resume.
        distributed: strategy, ZeRO stage, precision.
        logging: metric sinks.
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    objectives: ObjectivesConfig = field(default_factory=ObjectivesConfig)
    data: PretrainDataConfig = field(default_factory=PretrainDataConfig)
    visual_tokenizer: str = ""
    text_tokenizer: str = ""
    audio_tokenizer: str = ""
    init: str = ""
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


def _load_tokenizers(cfg: PretrainConfig, device: torch.device):
    import mdm.tokenizers as T

    visual = None
    if cfg.visual_tokenizer:
        visual = T.load(cfg.visual_tokenizer, map_location=device)
        visual.eval().requires_grad_(False)
        if visual.codebook_size != cfg.objectives.codebook_size:
            raise ConfigError(
                f"objectives.codebook_size={cfg.objectives.codebook_size} but the visual tokenizer "
                f"{cfg.visual_tokenizer} has {visual.codebook_size} codes"
            )
    text = T.load(cfg.text_tokenizer) if cfg.text_tokenizer else None
    if text is not None and text.vocab_size > cfg.model.vocab_size:
        raise ConfigError(
            f"model.vocab_size={cfg.model.vocab_size} is smaller than the text tokenizer's "
            f"{text.vocab_size} ids ({cfg.text_tokenizer})"
        )
    return visual, text


def cross_rank() -> CrossRank:
    """The data-parallel collectives handed to the objectives (identity in one process)."""
    from mdm.distributed import ops

    return CrossRank(gather_with_grad=ops.all_gather_with_grad, gather=ops.all_gather, rank=ops.rank)


def _sampling_generator(model) -> torch.Generator | None:
    """ITM's random source (on the CPU: sampling there is cheap and device-independent), or None."""
    itm = model.objectives["itm"] if "itm" in model.objectives else None
    if itm is None:
        return None
    itm.generator = torch.Generator()
    return itm.generator


def _check_audio_tokenizer(cfg: PretrainConfig, tok: Any) -> None:
    if getattr(tok, "modality", "") != "audio":
        raise ConfigError(
            f"audio_tokenizer {cfg.audio_tokenizer} is a {tok.kind} tokenizer, not an acoustic one"
        )
    if tok.codebook_size != cfg.objectives.audio_codebook_size:
        raise ConfigError(
            f"objectives.audio_codebook_size={cfg.objectives.audio_codebook_size} but the acoustic tokenizer "
            f"{cfg.audio_tokenizer} has {tok.codebook_size} codes"
        )
    if (tok.patch_size, tok.mel_bins) != (cfg.model.audio_patch_size, cfg.model.audio_mel_bins):
        raise ConfigError(
            f"the acoustic tokenizer {cfg.audio_tokenizer} codes {tok.patch_size}-frame patches of {tok.mel_bins} "
            f"mel bins; the model has {cfg.model.audio_patch_size} / {cfg.model.audio_mel_bins}"
        )


def _load_audio_tokenizer(cfg: PretrainConfig, device: torch.device):
    import mdm.tokenizers as T

    if not cfg.audio_tokenizer:
        return None
    tok = T.load(cfg.audio_tokenizer, map_location=device)
    tok.eval().requires_grad_(False)
    _check_audio_tokenizer(cfg, tok)
    return tok


def _prepare_fn(
    visual,
    num_patches: int,
    streams: set[str],
    generator: torch.Generator | None = None,
    audio=None,
    audio_streams: set[str] = frozenset(),
):
    """Fills visual tokens of the ``streams`` batches (those whose objectives need codes) with the frozen
    tokenizer, acoustic tokens of the ``audio_streams`` batches with the frozen acoustic one, and
    re-seeds the objectives' ``generator`` from the training RNG (which checkpoints save and restore, so
    a resumed run draws the same hard negatives)."""
    from mdm.objectives import fill_audio_tokens

    def prepare(batches: dict[str, Any]) -> dict[str, Any]:
        if generator is not None:
            generator.manual_seed(int(torch.randint(0, 2**62, (1,)).item()))
        out = dict(batches)
        for stream in audio_streams:
            b = out.get(stream)
            if b is not None and b.get("audio_tokens") is None:
                if audio is None:
                    raise ConfigError(
                        f"the {stream} stream needs acoustic tokens and no audio_tokenizer is set"
                    )
                out[stream] = fill_audio_tokens(b, audio)
        for stream in streams:
            b = out.get(stream)
            if b is not None and b.get("image_tokens") is None:
                if visual is None:
                    raise ConfigError(
                        f"the {stream} stream has no precomputed image_tokens and no visual_tokenizer is set"
                    )
                out[stream] = fill_visual_tokens(b, visual, num_patches)
        return out

    return prepare


def _sequences(
    model_cfg: ModelConfig, batches: dict[str, Any], itc: bool = False, itm: bool = False
) -> list[tuple[int, int]]:
    """(batch size, encoder sequence length) of every backbone pass of a step: one per stream, plus ITC's
    image-alone and text-alone passes over the pair batch when ``itc`` and ITM's joint pass over 3B pairs
    when ``itm``."""
    seqs = []
    for kind, b in batches.items():
        if not isinstance(b, dict):
            continue
        n, bsz = 0, None
        if b.get("image") is not None:
            bsz = b["image"].shape[0]
            n += 1 + model_cfg.num_patches
        if b.get("audio") is not None:  # amae / beats encode the visible patches only
            bsz = b["audio"].shape[0]
            P = (b["audio"].shape[1] // model_cfg.audio_patch_size) * (
                model_cfg.audio_mel_bins // model_cfg.audio_patch_size
            )
            hidden = int(b["audio_mask"][0].sum()) if b.get("audio_mask") is not None else 0
            n += 1 + (P - hidden if kind == "audio" else P)
        if b.get("text") is not None:
            bsz = b["text"].shape[0]
            n += b["text"].shape[1]
        if bsz:
            seqs.append((bsz, n))
        if itc and kind == "pair" and b.get("image") is not None and b.get("text") is not None:
            seqs += [(bsz, 1 + model_cfg.num_patches), (bsz, b["text"].shape[1])]
        if itm and kind == "pair" and b.get("image") is not None and b.get("text") is not None:
            seqs.append((3 * bsz, 1 + model_cfg.num_patches + b["text"].shape[1]))
        if kind == "audio_text" and b.get("text") is not None:  # audio_itc: clip and caption apart
            seqs = seqs[:-1] + [(bsz, n - b["text"].shape[1]), (bsz, b["text"].shape[1])]
    return seqs


def _flops_fn(model_cfg: ModelConfig, itc: bool = False, itm: bool = False):
    return lambda batches: train_step_flops(model_cfg, _sequences(model_cfg, batches, itc, itm))


def _tokens_fn(model_cfg: ModelConfig, itc: bool = False, itm: bool = False):
    return lambda batches: sum(b * n for b, n in _sequences(model_cfg, batches, itc, itm))


def _samples_fn(batches: dict[str, Any]) -> int:
    total = 0
    for b in batches.values():
        if isinstance(b, dict):
            t = next((b[k] for k in ("image", "audio", "text") if b.get(k) is not None), None)
            total += int(t.shape[0]) if t is not None else 0
    return total


def build_run(cfg: PretrainConfig) -> Trainer:
    """Everything ``mdm pretrain`` builds before the loop starts."""
    from mdm.data.streams import build_pretrain_stream
    from mdm.models.io import from_pretrained

    strategy = build_strategy(cfg.distributed)
    visual, text = _load_tokenizers(cfg, strategy.device)
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    model = build_pretrain_model(cfg.model, cfg.objectives)
    if cfg.init:
        model.backbone.load_state_dict(from_pretrained(cfg.init).state_dict())
        log.info("backbone initialised from %s", cfg.init)
    model.set_cross_rank(cross_rank())  # ITC negatives and ITM candidates from every rank
    generator = _sampling_generator(model)
    frozen = apply_trainable(model, cfg.optim)
    if frozen:
        log.info("%d parameter tensors frozen by optim.trainable/optim.frozen", len(frozen))
    optimizer = build_optimizer(model, cfg.optim, cfg.model.depth)
    data = build_pretrain_stream(
        cfg.data,
        streams=model.streams(),
        text_tokenizer=text,
        model_cfg=cfg.model,
        rank=strategy.rank,
        world_size=strategy.world_size,
        seed=cfg.train.seed,
    )
    token_streams = {o.stream for o in model.objectives.values() if o.needs_visual_tokens}
    audio_streams = {o.stream for o in model.objectives.values() if o.needs_audio_tokens}
    audio_tok = _load_audio_tokenizer(cfg, strategy.device) if audio_streams else None
    strategy.configure(cfg.data.micro_batch_size(), cfg.train.grad_accum, cfg.optim.clip_grad)
    names = cfg.objectives.objectives
    return Trainer(
        model,
        optimizer,
        strategy,
        data,
        cfg.train,
        cfg.optim,
        cfg.logging,
        prepare=_prepare_fn(
            visual, cfg.model.num_patches, token_streams, generator, audio_tok, audio_streams
        ),
        flops_per_batch=_flops_fn(cfg.model, "itc" in names, "itm" in names),
        samples_per_batch=_samples_fn,
        tokens_per_batch=_tokens_fn(cfg.model, "itc" in names, "itm" in names),
        run_config=to_dict(cfg),
    )


def export_backbone(trainer: Trainer, cfg: PretrainConfig) -> Path | None:
    """Writes the pretrained backbone to ``<out_dir>/model`` (rank 0; gathers ZeRO-3 shards on all ranks).

    The pretraining heads (``heads.mim.*``, ``heads.mlm.*``, ``heads.itc.*``, ``heads.itm.*``,
    ``heads.audio_itc.*``) go beside it in ``heads.safetensors``: a retrieval fine-tuning starts from the
    ITC projections (and ITM head), and the demo's report
    predicts masked words and patches with the MLM and MIM heads.
    """
    from mdm.models.io import save_pretrained, save_safetensors_atomic
    from mdm.models.multiway import MultiwayTransformer

    full = trainer.strategy.full_state_dict()
    if not trainer.strategy.is_main:
        return None
    backbone = {k[len("backbone.") :]: v for k, v in full.items() if k.startswith("backbone.")}
    model = MultiwayTransformer(cfg.model)
    model.load_state_dict(backbone)
    out = save_pretrained(
        model,
        Path(cfg.train.out_dir) / "model",
        extra={"source": {"format": "mdm-pretrain", "step": trainer.step}},
    )
    heads = {k: v.contiguous() for k, v in full.items() if k.startswith("heads.")}
    if heads:
        save_safetensors_atomic(heads, out / "heads.safetensors")
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mdm pretrain",
        description="Masked data modeling pretraining of a Multiway Transformer (MIM / MLM / MVLM / MAE).",
        epilog="Any config key can be overridden: mdm pretrain --config x.yaml model.depth=4 optim.lr=1e-4",
    )
    p.add_argument("--config", required=True, help="YAML config (see configs/pretrain/)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = load_config(PretrainConfig, args.config, args.overrides)
    except (ConfigError, KeyError) as e:
        print(f"mdm pretrain: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(dump_yaml(cfg))
        return 0
    out = Path(cfg.train.out_dir)
    trainer = build_run(cfg)
    if trainer.strategy.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(dump_yaml(cfg))
    last = trainer.fit()
    if trainer.step >= cfg.train.steps:
        model_dir = export_backbone(trainer, cfg)
        if model_dir is not None:
            summary = ", ".join(f"{k}={v:.4g}" for k, v in last.items() if k.endswith(("_loss", "_acc")))
            print(f"pretraining done: step {trainer.step}; {summary}\nbackbone: {model_dir}")
    trainer.strategy.close()
    return 0
