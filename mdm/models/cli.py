"""``mdm info [preset]``: list model presets or describe one."""

from __future__ import annotations

import argparse


def count_parameters(model) -> dict[str, int]:
    """Parameters by group: embeddings, attention, each FFN expert, norms, total."""
    groups = {"embeddings": 0, "attention": 0, "vision_ffn": 0, "text_ffn": 0, "vl_ffn": 0, "other": 0}
    if getattr(model.cfg, "has_audio", False):
        groups["audio_ffn"] = 0
    for name, p in model.named_parameters():
        n = p.numel()
        if name.startswith(
            (
                "text_embed",
                "vision_embed",
                "vision_pos_embed",
                "text_pos_embed",
                "audio_embed",
                "audio_pos_embed",
            )
        ):
            groups["embeddings"] += n
        elif ".attn" in name:
            groups["attention"] += n
        elif ".ffn.vision." in name:
            groups["vision_ffn"] += n
        elif ".ffn.text." in name:
            groups["text_ffn"] += n
        elif ".ffn.vl." in name:
            groups["vl_ffn"] += n
        elif ".ffn.audio." in name:
            groups["audio_ffn"] += n
        else:
            groups["other"] += n
    groups["total"] = sum(groups.values())
    return groups


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="mdm info", description="List model presets or describe one.")
    p.add_argument("preset", nargs="?", help="a preset name, e.g. vlmo_base")
    args = p.parse_args(argv)
    import torch

    from mdm.models import create_model, list_models

    if args.preset is None:
        print("\n".join(list_models()))
        return 0
    with torch.device("meta"):
        model = create_model(args.preset)
    cfg = model.cfg
    print(
        f"{args.preset}: depth {cfg.depth}, width {cfg.embed_dim}, heads {cfg.num_heads}, ffn {cfg.ffn_dim}, "
        f"{'shared' if cfg.shared_attention else 'multiway'} attention, VL-FFN in top {cfg.vl_ffn_layers} layers"
    )
    for k, v in count_parameters(model).items():
        print(f"  {k:<11} {v / 1e6:9.2f} M")
    return 0
