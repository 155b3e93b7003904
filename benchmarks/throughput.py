"""Train-step throughput of mdm's Multiway Transformer against torchscale's BEiT3 (CPU, fp32).

    .venv/bin/python benchmarks/throughput.py            # 5 alternating rounds, 4 pairs, 224 px, 64 tokens
    .venv/bin/python benchmarks/throughput.py --quick    # a smoke run (~2 min on a quiet machine)
    .venv/bin/python benchmarks/throughput.py --cpu-time # 1 thread, process CPU time (busy machine)
    .venv/bin/python benchmarks/throughput.py --device cuda --precision bf16 --batch 32   # MFU vs bf16 peak

Each step is forward + backward of the backbone on a batch of image+text pairs (the fusion-encoder
pass of VQAv2/NLVR2 fine-tuning and of masked VL modeling), loss = mean of squared outputs. The models
run in alternating rounds in one process (the machine is shared, so numbers drift; medians are
reported). ``beit3_base`` gets torchscale's weights, and its outputs are checked against torchscale's
before timing. ``vlmo_base`` is a different architecture (shared attention: fewer attention parameters,
VL-FFN in the top 2 layers) and is timed against the same torchscale model.

Achieved GFLOP/s uses the analytic model FLOPs of :mod:`mdm.train.flops` (patch embedding and norms
excluded, padded positions counted as the dense computation would run them), and is compared with the
fp32 matmul peak measured here with a large square ``torch.mm`` — on CUDA with the device's bf16 peak
(``mdm.train.loop.BF16_PEAK_TFLOPS``, or ``--peak-tflops``). mdm skips the padded text tokens
(``ModelConfig.unpad``); ``--mdm-padded`` times its padded computation instead.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mdm.export.unilm import mdm_to_torchscale  # noqa: E402
from mdm.models import create_model  # noqa: E402
from mdm.models.config import make_config  # noqa: E402
from mdm.train.flops import train_step_flops  # noqa: E402
from mdm.train.loop import device_peak_tflops  # noqa: E402


@dataclass
class Batch:
    image: torch.Tensor  # (B, 3, H, W)
    text: torch.Tensor  # (B, T)
    padding: torch.Tensor  # (B, T) True at padding

    @property
    def keep(self) -> torch.Tensor:
        """(B, N, 1) float, 1 at real positions: the loss weight."""
        n_vision = self.image.shape[0], 1 + (self.image.shape[-1] // 16) ** 2
        ones = torch.ones(n_vision, dtype=torch.bool, device=self.image.device)
        return torch.cat([ones, ~self.padding], dim=1).unsqueeze(-1).float()

    def to(self, device: torch.device) -> Batch:
        return Batch(self.image.to(device), self.text.to(device), self.padding.to(device))


def make_batch(batch: int, img: int, text_len: int, vocab: int, padded: bool) -> Batch:
    g = torch.Generator().manual_seed(0)
    pad = torch.zeros(batch, text_len, dtype=torch.bool)
    if padded:  # real captions are shorter than the 64-token budget: pad the tail of some
        for i in range(batch):
            length = text_len - (i * text_len) // (2 * batch)
            pad[i, length:] = True
    return Batch(
        torch.randn(batch, 3, img, img, generator=g),
        torch.randint(3, vocab, (batch, text_len), generator=g),
        pad,
    )


def build_torchscale(img: int) -> torch.nn.Module:
    """torchscale BEiT3 base as unilm/beit3 builds it (reference notes §1.2, §1.5)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torchscale.architecture.config import EncoderConfig
        from torchscale.model.BEiT3 import BEiT3

    cfg = EncoderConfig(
        img_size=img, patch_size=16, vocab_size=64010, multiway=True, layernorm_embedding=False,
        normalize_output=True, no_output_layer=True, drop_path_rate=0.0, encoder_embed_dim=768,
        encoder_attention_heads=12, encoder_ffn_embed_dim=3072, encoder_layers=12,
    )  # fmt: skip
    return BEiT3(cfg)


AMP: torch.dtype | None = None  # autocast dtype (--precision bf16 on CUDA)


def _autocast(device: torch.device):
    return torch.autocast(device.type, dtype=AMP) if AMP is not None else contextlib.nullcontext()


def mdm_step(model: torch.nn.Module, b: Batch) -> Callable[[], None]:
    keep = b.keep  # the loss reads real positions only (mdm returns 0 at padding, torchscale does not)

    def step() -> None:
        model.zero_grad(set_to_none=True)
        with _autocast(b.image.device):
            out = model(image=b.image, text=b.text, text_padding_mask=b.padding)
        (out.float().square() * keep).mean().backward()
        _sync(b.image.device)

    return step


def torchscale_step(model: torch.nn.Module, b: Batch) -> Callable[[], None]:
    keep = b.keep

    def step() -> None:
        model.zero_grad(set_to_none=True)
        with _autocast(b.image.device):
            out = model(textual_tokens=b.text, visual_tokens=b.image, text_padding_position=b.padding)
        (out["encoder_out"].float().square() * keep).mean().backward()
        _sync(b.image.device)

    return step


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


CLOCK: Callable[[], float] = time.perf_counter


def matmul_peak(n: int = 2048, reps: int = 3) -> float:
    """fp32 GFLOP/s of the best of ``reps`` square ``torch.mm`` calls of size ``n``."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(reps):
        t = CLOCK()
        torch.mm(a, b)
        best = min(best, CLOCK() - t)
    return 2 * n**3 / best / 1e9


def counted_flops(step: Callable[[], None]) -> float:
    """FLOPs of one step as counted by ``torch.utils.flop_counter`` (matmuls, convolutions, attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    return float(counter.get_total_flops())


def timed(step: Callable[[], None], steps: int) -> float:
    t = CLOCK()
    for _ in range(steps):
        step()
    return CLOCK() - t


def check_outputs(ours: torch.nn.Module, ref: torch.nn.Module, b: Batch) -> float:
    """Max abs difference of the encoder outputs at non-padding positions (eval mode, no grad)."""
    ours.eval(), ref.eval()
    with torch.no_grad():
        a = ours(image=b.image, text=b.text, text_padding_mask=b.padding)
        r = ref(textual_tokens=b.text, visual_tokens=b.image, text_padding_position=b.padding)["encoder_out"]
    ours.train(), ref.train()
    keep = torch.cat([torch.ones(a.shape[0], a.shape[1] - b.text.shape[1], dtype=torch.bool), ~b.padding], 1)
    return (a - r).abs()[keep].max().item()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["beit3_base", "vlmo_base"], help="mdm presets to time")
    p.add_argument("--rounds", type=int, default=5, help="alternating timed rounds per model")
    p.add_argument("--steps", type=int, default=2, help="train steps per round")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per model first (>= 1)")
    p.add_argument("--batch", type=int, default=4, help="image+text pairs per step")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--text-len", type=int, default=64)
    p.add_argument("--no-padding", action="store_true", help="all text tokens real (no padding mask)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument(
        "--cpu-time",
        action="store_true",
        help="one thread, timed by process CPU time: robust to other processes on a shared machine",
    )
    p.add_argument("--quick", action="store_true", help="smoke run: 2 rounds of 1 step, batch 2")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="autocast dtype on CUDA")
    p.add_argument("--peak-tflops", type=float, default=0.0, help="MFU denominator (default: see docs)")
    p.add_argument("--mdm-padded", action="store_true", help="mdm computes padded tokens too (unpad off)")
    args = p.parse_args(argv)
    if args.cpu_time:
        args.threads = 1
    if args.quick:
        args.rounds, args.steps, args.batch = 2, 1, 2
    args.warmup = max(args.warmup, 1)
    return args


def run_rounds(steps: dict[str, Callable[[], None]], args: argparse.Namespace) -> dict[str, list[float]]:
    """Samples/s per round for each step function; the order alternates every round. Also times the
    matmul peak between rounds (key ``"peak"``, GFLOP/s)."""
    rates: dict[str, list[float]] = {name: [] for name in steps}
    rates["peak"] = []
    names = list(steps)
    for r in range(args.rounds):
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            rates[name].append(args.steps * args.batch / timed(steps[name], args.steps))
        rates["peak"].append(matmul_peak())
        summary = ", ".join(f"{n} {rates[n][-1]:.2f}" for n in names)
        print(
            f"round {r + 1}/{args.rounds}: {summary} samples/s; matmul {rates['peak'][-1]:.0f} GFLOP/s",
            flush=True,
        )
    return rates


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cpu_time:
        global CLOCK
        CLOCK = time.process_time
    torch.manual_seed(0)
    device = torch.device(args.device)
    global AMP
    AMP = torch.bfloat16 if args.precision == "bf16" and device.type == "cuda" else None
    b = make_batch(args.batch, args.img_size, args.text_len, 64010, not args.no_padding).to(device)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
        f"{torch.backends.cpu.get_cpu_capability()}; batch {args.batch} pairs, {args.img_size} px, "
        f"{args.text_len} tokens ({int(b.padding.sum())} padded), fp32, forward+backward, {'process CPU' if args.cpu_time else 'wall'} time"
    )
    ref = build_torchscale(args.img_size).to(device).train()
    steps = {"torchscale": torchscale_step(ref, b)}
    flops = {}
    n_tokens = 1 + (args.img_size // 16) ** 2 + args.text_len
    for name in args.models:
        model = create_model(name, img_size=args.img_size, unpad=not args.mdm_padded).to(device).train()
        if name.startswith("beit3_"):
            ref.load_state_dict(mdm_to_torchscale(model.state_dict()))
            print(f"{name} vs torchscale, max abs output difference: {check_outputs(model, ref, b):.2e}")
        steps[name] = mdm_step(model, b)
        flops[name] = train_step_flops(model.cfg, [(args.batch, n_tokens)])
        print(f"{name}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters")
    # torchscale runs the beit3_base architecture: same model FLOPs
    flops["torchscale"] = train_step_flops(
        make_config("beit3_base", img_size=args.img_size), [(args.batch, n_tokens)]
    )
    for name, step in steps.items():
        counted = counted_flops(step)  # the first warmup step, under torch's FLOP counter
        print(f"{name}: FlopCounterMode {counted / 1e9:.0f} GFLOP/step, analytic {flops[name] / 1e9:.0f}")
        for _ in range(args.warmup - 1):
            step()
    if device.type == "cuda":  # MFU against the device's bf16 peak, not a measured fp32 matmul
        global matmul_peak
        peak = args.peak_tflops or device_peak_tflops(device)
        matmul_peak = lambda: peak * 1e3  # noqa: E731
        print(f"peak {peak:.0f} TFLOP/s ({torch.cuda.get_device_name(device)}), autocast {AMP}")
    elif args.peak_tflops:
        matmul_peak = lambda: args.peak_tflops * 1e3  # noqa: E731
    rates = run_rounds(steps, args)
    report(rates, flops, args.batch)
    return 0


def report(rates: dict[str, list[float]], flops: dict[str, float], batch: int) -> None:
    """Medians over rounds (and the best round: the least disturbed by other processes)."""
    peak, best_peak = statistics.median(rates["peak"]), max(rates["peak"])
    base, best_base = statistics.median(rates["torchscale"]), max(rates["torchscale"])
    print(f"\npeak (fp32 matmul on CPU, bf16 table on CUDA): median {peak:.0f} GFLOP/s, best {best_peak:.0f}")
    print(f"{'model':<12} {'samples/s':>10} {'vs torchscale':>14} {'GFLOP/s':>8} {'of peak':>8}   best round")
    for name in [n for n in rates if n != "peak"]:
        med, best = statistics.median(rates[name]), max(rates[name])
        gflops, best_gflops = med / batch * flops[name] / 1e9, best / batch * flops[name] / 1e9
        print(
            f"{name:<12} {med:>10.2f} {med / base:>13.2f}x {gflops:>8.1f} {gflops / peak:>8.0%}   "
            f"{best:.2f} samples/s, {best / best_base:.2f}x, {best_gflops / best_peak:.0%} of best peak"
        )


if __name__ == "__main__":
    sys.exit(main())
