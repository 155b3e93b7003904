"""One BEiT-3 pretraining optimizer step (MIM + MLM + MVLM, base size) against the strongest peer assembly.

    .venv/bin/python benchmarks/pretrain_step.py                 # base, 8 images + 8 texts + 8 pairs, 3 rounds
    .venv/bin/python benchmarks/pretrain_step.py --ablate        # + mdm without per-sample attention / grad buffers
    .venv/bin/python benchmarks/pretrain_step.py --quick         # tiny smoke run (seconds)
    .venv/bin/python benchmarks/pretrain_step.py --peer-heads masked   # peer heads on masked rows too
    .venv/bin/python benchmarks/pretrain_step.py --device cuda --precision bf16   # on a GPU

A step is forward + backward + AdamW of BEiT-3's masked data modeling on one batch of each stream:
images (MIM, 40 % block-wise masked patches), texts (MLM, 15 %) and image-text pairs (MVLM: 40 % of the
patches and 50 % of the text), the three passes of BEiT-3 (Wang et al., 2023, §2.2). Both sides get the
same batch, the same weights and the same optimizer settings; their losses are compared before timing.

**mdm**: ``build_pretrain_model(beit3_base, [mim, mlm, mvlm])`` as ``mdm pretrain`` runs it — padded text
packed to its real tokens inside the backbone, heads on masked rows only.

**Peer**: torchscale ``BEiT3`` (what unilm/beit3 builds) with the heads of the released pretraining code
of its family, since BEiT-3's own pretraining code is not public: BEiT's MIM head (unilm ``beit``:
``lm_head(x[bool_masked_pos])``, masked patches only) and VLMo's MLM head (``mlm_score(text_feats)`` on
every text position, then cross-entropy with ``ignore_index=-100`` on the unmasked ones). MVLM uses both
on the joint pass. ``--peer-heads masked`` gives the peer masked-only heads too, which isolates the
backbone's share of the difference.

**Text lengths** (tokens including [bos]/[eos]; both sides get batches trimmed to their longest text, as
mdm's collate does; unilm's datasets pad to the full budget, which would only slow the peer):

* pairs: the COCO-caption histogram ``COCO_CAPTION_TOKENS`` below, budget 64 (unilm beit3
  ``num_max_bpe_tokens``). It is *modeled*, not counted (no data can be downloaded here): COCO captions
  have at least 8 words by the annotation rules and ~10.5 on average (Chen et al., 2015, arXiv:1504.00325),
  ≈1.2 XLM-R SentencePiece pieces per word, plus [bos]/[eos] → mean ≈14.6 tokens, long right tail.
* texts: sentence-level samples of a Wikipedia/BookCorpus-like corpus, log-normal token lengths with
  median 32 and σ 0.7, clipped to [8, 128] (mean ≈41; ≈2 % reach the budget). BookCorpus has 13.3 words
  per sentence (74.0M sentences, 985M words; Zhu et al., 2015); Wikipedia sentences are longer and samples
  may hold more than one sentence. Budget 128 as in ``configs/pretrain/vlmo_base_mdm.yaml``.
  ``--text-dist full`` makes every text fill the budget (packed segments: no padding at all).

Reported: seconds per step (median over rounds), samples/s, useful (non-padding) tokens/s, the ratio, and
*useful* GFLOP/s — the analytic FLOPs of the real tokens (:func:`mdm.train.flops.encoder_forward_flops`
per sample) plus the heads on masked rows — as a fraction of the matmul peak measured between rounds
(``mdm.train.loop.measure_matmul_tflops`` on CPU; on CUDA ``mdm.train.loop.BF16_PEAK_TFLOPS`` or
``--peak-tflops``). Each round also times the components (MIM, MLM, MVLM pass with its backward, the
AdamW step), so the difference can be located.
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mdm.data.masking import BlockMasking, mask_text  # noqa: E402
from mdm.distributed.strategy import DistributedConfig, precision_plan, use_fused_adamw  # noqa: E402
from mdm.export.unilm import mdm_to_torchscale  # noqa: E402
from mdm.models.config import make_config  # noqa: E402
from mdm.objectives import ObjectivesConfig, build_pretrain_model  # noqa: E402
from mdm.train.flops import encoder_forward_flops  # noqa: E402
from mdm.train.loop import BF16_PEAK_TFLOPS, measure_matmul_tflops  # noqa: E402
from mdm.train.optim import OptimConfig, build_optimizer  # noqa: E402

#: Modeled COCO-caption token lengths ([bos] + pieces + [eos]) → share of captions (see the docstring).
COCO_CAPTION_TOKENS = {
    10: 0.04, 11: 0.09, 12: 0.14, 13: 0.16, 14: 0.15, 15: 0.12, 16: 0.09, 17: 0.07,
    18: 0.05, 19: 0.03, 20: 0.02, 22: 0.02, 25: 0.01, 30: 0.006, 40: 0.004,
}  # fmt: skip
TEXT_MEDIAN, TEXT_SIGMA, TEXT_MIN = 32, 0.7, 8

BOS, PAD, EOS, MASK = 0, 1, 2, 64001  # XLM-R SentencePiece ids of beit3.spm
SIZES = {"base": dict(img=224, vocab=64010, codebook=8192), "tiny": dict(img=64, vocab=1024, codebook=64)}


# ------------------------------------------------------------------------------------------ batches
def caption_lengths(n: int, rng: random.Random) -> list[int]:
    lengths, weights = zip(*COCO_CAPTION_TOKENS.items())
    return rng.choices(lengths, weights, k=n)


def text_lengths(n: int, rng: random.Random, budget: int, dist: str) -> list[int]:
    if dist == "full":
        return [budget] * n
    return [
        min(budget, max(TEXT_MIN, round(rng.lognormvariate(math.log(TEXT_MEDIAN), TEXT_SIGMA))))
        for _ in range(n)
    ]


def text_batch(lengths: list[int], ratio: float, vocab: int, rng: random.Random) -> dict[str, torch.Tensor]:
    """Random ids ``[bos] ... [eos] [pad]...`` of these lengths, trimmed to the longest, BERT-masked."""
    B, T = len(lengths), max(lengths)
    ids = torch.full((B, T), PAD, dtype=torch.long)
    for b, n in enumerate(lengths):
        ids[b, :n] = torch.tensor([BOS] + [rng.randrange(4, min(vocab, MASK)) for _ in range(n - 2)] + [EOS])
    pad = ids == PAD
    text_input, text_mask = mask_text(
        ids, pad, ratio, MASK % vocab, vocab, (BOS, PAD, EOS, MASK % vocab), rng
    )
    return dict(text=ids, text_padding_mask=pad, text_input=text_input, text_mask=text_mask)


def image_batch(
    B: int, img: int, codebook: int, g: torch.Generator, rng: random.Random
) -> dict[str, torch.Tensor]:
    grid = img // 16
    masking = BlockMasking.from_ratio(grid, 0.4)
    return dict(
        image=torch.randn(B, 3, img, img, generator=g),
        image_mask=torch.stack([masking(rng) for _ in range(B)]),
        image_tokens=torch.randint(0, codebook, (B, grid * grid), generator=g),
    )


def make_batches(args: argparse.Namespace, size: dict) -> dict[str, dict[str, torch.Tensor]]:
    rng, g = random.Random(0), torch.Generator().manual_seed(0)
    vocab = size["vocab"]
    pair = image_batch(args.batch, size["img"], size["codebook"], g, rng)
    pair.update(text_batch(caption_lengths(args.batch, rng), 0.5, vocab, rng))
    return {
        "image": image_batch(args.batch, size["img"], size["codebook"], g, rng),
        "text": text_batch(text_lengths(args.batch, rng, args.text_len, args.text_dist), 0.15, vocab, rng),
        "pair": pair,
    }


# ------------------------------------------------------------------------------------------ the peer
class PeerMLMHead(nn.Module):
    """VLMo's ``MLMHead``: BertPredictionHeadTransform (dense, GELU, LayerNorm) + decoder + bias."""

    def __init__(self, dim: int, vocab: int) -> None:
        super().__init__()
        self.dense, self.norm = nn.Linear(dim, dim), nn.LayerNorm(dim, eps=1e-12)
        self.decoder = nn.Linear(dim, vocab, bias=False)
        self.bias = nn.Parameter(torch.zeros(vocab))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.norm(F.gelu(self.dense(x)))) + self.bias


class Peer(nn.Module):
    """torchscale BEiT3 + BEiT's MIM head + VLMo's MLM head (on all text positions unless ``masked_heads``)."""

    def __init__(self, cfg, codebook: int, masked_heads: bool) -> None:
        super().__init__()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from torchscale.architecture.config import EncoderConfig
            from torchscale.model.BEiT3 import BEiT3

        ts = EncoderConfig(
            img_size=cfg.img_size, patch_size=16, vocab_size=cfg.vocab_size, multiway=True,
            layernorm_embedding=False, normalize_output=True, no_output_layer=True, drop_path_rate=0.0,
            encoder_embed_dim=cfg.embed_dim, encoder_attention_heads=cfg.num_heads,
            encoder_ffn_embed_dim=cfg.ffn_dim, encoder_layers=cfg.depth,
            max_source_positions=cfg.max_text_positions,
        )  # fmt: skip
        self.beit3 = BEiT3(ts)
        self.mim_head = nn.Linear(cfg.embed_dim, codebook)
        self.mlm_head = PeerMLMHead(cfg.embed_dim, cfg.vocab_size)
        self.masked_heads = masked_heads

    def mim(self, x: torch.Tensor, b: dict) -> torch.Tensor:
        patches = x[:, 1 : 1 + b["image_mask"].shape[1]]
        return F.cross_entropy(self.mim_head(patches[b["image_mask"]]), b["image_tokens"][b["image_mask"]])

    def mlm(self, words: torch.Tensor, b: dict) -> torch.Tensor:
        target = b["text_mask"] & ~b["text_padding_mask"]
        if self.masked_heads:
            return F.cross_entropy(self.mlm_head(words[target]), b["text"][target])
        labels = b["text"].masked_fill(~target, -100)  # VLMo: score every position, ignore the unmasked
        logits = self.mlm_head(words)  # (B, T, V)
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.view(-1), ignore_index=-100)

    def losses(self, stream: str, b: dict) -> torch.Tensor:
        if stream == "image":
            x = self.beit3(visual_tokens=b["image"], vision_masked_position=b["image_mask"])["encoder_out"]
            return self.mim(x, b)
        if stream == "text":
            x = self.beit3(textual_tokens=b["text_input"], text_padding_position=b["text_padding_mask"])
            return self.mlm(x["encoder_out"], b)
        x = self.beit3(
            textual_tokens=b["text_input"],
            visual_tokens=b["image"],
            text_padding_position=b["text_padding_mask"],
            vision_masked_position=b["image_mask"],
        )["encoder_out"]
        return self.mim(x, b) + self.mlm(x[:, -b["text"].shape[1] :], b)


def build_peer(mdm_model: nn.Module, codebook: int, masked_heads: bool) -> Peer:
    """The peer with mdm's weights (backbone through the unilm key map, heads copied)."""
    peer = Peer(mdm_model.backbone.cfg, codebook, masked_heads)
    peer.beit3.load_state_dict(mdm_to_torchscale(mdm_model.backbone.state_dict()))
    heads = mdm_model.heads
    with torch.no_grad():
        peer.mim_head.load_state_dict(heads["mim"].proj.state_dict())
        for name in ("dense", "norm", "decoder"):
            getattr(peer.mlm_head, name).load_state_dict(getattr(heads["mlm"], name).state_dict())
        peer.mlm_head.bias.copy_(heads["mlm"].bias)
    return peer


def peer_optimizer(peer: nn.Module, cfg: OptimConfig, fused: bool | None) -> torch.optim.Optimizer:
    decay = [p for p in peer.parameters() if p.ndim > 1]
    no_decay = [p for p in peer.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=fused)


# ------------------------------------------------------------------------------------------ steps
def mdm_losses(model: nn.Module) -> Callable[[str, dict], torch.Tensor]:
    """Per-stream loss of the PretrainModel: the objective reading that stream, its ``*_loss`` summed."""
    by_stream = {o.stream: o for o in model.objectives.values()}

    def losses(stream: str, b: dict) -> torch.Tensor:
        out = by_stream[stream](model.backbone, b)
        return sum(v for k, v in out.items() if k.endswith("_loss"))

    return losses


class Stepper:
    """Runs one optimizer step as timed components: each stream's forward + backward, then AdamW."""

    def __init__(self, losses, opt, batches, device: torch.device, amp: torch.dtype | None) -> None:
        self.losses, self.opt, self.batches, self.device, self.amp = losses, opt, batches, device, amp

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def __call__(self) -> dict[str, float]:
        times: dict[str, float] = {}
        for stream, b in self.batches.items():
            self._sync()
            t = time.perf_counter()
            ctx = torch.autocast(self.device.type, dtype=self.amp) if self.amp else nullcontext()
            with ctx:
                loss = self.losses(stream, b)
            loss.float().backward()
            self._sync()
            times[stream] = time.perf_counter() - t
        t = time.perf_counter()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self._sync()
        times["adamw"] = time.perf_counter() - t
        return times


# ------------------------------------------------------------------------------------------ accounting
def useful(batches: dict, cfg, codebook: int) -> tuple[int, float]:
    """(non-padding tokens, useful train FLOPs): the backbone on real tokens (attention per sample over
    its real length) and the heads on masked rows, forward + backward = 3 × forward."""
    D, V = cfg.embed_dim, cfg.vocab_size
    tokens, flops = 0, 0.0
    for b in batches.values():
        n_vision = 1 + b["image_mask"].shape[1] if "image" in b else 0
        B = (b["image"] if "image" in b else b["text"]).shape[0]
        real_text = (~b["text_padding_mask"]).sum(1).tolist() if "text" in b else [0] * B
        for n in real_text:
            tokens += n_vision + n
            flops += 3 * encoder_forward_flops(cfg, n_vision + n)
        if "image_mask" in b:
            flops += 3 * 2 * D * codebook * int(b["image_mask"].sum())
        if "text_mask" in b:
            m = int((b["text_mask"] & ~b["text_padding_mask"]).sum())
            flops += 3 * (2 * D * D + 2 * D * V) * m
    return tokens, flops


def device_peak(args: argparse.Namespace, device: torch.device) -> tuple[float, str]:
    """The MFU denominator in TFLOP/s and where it came from."""
    if args.peak_tflops:
        return args.peak_tflops, "--peak-tflops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peak in BF16_PEAK_TFLOPS.items():
            if key in name:
                return peak, f"bf16 dense peak of {name} (BF16_PEAK_TFLOPS)"
        return float("nan"), f"unknown device {name!r}: pass --peak-tflops"
    return measure_matmul_tflops(2048), "fp32 matmul peak measured now (measure_matmul_tflops)"


# ------------------------------------------------------------------------------------------ main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=list(SIZES), default="base")
    p.add_argument("--batch", type=int, default=8, help="samples per stream (images, texts, pairs)")
    p.add_argument("--text-len", type=int, default=128, help="text-stream length budget")
    p.add_argument("--text-dist", choices=["sentences", "full"], default="sentences")
    p.add_argument("--peer-heads", choices=["released", "masked"], default="released")
    p.add_argument("--rounds", type=int, default=3, help="alternating timed rounds (1 step each)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="autocast dtype (CUDA)")
    p.add_argument("--peak-tflops", type=float, default=0.0, help="MFU denominator (default: see docs)")
    p.add_argument("--quick", action="store_true", help="tiny model, 2 rounds: a smoke run")
    p.add_argument(
        "--ablate",
        action="store_true",
        help="also time mdm without per-sample attention and vocabulary gradient buffers (mdm-plain)",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.size, args.rounds, args.text_len = "tiny", 2, 64
    return args


def build(args: argparse.Namespace, device: torch.device):
    size = SIZES[args.size]
    cfg = make_config(f"beit3_{args.size}", img_size=size["img"], vocab_size=size["vocab"])
    torch.manual_seed(0)
    model = build_pretrain_model(
        cfg, ObjectivesConfig(objectives=["mim", "mlm", "mvlm"], codebook_size=size["codebook"])
    )
    peer = build_peer(model, size["codebook"], args.peer_heads == "masked")
    # AdamW as mdm's strategy runs it (fused on CPU and CUDA); the peer gets the same kernel, which any
    # user can ask torch for, so the optimizer step costs the same on both sides
    fused = precision_plan(DistributedConfig(), device).fused_adamw
    ocfg = OptimConfig()
    model, peer = model.to(device).train(), peer.to(device).train()
    opt = build_optimizer(model, ocfg, cfg.depth)
    if fused:
        use_fused_adamw(opt)
    return cfg, size, model, peer, opt, peer_optimizer(peer, ocfg, fused or None)


class Plain:
    """Runs a stepper with mdm's two CPU-side savings switched off: attention always batched over the
    padded layout (``per_sample_pays`` → False) and autograd's fresh weight gradients for the vocabulary
    embedding and decoder (``_reuse`` → False). For the A/B of ``--ablate``; outputs are unchanged."""

    def __init__(self, stepper) -> None:
        self.stepper = stepper

    def __call__(self) -> dict[str, float]:
        from mdm.models.layers import attention, grad_buffer

        saved = attention.per_sample_pays, grad_buffer._reuse
        attention.per_sample_pays = lambda *a, **k: False
        grad_buffer._reuse = lambda *a, **k: False
        try:
            return self.stepper()
        finally:
            attention.per_sample_pays, grad_buffer._reuse = saved


def check_losses(model, peer, batches) -> float:
    """Max |mdm − peer| of the per-stream losses on the benchmark batch (no grad)."""
    ours = mdm_losses(model)
    with torch.no_grad():
        return max(abs(float(ours(s, b)) - float(peer.losses(s, b))) for s, b in batches.items())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    amp = torch.bfloat16 if args.precision == "bf16" and device.type == "cuda" else None
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    cfg, size, model, peer, opt, peer_opt = build(args, device)
    batches = make_batches(args, size)
    for name, b in batches.items():
        if "text" in b:
            lens = (~b["text_padding_mask"]).sum(1).tolist()
            print(f"{name} stream: text lengths {lens} → padded to {b['text'].shape[1]}")
    batches = {k: {n: t.to(device) for n, t in b.items()} for k, b in batches.items()}
    print(f"loss check: max |mdm - peer| per stream = {check_losses(model, peer, batches):.2e}")
    tokens, flops = useful(batches, cfg, size["codebook"])
    samples = sum((b["image"] if "image" in b else b["text"]).shape[0] for b in batches.values())
    steppers = {
        "mdm": Stepper(mdm_losses(model), opt, batches, device, amp),
        "peer": Stepper(peer.losses, peer_opt, batches, device, amp),
    }
    if args.ablate:  # shares mdm's model and optimizer: only the time is of interest
        steppers["mdm-plain"] = Plain(Stepper(mdm_losses(model), opt, batches, device, amp))
    for s in steppers.values():
        s()  # warm-up step (allocations, first-touch of the optimizer state)
    rounds: dict[str, list[dict[str, float]]] = {n: [] for n in steppers}
    peaks = []
    for r in range(args.rounds):
        for name in list(steppers) if r % 2 == 0 else list(steppers)[::-1]:
            rounds[name].append(steppers[name]())
        peak, source = device_peak(args, device)
        peaks.append(peak)
        print(
            f"round {r + 1}: " + ", ".join(f"{n} {sum(rounds[n][-1].values()):.2f} s" for n in rounds),
            flush=True,
        )
    report(rounds, statistics.median(peaks), source, samples, tokens, flops)
    return 0


def report(rounds, peak: float, source: str, samples: int, tokens: int, flops: float) -> None:
    step = {n: statistics.median(sum(t.values()) for t in r) for n, r in rounds.items()}
    print(f"\npeak {peak * 1e3:.0f} GFLOP/s ({source}); {samples} samples, {tokens} useful tokens, "
          f"{flops / 1e9:.0f} useful GFLOP per step")  # fmt: skip
    print(
        f"{'':<10}{'s/step':>8}{'samples/s':>11}{'tokens/s':>10}{'vs peer':>9}{'useful GFLOP/s':>16}{'of peak':>9}"
    )
    for n, s in step.items():
        gf = flops / s / 1e9
        print(
            f"{n:<10}{s:>8.2f}{samples / s:>11.2f}{tokens / s:>10.0f}{step['peer'] / s:>8.2f}x{gf:>16.1f}{gf / (peak * 1e3):>9.0%}"
        )
    print("\ncomponents (median s): " + " | ".join(
        f"{n}: " + ", ".join(f"{k} {statistics.median(t[k] for t in r):.2f}" for k in r[0]) for n, r in rounds.items()
    ))  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
