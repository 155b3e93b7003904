"""Do the codes mean something? A linear probe on the bag of codes of labelled images.

A tokenizer whose codes stand for content lets a linear classifier read an image's labels from the
histogram of its codes alone (the *bag of codes*: position thrown away). The built-in labelled set is
the demo world (:mod:`mdm.data.demo.scenes`) with one object per scene, so every image has one shape
(4 classes), one colour (6) and one (colour, shape) object (24); any folder of class sub-folders works
too (``<root>/<class>/<image>``).

The probe is multinomial logistic regression in torch (full batch, L-BFGS, L2 penalty), fitted on a
training split and scored on a held-out split; accuracy is reported per label set. A baseline that
needs no training, :class:`PixelKMeans`, quantises raw patch pixels with a k-means codebook of the same
size — what a tokenizer has to beat to be more than a colour histogram.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = [
    "LabelledImages",
    "PixelKMeans",
    "bag_of_codes",
    "demo_probe_sets",
    "folder_probe_set",
    "fit_linear_probe",
    "probe_codes",
]

Encoder = Callable[[torch.Tensor], torch.Tensor]  # images (B, 3, H, W) in [0, 1] → codes (B, h, w)


@dataclass
class LabelledImages:
    """Images with one or more label sets.

    Attributes:
        images: float (N, 3, H, W) in [0, 1].
        labels: label-set name → long (N,) class indices.
        classes: label-set name → class names.
    """

    images: torch.Tensor
    labels: dict[str, torch.Tensor]
    classes: dict[str, list[str]]


def demo_probe_sets(n: int, size: int, seed: int) -> LabelledImages:
    """``n`` single-object demo scenes at ``size`` px labelled with shape, colour and object.

    Args:
        n: number of images.
        size: side of the rendered images.
        seed: scenes are a pure function of ``(seed, index)``.
    """
    from mdm.data.demo.scenes import COLOURS, SHAPES, make_scene, render
    from mdm.tokenizers.data import to_tensor

    colours = list(COLOURS)
    scenes = [make_scene(random.Random(f"mdm-probe:{seed}:{i}"), max_objects=1) for i in range(n)]
    images = torch.stack([to_tensor(render(s, size=size)) for s in scenes])
    shape = torch.tensor([SHAPES.index(s.objects[0].shape) for s in scenes])
    colour = torch.tensor([colours.index(s.objects[0].colour) for s in scenes])
    return LabelledImages(
        images,
        {"shape": shape, "colour": colour, "object": colour * len(SHAPES) + shape},
        {"shape": list(SHAPES), "colour": colours, "object": [f"{c} {s}" for c in colours for s in SHAPES]},
    )


def folder_probe_set(root: str, size: int) -> LabelledImages:
    """Images under ``<root>/<class>/`` resized (whole) to ``size``, labelled by their sub-folder."""
    from pathlib import Path

    from PIL import Image

    from mdm.tokenizers.data import decode_image, list_image_files, to_tensor

    dirs = sorted(d for d in Path(root).iterdir() if d.is_dir())
    if len(dirs) < 2:
        raise ValueError(f"{root}: a probe folder needs at least two class sub-folders")
    images, labels = [], []
    for k, d in enumerate(dirs):
        for path in list_image_files([str(d)]):
            images.append(to_tensor(decode_image(path).resize((size, size), Image.Resampling.BICUBIC)))
            labels.append(k)
    return LabelledImages(
        torch.stack(images), {"class": torch.tensor(labels)}, {"class": [d.name for d in dirs]}
    )


def bag_of_codes(codes: torch.Tensor, codebook_size: int) -> torch.Tensor:
    """Codes (N, h, w) → per-image code frequencies (N, codebook_size), each row summing to 1."""
    flat = codes.reshape(codes.shape[0], -1)  # (N, h*w)
    bags = torch.zeros(flat.shape[0], codebook_size)
    bags.scatter_add_(1, flat.long(), torch.ones_like(flat, dtype=torch.float))
    return bags / flat.shape[1]


def fit_linear_probe(
    x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor,
    l2: float = 1e-3, iters: int = 200,
) -> float:  # fmt: skip
    """Multinomial logistic regression on ``x_train`` (features standardised on the training split);
    returns the accuracy on ``x_test``. Deterministic (zero init, full-batch L-BFGS)."""
    mean, std = x_train.mean(0), x_train.std(0).clamp_min(1e-6)
    xtr, xte = (x_train - mean) / std, (x_test - mean) / std
    classes = int(max(y_train.max(), y_test.max())) + 1
    w = torch.zeros(xtr.shape[1], classes, requires_grad=True)
    b = torch.zeros(classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=iters, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(xtr @ w + b, y_train) + l2 * w.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        return float(((xte @ w + b).argmax(1) == y_test).float().mean())


@torch.no_grad()
def probe_codes(
    encode: Encoder, codebook_size: int, data: LabelledImages, train_fraction: float = 0.5,
    batch_size: int = 128,
) -> dict[str, float]:  # fmt: skip
    """Linear-probe accuracy of every label set of ``data`` from the bag of codes of ``encode``.

    The first ``train_fraction`` of the images fit the probe, the rest score it.

    Returns:
        ``{"probe_<label set>": accuracy}``.
    """
    codes = torch.cat(
        [encode(data.images[i : i + batch_size]) for i in range(0, len(data.images), batch_size)]
    )
    bags = bag_of_codes(codes.cpu(), codebook_size)
    n = round(train_fraction * len(bags))
    return {
        f"probe_{name}": fit_linear_probe(bags[:n], y[:n], bags[n:], y[n:]) for name, y in data.labels.items()
    }


class PixelKMeans:
    """The baseline tokenizer: k-means over raw patch pixels, one code per ``patch × patch`` cell.

    Args:
        codebook_size: number of centroids.
        patch_size: side of a patch in pixels of the images it is fitted on.
        iters: Lloyd iterations.
        seed: seed of the k-means++ initialisation.
    """

    def __init__(self, codebook_size: int, patch_size: int, iters: int = 25, seed: int = 0) -> None:
        self.codebook_size, self.patch_size, self.iters, self.seed = codebook_size, patch_size, iters, seed
        self.centroids: torch.Tensor | None = None

    def _patches(self, images: torch.Tensor) -> torch.Tensor:
        p = self.patch_size
        x = F.unfold(images, kernel_size=p, stride=p)  # (B, 3*p*p, h*w)
        return x.transpose(1, 2)  # (B, h*w, 3*p*p)

    def fit(self, images: torch.Tensor) -> PixelKMeans:
        """Fits the codebook on the patches of ``images`` (N, 3, H, W) in [0, 1]."""
        x = self._patches(images).reshape(-1, 3 * self.patch_size**2)  # (M, D)
        g = torch.Generator().manual_seed(self.seed)
        c = x[torch.randint(len(x), (1,), generator=g)]
        for _ in range(1, self.codebook_size):  # k-means++ seeding
            d = torch.cdist(x, c).min(1).values.pow(2)
            c = torch.cat([c, x[torch.multinomial(d + 1e-12, 1, generator=g)]])
        for _ in range(self.iters):
            assign = torch.cdist(x, c).argmin(1)
            sums = torch.zeros_like(c).index_add_(0, assign, x)
            counts = torch.bincount(assign, minlength=len(c)).unsqueeze(1)
            c = torch.where(counts > 0, sums / counts.clamp_min(1), c)
        self.centroids = c
        return self

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Codes (B, h, w) of images (B, 3, H, W) of the fitted size."""
        if self.centroids is None:
            raise RuntimeError("PixelKMeans.encode before fit")
        b, _, h, w = images.shape
        x = self._patches(images)  # (B, h*w, D)
        codes = torch.cdist(x.reshape(-1, x.shape[-1]), self.centroids).argmin(1)
        return codes.view(b, h // self.patch_size, w // self.patch_size)
