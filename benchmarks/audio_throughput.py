"""Audio train-step throughput at base size on 10-second clips: mdm's AudioMAE step against a timm peer (CPU).

    .venv/bin/python benchmarks/audio_throughput.py                 # 5 alternating rounds, batch 4
    .venv/bin/python benchmarks/audio_throughput.py --quick         # 2 rounds, batch 2 (a smoke run)

A step is AudioMAE pretraining (Huang et al., 2022) on 1024 × 128 fbank frames (10.24 s → 64 × 8 = 512
patches), 80 % of the patches removed: the ViT-B encoder sees the 102 visible ones (+ [CLS]), a 512-wide
8-block global decoder reconstructs all 512, MSE on the removed patches against per-patch normalised
targets, forward + backward.

* **mdm**: ``audiomae_base`` with the ``amae`` objective (the code ``mdm pretrain`` runs).
* **peer**: the same computation as AudioMAE's ``models_mae.py`` builds it — timm's ``VisionTransformer``
  (``in_chans=1``, ``img_size=(1024, 128)``, eps 1e-6) as the encoder, random masking by gathering the
  visible patch embeddings, timm ``Block``s as the decoder, the same loss.

Both get the same weights where they correspond (the encoder through ``mdm import audiomae``'s key map),
the same inputs and the same visible sets; their losses are compared before timing. Rounds alternate in
one process; the median of the rounds is reported with the ratio, plus ``beats_base`` with the ``beats``
objective (1024-code label predictor, 75 % removed) for reference.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mdm.export.audiomae import audiomae_to_mdm  # noqa: E402
from mdm.models import create_model  # noqa: E402
from mdm.objectives import AudioMaskedAutoencoder, MaskedAcousticModeling  # noqa: E402
from mdm.objectives.mae import normalize_patches, patchify  # noqa: E402

T, F, P = 1024, 128, 512


class TimmAudioMAE(nn.Module):
    """AudioMAE's encoder-decoder re-stated on timm modules (global decoder, ``decoder_mode=0``); base
    size by default (ViT-B encoder, 512 × 8 × 16 decoder, 1024 × 128 input)."""

    def __init__(
        self, frames: int = T, dim: int = 768, depth: int = 12, heads: int = 12,
        dec_dim: int = 512, dec_depth: int = 8, dec_heads: int = 16,
    ) -> None:  # fmt: skip
        super().__init__()
        from timm.models.vision_transformer import Block, VisionTransformer

        norm = partial(nn.LayerNorm, eps=1e-6)
        self.encoder = VisionTransformer(
            img_size=(frames, F), patch_size=16, in_chans=1, embed_dim=dim, depth=depth, num_heads=heads,
            qkv_bias=True, norm_layer=norm, num_classes=0,
        )  # fmt: skip
        self.patches = (frames // 16) * (F // 16)
        self.decoder_embed = nn.Linear(dim, dec_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dec_dim))
        self.register_buffer("decoder_pos", torch.zeros(1, 1 + self.patches, dec_dim))
        self.decoder_blocks = nn.ModuleList(
            Block(dec_dim, dec_heads, 4.0, qkv_bias=True, norm_layer=norm) for _ in range(dec_depth)
        )
        self.decoder_norm = norm(dec_dim)
        self.decoder_pred = nn.Linear(dec_dim, 256)

    def forward(self, audio: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        P = self.patches
        enc = self.encoder
        x = enc.patch_embed(audio.unsqueeze(1)) + enc.pos_embed[:, 1:]  # (B, P, D)
        x = torch.gather(x, 1, visible.unsqueeze(-1).expand(-1, -1, x.shape[-1]))  # (B, K, D)
        x = torch.cat([(enc.cls_token + enc.pos_embed[:, :1]).expand(x.shape[0], -1, -1), x], 1)
        for blk in enc.blocks:
            x = blk(x)
        x = self.decoder_embed(enc.norm(x))  # (B, 1 + K, d)
        B, _, d = x.shape
        full = self.mask_token.expand(B, P, d).scatter(1, visible.unsqueeze(-1).expand(-1, -1, d), x[:, 1:])
        x = torch.cat([x[:, :1], full], 1) + self.decoder_pos
        for blk in self.decoder_blocks:
            x = blk(x)
        pred = self.decoder_pred(self.decoder_norm(x))[:, 1:]  # (B, P, 256)
        target = normalize_patches(patchify(audio.unsqueeze(1), 16))
        removed = torch.ones(B, P, dtype=torch.bool).scatter(1, visible, False)
        return (pred[removed] - target[removed]).pow(2).mean()


def share_weights(peer: TimmAudioMAE, backbone: nn.Module, objective: AudioMaskedAutoencoder) -> None:
    """Copies the peer's encoder into the mdm backbone (the import key map) and its decoder into amae's."""
    sd = {k: v for k, v in peer.encoder.state_dict().items()}
    mapped, _, _ = audiomae_to_mdm(sd)
    mapped["audio_embed.mask_token"] = backbone.audio_embed.mask_token.detach().clone()
    backbone.load_state_dict(mapped)
    dec = objective.decoder
    with torch.no_grad():
        dec.embed.load_state_dict(peer.decoder_embed.state_dict())
        dec.mask_token.copy_(peer.mask_token)
        dec.norm.load_state_dict(peer.decoder_norm.state_dict())
        dec.pred.load_state_dict(peer.decoder_pred.state_dict())
        from mdm.models.layers.embeddings import audio_pos_table

        peer.decoder_pos.copy_(audio_pos_table(peer.patches // 8, 8, peer.decoder_pos.shape[-1])[None])
        for ours, theirs in zip(dec.blocks, peer.decoder_blocks):
            ours.attn_norm.load_state_dict(theirs.norm1.state_dict())
            ours.attn.qkv.load_state_dict(theirs.attn.qkv.state_dict())
            ours.attn.out_proj.load_state_dict(theirs.attn.proj.state_dict())
            ours.ffn.norm.load_state_dict(theirs.norm2.state_dict())
            ours.ffn.fc1.load_state_dict(theirs.mlp.fc1.state_dict())
            ours.ffn.fc2.load_state_dict(theirs.mlp.fc2.state_dict())


def timed(fn, steps: int) -> float:
    t = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - t) / steps


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=1, help="steps per round and model")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="2 rounds, batch 2")
    args = ap.parse_args(argv)
    if args.quick:
        args.rounds, args.batch = 2, 2
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    B = args.batch
    audio = torch.randn(B, T, F, generator=g)
    keep = int(P * 0.2)
    visible = torch.rand(B, P, generator=g).argsort(1)[:, :keep].sort(1).values  # (B, 102)
    batch = {"audio": audio, "audio_visible_index": visible}

    peer = TimmAudioMAE().train()
    backbone = create_model("audiomae_base").train()
    amae = AudioMaskedAutoencoder(backbone.cfg).train()
    share_weights(peer, backbone, amae)
    with torch.no_grad():
        ours, theirs = amae(backbone, batch)["amae_loss"].item(), peer(audio, visible).item()
    print(f"loss: mdm {ours:.6f}  peer {theirs:.6f}  |diff| {abs(ours - theirs):.2e}")

    beats_backbone = create_model("beats_base").train()
    beats = MaskedAcousticModeling(beats_backbone.cfg, codebook_size=1024).train()
    keep75 = int(P * 0.25)
    beats_batch = {
        "audio": audio,
        "audio_visible_index": torch.rand(B, P, generator=g).argsort(1)[:, :keep75].sort(1).values,
        "audio_tokens": torch.randint(0, 1024, (B, P), generator=g),
    }

    def step_mdm() -> None:
        backbone.zero_grad(set_to_none=True)
        amae.zero_grad(set_to_none=True)
        amae(backbone, batch)["amae_loss"].backward()

    def step_peer() -> None:
        peer.zero_grad(set_to_none=True)
        peer(audio, visible).backward()

    def step_beats() -> None:
        beats_backbone.zero_grad(set_to_none=True)
        beats.zero_grad(set_to_none=True)
        beats(beats_backbone, beats_batch)["beats_loss"].backward()

    steps = {
        "peer (timm AudioMAE)": step_peer,
        "mdm audiomae_base + amae": step_mdm,
        "mdm beats_base + beats": step_beats,
    }
    for fn in steps.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {k: [] for k in steps}
    for r in range(args.rounds):
        for name, fn in steps.items():
            times[name].append(timed(fn, args.steps))
        print(
            f"round {r + 1}: " + ", ".join(f"{k} {B / v[-1]:.2f} clips/s" for k, v in times.items()),
            flush=True,
        )
    peer_t = statistics.median(times["peer (timm AudioMAE)"])
    print(
        f"\nbatch {B} clips of 10.24 s (1024 x 128 fbank, 512 patches), {args.threads} threads, median of {args.rounds} rounds"
    )
    print("| step | clips/s | s/step | vs peer |")
    print("|---|---|---|---|")
    for name, ts in times.items():
        t = statistics.median(ts)
        print(f"| {name} | {B / t:.2f} | {t:.2f} | {peer_t / t:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
