"""Caption decoding cost per generated token: key/value cache vs the full forward at every step (CPU, fp32).

    .venv/bin/python benchmarks/caption_decode.py                    # tiny model, 224 px, 30 tokens
    .venv/bin/python benchmarks/caption_decode.py --arch beit3_base --img 224 --tokens 20 --rounds 1

Forced decoding (the same token sequence for both scorers, so both do the same number of steps) of a
batch of images; reports milliseconds per generated token (per batch) and the ratio. The cached scorer
runs the image once and then two tokens per step; the full one runs ``[image, text so far, [MASK]]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mdm.models import create_model  # noqa: E402
from mdm.tasks.caption_step import CachedScorer, FullScorer  # noqa: E402
from mdm.tasks.captioning import CaptioningModel  # noqa: E402


def decode_time(model: CaptioningModel, scorer_cls, image: torch.Tensor, tokens: int) -> float:
    """Seconds for ``tokens`` forced steps (scorer construction included: the image pass is a cost)."""
    B = image.shape[0]
    start = time.perf_counter()
    with torch.no_grad():
        scorer = scorer_cls(model.backbone, model.mlm_head, image, model.backbone.cfg.vocab_size - 1)
        seq = torch.zeros(B, 1, dtype=torch.long)
        for t in range(tokens):
            scorer.step(seq)
            seq = torch.cat([seq, torch.full((B, 1), 3 + t)], 1)
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--arch", default="beit3_tiny")
    p.add_argument("--img", type=int, default=224)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--tokens", type=int, default=30)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = CaptioningModel(create_model(args.arch, img_size=args.img)).eval()
    image = torch.randn(args.batch, 3, args.img, args.img)
    times: dict[str, list[float]] = {"cached": [], "full": []}
    decode_time(model, CachedScorer, image, 2)  # warm-up
    for _ in range(args.rounds):  # alternate, so drift on a shared machine hits both
        times["cached"].append(decode_time(model, CachedScorer, image, args.tokens))
        times["full"].append(decode_time(model, FullScorer, image, args.tokens))
    ms = {k: 1000 * statistics.median(v) / args.tokens for k, v in times.items()}
    n_image = 1 + (args.img // model.backbone.cfg.patch_size) ** 2
    print(
        f"{args.arch} {args.img}px ({n_image} image tokens), batch {args.batch}, {args.tokens} tokens, "
        f"{args.threads} thread(s): cached {ms['cached']:.2f} ms/token, full {ms['full']:.2f} ms/token, "
        f"speed-up {ms['full'] / ms['cached']:.2f}x"
    )


if __name__ == "__main__":
    main()
