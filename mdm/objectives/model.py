"""The pretraining model: backbone + shared heads + objectives, one batch per stream kind.

``PretrainModel(batches)`` runs every objective whose stream (``"image"``, ``"text"``, ``"pair"``) is in
``batches`` and returns all their entries plus ``"loss" = Σ weight[objective] · (each *_loss it
returned)``. The visual tokenizer is not part of it: the engine keeps the tokenizer frozen, outside the
optimizer and outside ZeRO, and fills ``image_tokens`` first (:func:`mdm.objectives.fill_visual_tokens`).

Parameter names: ``backbone.*`` (exported), ``heads.mim.*`` / ``heads.mlm.*`` (shared by MIM, MVLM and
the [CLS] head), ``heads.itc.*`` (ITC's projections and temperature), ``heads.itm.*`` (ITM's pooler and classifier),
``objectives.<name>.*`` (objective-private machinery: BEiT v2's extra blocks, the MAE decoder). Only ``backbone.*`` survives pretraining (:meth:`PretrainModel.pretrained_backbone_state_dict`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from mdm.models import MultiwayTransformer, build_model
from mdm.models.config import ModelConfig
from mdm.objectives.amae import AudioMaskedAutoencoder
from mdm.objectives.audio_contrastive import AudioITCHead, AudioTextContrastive
from mdm.objectives.base import STREAMS, CrossRank, Objective
from mdm.objectives.beats import MaskedAcousticModeling
from mdm.objectives.cls_pt import ClsMaskedImageModeling
from mdm.objectives.config import ObjectivesConfig
from mdm.objectives.contrastive import ImageTextContrastive, ITCHead
from mdm.objectives.heads import MIMHead, MLMHead
from mdm.objectives.itm import ImageTextMatching, ITMHead
from mdm.objectives.mae import MaskedAutoencoder
from mdm.objectives.masked import MaskedImageModeling, MaskedLanguageModeling, MaskedVisionLanguageModeling
from mdm.registry import Registry

#: Objective name → ``builder(model_cfg, obj_cfg, heads) -> Objective``; builders create the shared
#: heads they need in ``heads`` (a dict the PretrainModel then owns).
OBJECTIVES: Registry[Callable[[ModelConfig, ObjectivesConfig, dict[str, nn.Module]], Objective]] = Registry(
    "objective"
)


def _mim_head(cfg: ModelConfig, obj: ObjectivesConfig, heads: dict[str, nn.Module]) -> MIMHead:
    return heads.setdefault("mim", MIMHead(cfg.embed_dim, obj.codebook_size))  # type: ignore[return-value]


def _mlm_head(cfg: ModelConfig, obj: ObjectivesConfig, heads: dict[str, nn.Module]) -> MLMHead:
    if "mlm" not in heads:
        heads["mlm"] = MLMHead(cfg.embed_dim, cfg.vocab_size, obj.mlm_tie_embedding, obj.mlm_norm_eps)
    return heads["mlm"]  # type: ignore[return-value]


@OBJECTIVES.register("mim")
def _build_mim(cfg: ModelConfig, obj: ObjectivesConfig, heads: dict[str, nn.Module]) -> Objective:
    return MaskedImageModeling(_mim_head(cfg, obj, heads))


@OBJECTIVES.register("cls_mim")
def _build_cls_mim(cfg: ModelConfig, obj: ObjectivesConfig, heads: dict[str, nn.Module]) -> Objective:
    return ClsMaskedImageModeling(
        cfg,
        _mim_head(cfg, obj, heads),
        early_layer=obj.cls_pt_early_layer,
        head_layers=obj.cls_pt_layers,
        shared_head=obj.cls_pt_shared_head,
        codebook_size=obj.codebook_size,
    )


@OBJECTIVES.register("mlm")
def _build_mlm(cfg: ModelConfig, obj: ObjectivesConfig, heads: dict[str, nn.Module]) -> Objective:
    return MaskedLanguageModeling(_mlm_head(cfg, obj, heads))


@OBJECTIVES.register("mvlm")
def _build_mvlm(cfg: ModelConfig, obj: ObjectivesConfig, heads: dict[str, nn.Module]) -> Objective:
    return MaskedVisionLanguageModeling(_mim_head(cfg, obj, heads), _mlm_head(cfg, obj, heads))


@OBJECTIVES.register("itc")
def _build_itc(cfg: ModelConfig, obj: ObjectivesConfig, heads: dict[str, nn.Module]) -> Objective:
    head = heads.setdefault("itc", ITCHead(cfg.embed_dim))
    return ImageTextContrastive(head)  # type: ignore[arg-type]


@OBJECTIVES.register("itm")
def _build_itm(cfg: ModelConfig, obj: ObjectivesConfig, heads: dict[str, nn.Module]) -> Objective:
    head = heads.setdefault("itm", ITMHead(cfg.embed_dim))
    return ImageTextMatching(head)  # type: ignore[arg-type]


@OBJECTIVES.register("mae")
def _build_mae(cfg: ModelConfig, obj: ObjectivesConfig, heads: dict[str, nn.Module]) -> Objective:
    return MaskedAutoencoder(
        cfg,
        obj.mae_decoder_dim,
        obj.mae_decoder_depth,
        obj.mae_decoder_heads,
        obj.mae_mask_ratio,
        obj.mae_norm_pix_loss,
    )


@OBJECTIVES.register("amae")
def _build_amae(cfg: ModelConfig, obj: ObjectivesConfig, heads: dict[str, nn.Module]) -> Objective:
    return AudioMaskedAutoencoder(
        cfg,
        obj.amae_decoder_dim,
        obj.amae_decoder_depth,
        obj.amae_decoder_heads,
        obj.amae_decoder_attention,
        tuple(obj.amae_window),
        obj.amae_mask_ratio,
        obj.amae_norm_pix_loss,
    )


@OBJECTIVES.register("beats")
def _build_beats(cfg: ModelConfig, obj: ObjectivesConfig, heads: dict[str, nn.Module]) -> Objective:
    return MaskedAcousticModeling(
        cfg,
        obj.audio_codebook_size,
        obj.beats_predictor_dim,
        obj.beats_predictor_depth,
        obj.beats_predictor_heads,
        obj.beats_mask_ratio,
    )


@OBJECTIVES.register("audio_itc")
def _build_audio_itc(cfg: ModelConfig, obj: ObjectivesConfig, heads: dict[str, nn.Module]) -> Objective:
    head = heads.setdefault("audio_itc", AudioITCHead(cfg.embed_dim))
    return AudioTextContrastive(head)  # type: ignore[arg-type]


def _prefix_pattern(pattern: str, prefix: str, capture: bool = True) -> str:
    """``^layers\\.(\\d+)`` → ``^backbone\\.layers\\.(\\d+)``; with ``capture=False`` groups become
    non-capturing (timm turns every captured group into a number, so a stem pattern must capture none)."""
    body = pattern[1:] if pattern.startswith("^") else pattern
    if not capture:
        body = re.sub(r"(?<!\\)\((?!\?)", "(?:", body)
    return "^" + re.escape(prefix) + body


class PretrainModel(nn.Module):
    """Backbone, shared heads and objectives with their weights.

    Args:
        backbone: the Multiway Transformer that is pretrained (and exported).
        heads: heads shared between objectives (``"mim"``, ``"mlm"``), owned here.
        objectives: the objectives, each with a distinct ``name``.
        weights: ``name → weight`` (missing names weigh 1.0).
    """

    def __init__(
        self,
        backbone: MultiwayTransformer,
        heads: Mapping[str, nn.Module],
        objectives: Iterable[Objective],
        weights: Mapping[str, float] | None = None,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.heads = nn.ModuleDict(dict(heads))
        self.objectives = nn.ModuleDict()
        for objective in objectives:
            if objective.name in self.objectives:
                raise ValueError(f"two objectives are named {objective.name!r}")
            if objective.stream not in STREAMS:
                raise ValueError(f"objective {objective.name!r} reads unknown stream {objective.stream!r}")
            for needed in objective.reads:
                earlier = self.objectives[needed] if needed in self.objectives else None
                if earlier is None or not earlier.provides_context or earlier.stream != objective.stream:
                    raise ValueError(
                        f"objective {objective.name!r} reads the results of {needed!r}, which must come "
                        f"before it on the {objective.stream} stream"
                    )
            self.objectives[objective.name] = objective
        self.weights = {name: float((weights or {}).get(name, 1.0)) for name in self.objectives}

    def set_cross_rank(self, cross_rank: CrossRank) -> None:
        """Gives every objective the collectives of the data-parallel group (the engine calls this)."""
        for objective in self.objectives.values():
            objective.cross_rank = cross_rank

    def streams(self) -> set[str]:
        """The stream kinds some objective consumes."""
        return {o.stream for o in self.objectives.values()}

    def forward(self, batches: Mapping[str, Mapping[str, Any] | None]) -> dict[str, torch.Tensor]:
        """Runs the objectives on their streams.

        Args:
            batches: ``{"image": batch, "text": batch, "pair": batch}``; absent (or None) streams are
                skipped, together with the objectives that read them.

        Returns:
            every objective's entries and ``"loss"``, the weighted sum of the ``*_loss`` entries.
        """
        unknown = set(batches) - set(STREAMS)
        if unknown:
            raise KeyError(f"PretrainModel: unknown stream(s) {sorted(unknown)}; streams are {list(STREAMS)}")
        out: dict[str, torch.Tensor] = {}
        total: torch.Tensor | None = None
        context: dict[str, Any] = {}  # results objectives hand to later ones within this step
        for name, objective in self.objectives.items():
            batch = batches.get(objective.stream)
            if batch is None:
                continue
            shares = objective.provides_context or objective.reads
            result = (
                objective(self.backbone, batch, context=context)
                if shares
                else objective(self.backbone, batch)
            )
            for key, value in result.items():
                if key in out:
                    raise RuntimeError(
                        f"objective {name!r} returned {key!r}, which another objective returned"
                    )
                out[key] = value
                if key.endswith("_loss"):
                    term = self.weights[name] * value
                    total = term if total is None else total + term
        if total is None:
            raise ValueError(
                f"PretrainModel: none of the given streams {sorted(k for k, v in batches.items() if v is not None)} "
                f"is read by the objectives {list(self.objectives)} (they read {sorted(self.streams())})"
            )
        out["loss"] = total
        return out

    def check_visual_tokenizer(self, tokenizer: Any) -> None:
        """Raises ValueError when ``tokenizer`` cannot supply this model's targets: its
        ``codebook_size`` differs from the MIM head's, or its code grid from the backbone's patch grid.
        Call it once before training."""
        head = self.heads["mim"] if "mim" in self.heads else None
        if head is not None and int(tokenizer.codebook_size) != head.proj.out_features:
            raise ValueError(
                f"the visual tokenizer has {tokenizer.codebook_size} codes but the MIM head predicts "
                f"{head.proj.out_features} (objectives.codebook_size)"
            )
        grid = tokenizer.grid_size
        grid = tuple(grid) if isinstance(grid, (tuple, list)) else (grid, grid)
        g = self.backbone.cfg.grid_size
        if grid != (g, g):
            raise ValueError(
                f"the visual tokenizer's code grid is {grid[0]}x{grid[1]} but the backbone has {g}x{g} patches "
                f"(img_size {self.backbone.cfg.img_size}, patch_size {self.backbone.cfg.patch_size})"
            )

    def pretrained_backbone_state_dict(self) -> dict[str, torch.Tensor]:
        """The backbone weights alone, with the backbone's own key names (what gets exported)."""
        return self.backbone.state_dict()

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Backbone exemptions plus each objective's (e.g. the MAE mask token), with full names."""
        names = {f"backbone.{n}" for n in self.backbone.no_weight_decay()}
        for name, objective in self.objectives.items():
            names |= {f"objectives.{name}.{n}" for n in objective.no_weight_decay()}
        return names

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """The backbone's groups under ``backbone.``; heads and objective modules form the last group."""
        inner = self.backbone.group_matcher(coarse)
        out: dict[str, Any] = {}
        for key, spec in inner.items():
            if isinstance(spec, str):
                out[key] = _prefix_pattern(spec, "backbone.", capture=key != "stem")
            else:
                out[key] = [(_prefix_pattern(p, "backbone."), g) for p, g in spec]
        # A group of its own after every block (timm merges a (99999,) suffix into the previous group).
        out["heads"] = r"^(?:heads|objectives)\."
        return out

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Delegates to the backbone."""
        self.backbone.set_grad_checkpointing(enable)

    @property
    def num_layers(self) -> int:
        return self.backbone.num_layers


def build_pretrain_model(
    model_cfg: ModelConfig, obj_cfg: ObjectivesConfig, backbone: MultiwayTransformer | None = None
) -> PretrainModel:
    """Builds the backbone (unless given, e.g. loaded with ``from_pretrained``), heads and objectives.

    Args:
        model_cfg: the backbone architecture.
        obj_cfg: the objectives section.
        backbone: an existing backbone to continue pretraining; its config must equal ``model_cfg``.
    """
    obj_cfg.validate()
    if backbone is None:
        backbone = build_model(model_cfg)
    elif backbone.cfg != model_cfg:
        raise ValueError("build_pretrain_model: the given backbone's config differs from model_cfg")
    heads: dict[str, nn.Module] = {}
    objectives = [OBJECTIVES.get(name)(model_cfg, obj_cfg, heads) for name in obj_cfg.objectives]
    return PretrainModel(backbone, heads, _providers_first(objectives), obj_cfg.weights)


def _providers_first(objectives: list[Objective]) -> list[Objective]:
    """The objectives in their listed order, except that one reading another's results (ITM reads
    ITC's) moves after it."""
    names = {o.name for o in objectives}
    ordered: list[Objective] = []
    pending = list(objectives)
    while pending:
        placed = {o.name for o in ordered}
        ready = next((o for o in pending if all(r in placed or r not in names for r in o.reads)), pending[0])
        ordered.append(ready)
        pending.remove(ready)
    return ordered
