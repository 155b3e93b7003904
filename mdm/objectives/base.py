"""What every pretraining objective shares: the :class:`Objective` interface, masked cross-entropy and
batch checks.

An objective is an ``nn.Module`` whose ``forward(backbone, batch)`` runs the backbone on one batch of one
stream kind (``"image"``, ``"text"`` or ``"pair"``, see ``docs/ARCHITECTURE.md``) and returns a dict of
scalar tensors ``{"<name>_loss", "<name>_acc", "<name>_count", ...}``. Cross-entropy is taken over the
masked positions only, as in BEiT (Bao et al., 2022) and BERT (Devlin et al., 2019); the masked rows are
gathered *before* the output projection so the vocabulary-sized matmul runs on (M, D), not (B, N, D).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

#: The stream kinds a pretraining step may carry, one batch each (``audio`` / ``audio_text``: clips and
#: audio-caption pairs, see docs/audio.md).
STREAMS = ("image", "text", "pair", "audio", "audio_text")


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _rank_zero() -> int:
    return 0


@dataclass(frozen=True)
class CrossRank:
    """The cross-rank collectives an objective may use, injected by the engine.

    Objectives never talk to the process group themselves (``docs/ARCHITECTURE.md``); the engine hands them these
    functions instead (``mdm.train.pretrain`` wires :mod:`mdm.distributed.ops`). The default is one
    process: every gather is the identity and the rank is 0, so an objective computes the same thing in
    a unit test as on one rank.

    Attributes:
        gather_with_grad: (B_r, ...) → (Σ_r B_r, ...) in rank order; its backward sums the gradients
            over ranks and returns this rank's slice (open_clip's convention).
        gather: the same concatenation without a graph (inputs, sampled indices...).
        rank: this process's rank (called at every use, so the process group may start later).
    """

    gather_with_grad: Callable[[torch.Tensor], torch.Tensor] = _identity
    gather: Callable[[torch.Tensor], torch.Tensor] = _identity
    rank: Callable[[], int] = _rank_zero

    def offset(self, rows: int, device: torch.device) -> int:
        """Index of this rank's first row in a gathered tensor whose ranks hold ``rows`` rows each
        (ranks may hold different numbers: the counts are gathered)."""
        counts = self.gather(torch.tensor([rows], device=device))  # (world,)
        return int(counts[: self.rank()].sum().item())


#: One process: no communication.
LOCAL = CrossRank()


class Objective(nn.Module):
    """Base class of pretraining objectives.

    Subclasses set ``name`` (the prefix of the returned keys) and ``stream`` (which batch they consume)
    and implement ``forward(backbone, batch) -> dict[str, Tensor]``. Heads that several objectives share
    (the MIM and MLM heads) are held *by reference* with :meth:`share` and are registered once, by
    :class:`mdm.objectives.PretrainModel`; parameters an objective alone uses (BEiT v2's extra layers,
    the MAE decoder) are ordinary submodules.
    """

    name: ClassVar[str] = ""
    stream: ClassVar[str] = ""
    #: Whether the batch must carry ``image_tokens`` (visual codes from the frozen tokenizer).
    needs_visual_tokens: ClassVar[bool] = False
    #: Whether the batch must carry ``audio_tokens`` (acoustic codes from the frozen acoustic tokenizer).
    needs_audio_tokens: ClassVar[bool] = False
    #: Whether ``forward`` takes ``context=`` and stores results other objectives of the same step read
    #: (``context[self.name]``), e.g. ITC's similarity matrix for ITM's hard negatives.
    provides_context: ClassVar[bool] = False
    #: Names of objectives whose same-step results (``context[name]``) ``forward`` reads; they run first,
    #: on the same stream (:class:`mdm.objectives.PretrainModel` checks and orders them).
    reads: ClassVar[tuple[str, ...]] = ()
    #: Collectives across data-parallel ranks; the engine sets the real ones
    #: (:meth:`mdm.objectives.PretrainModel.set_cross_rank`).
    cross_rank: CrossRank = LOCAL

    def share(self, attr: str, module: nn.Module) -> None:
        """Stores ``module`` as ``self.<attr>`` without registering it as a submodule.

        Its parameters therefore appear once in the enclosing model's ``state_dict`` (under the owner's
        name), not once per objective that uses it. The owner must move it (``.to``) and switch its
        train/eval mode; :class:`PretrainModel` does.
        """
        object.__setattr__(self, attr, module)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Names (relative to this module) of parameters exempt from weight decay."""
        return set()

    def forward(self, backbone: nn.Module, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        raise NotImplementedError


def masked_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean cross-entropy, accuracy and count over already-gathered masked positions.

    Args:
        logits: (M, V) scores of the M masked positions.
        labels: (M,) targets.

    Returns:
        ``(loss, acc, count)``: ``loss`` keeps the graph (and is an exact 0 connected to the head when
        ``M == 0``, so every head parameter still receives a gradient); ``acc`` and ``count`` are
        detached float scalars.
    """
    count = labels.numel()
    loss = F.cross_entropy(logits.float(), labels, reduction="sum") / max(count, 1)
    with torch.no_grad():
        correct = (logits.argmax(dim=-1) == labels).sum().float()
        acc = correct / max(count, 1)
    return loss, acc, torch.tensor(float(count), device=logits.device)


def entries(name: str, loss: torch.Tensor, acc: torch.Tensor, count: torch.Tensor) -> dict[str, torch.Tensor]:
    """``{"<name>_loss", "<name>_acc", "<name>_count"}``."""
    return {f"{name}_loss": loss, f"{name}_acc": acc, f"{name}_count": count}


def require(batch: Mapping[str, Any], keys: tuple[str, ...], who: str) -> list[torch.Tensor]:
    """The tensors ``batch[k]`` for ``k`` in ``keys``; a missing key raises ``KeyError`` naming the
    objective and the keys the batch does have."""
    missing = [k for k in keys if batch.get(k) is None]
    if missing:
        hint = ""
        if "image_tokens" in missing:
            hint = (
                "; visual tokens come from the shards or from mdm.objectives.fill_visual_tokens "
                "(the frozen tokenizer) before the model is called"
            )
        raise KeyError(f"{who}: batch lacks {missing} (it has {sorted(batch)}){hint}")
    return [batch[k] for k in keys]


def check_shape(t: torch.Tensor, shape: tuple[int, ...], key: str, who: str) -> None:
    """Raises ``ValueError`` naming ``key`` when ``t.shape != shape``."""
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{who}: batch[{key!r}] has shape {tuple(t.shape)}, expected {tuple(shape)}")


def check_image_batch(
    image: torch.Tensor,
    image_mask: torch.Tensor,
    image_tokens: torch.Tensor | None,
    patch_size: int,
    who: str,
) -> int:
    """Checks that mask and visual codes match the image's patch grid; returns the patch count P."""
    B, _, H, W = image.shape
    P = (H // patch_size) * (W // patch_size)
    check_shape(image_mask, (B, P), "image_mask", who)
    if image_mask.dtype != torch.bool:
        raise ValueError(f"{who}: batch['image_mask'] must be bool, got {image_mask.dtype}")
    if image_tokens is not None:
        check_shape(image_tokens, (B, P), "image_tokens", who)
    return P
