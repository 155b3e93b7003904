"""Pretraining step throughput (MIM + MLM + MVLM) and the data pipeline's own rate, CPU fp32.

    .venv/bin/python benchmarks/pretrain_throughput.py [--sizes tiny base] [--steps 5] [--workers 2]

For each size: builds the real ``PretrainModel`` and optimizer, feeds batches produced by the real
``PretrainStream`` (rendered demo scenes written as shards, SentencePiece text, block-wise masks,
precomputed codes), and times (a) optimizer steps on a fixed batch (model only) and (b) producing batches
from the stream (data only). The ratio data/model must stay well above 1: the pipeline must never be the
bottleneck. Prints samples/s, model TFLOP/s and MFU against a measured fp32 matmul peak.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mdm.data.streams import PretrainDataConfig, SourceConfig, StreamConfig, build_pretrain_stream  # noqa: E402
from mdm.models.config import make_config  # noqa: E402
from mdm.objectives import ObjectivesConfig, build_pretrain_model  # noqa: E402
from mdm.train.loop import measure_matmul_tflops  # noqa: E402
from mdm.train.optim import OptimConfig, build_optimizer  # noqa: E402
from mdm.train.pretrain import _flops_fn  # noqa: E402
from tests.pretrain_fixtures import build_world  # noqa: E402

SIZES = {  # arch, image size, patch, batch per stream, text length
    "tiny": ("vlmo_tiny", 64, 16, 8, 32),
    "base": ("vlmo_base", 224, 16, 2, 64),
}


def _data_cfg(world: dict, batch: int, text_len: int, workers: int) -> PretrainDataConfig:
    root = world["root"]
    src = lambda kind: [SourceConfig(shards=[f"{root}/shards/{kind}"])]  # noqa: E731
    return PretrainDataConfig(
        image=StreamConfig(sources=src("image"), batch_size=batch),
        text=StreamConfig(sources=src("text"), batch_size=batch, max_text_len=text_len),
        pair=StreamConfig(sources=src("pair"), batch_size=batch, max_text_len=text_len),
        num_workers=workers,
        split="resample",
        min_mask_patches=4,
    )


def bench(size: str, steps: int, workers: int, world: dict, peak: float) -> dict:
    import mdm.tokenizers as T

    arch, img, patch, batch, text_len = SIZES[size]
    text = T.load(world["spm"])
    cfg = make_config(arch, img_size=img, patch_size=patch, vocab_size=max(text.vocab_size, 64))
    model = build_pretrain_model(cfg, ObjectivesConfig(codebook_size=32))
    opt = build_optimizer(model, OptimConfig(), cfg.depth)
    stream = build_pretrain_stream(_data_cfg(world, batch, text_len, workers), model.streams(), text, cfg)
    fixed = next(stream)
    for b in fixed.values():  # random codes stand in for the frozen tokenizer (not part of the step)
        if "image_mask" in b:
            b["image_tokens"] = torch.randint(0, 32, b["image_mask"].shape)
    samples = sum((b["image"] if "image" in b else b["text"]).shape[0] for b in fixed.values())
    flops = _flops_fn(cfg)(fixed)

    def step():
        loss = model(fixed)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    t_model = statistics.median(times)
    n_data = max(steps * 4, 20)
    t = time.perf_counter()
    for _ in range(n_data):
        next(stream)
    t_data = (time.perf_counter() - t) / n_data
    return {
        "size": size,
        "samples": samples,
        "model_samples_s": samples / t_model,
        "data_samples_s": samples / t_data,
        "ratio": t_model / t_data,
        "tflops": flops / t_model / 1e12,
        "mfu": flops / t_model / 1e12 / peak,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", default=["tiny", "base"], choices=list(SIZES))
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args()
    peak = measure_matmul_tflops(2048)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32 matmul peak {peak * 1e3:.1f} GFLOP/s"
    )
    with tempfile.TemporaryDirectory() as tmp:
        world = build_world(Path(tmp), n_images=96, img_size=224)
        print(
            f"{'size':<6}{'samples/step':>13}{'model samples/s':>17}{'data samples/s':>16}{'data/model':>12}"
            f"{'GFLOP/s':>10}{'MFU':>7}"
        )
        for size in args.sizes:
            r = bench(size, args.steps, args.workers, world, peak)
            print(
                f"{r['size']:<6}{r['samples']:>13}{r['model_samples_s']:>17.1f}{r['data_samples_s']:>16.1f}"
                f"{r['ratio']:>11.1f}x{r['tflops'] * 1e3:>10.1f}{r['mfu']:>7.0%}"
            )


if __name__ == "__main__":
    main()
