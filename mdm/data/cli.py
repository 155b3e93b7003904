"""``mdm data shards``: WebDataset tar shards from a COCO captions file, a JSONL, an image folder or text files.

mdm data shards --from coco --captions annotations/captions_train2014.json --images train2014 --out shards/pairs
mdm data shards --from jsonl --jsonl pairs.jsonl --out shards/pairs
mdm data shards --from folder --images imagenet/train --out shards/images
mdm data shards --from text --text wiki.txt books.txt --out shards/text
mdm data shards --from audio-folder --audio clips/ --out shards/audio
mdm data shards --from audio-jsonl --jsonl captions.jsonl --out shards/audio_text
mdm data shards --from esc50 --root ESC-50-master --out shards/esc50

``mdm data audio-stats``: per-mel-bin mean and std of the raw filterbanks of audio shards, for the front
end's ``mel_stats`` option (a per-bin dataset normalisation; off unless a config names the file):

mdm data audio-stats --shards shards/audio --out shards/audio/mel_stats.json [--style beats] [--limit N]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

IMAGE_TEXT = ("coco", "jsonl", "folder", "text")
AUDIO = ("audio-folder", "audio-jsonl", "esc50")
NEEDS = {
    "coco": ("captions", "images"),
    "jsonl": ("jsonl",),
    "folder": ("images",),
    "text": ("text",),
    "audio-folder": ("audio",),
    "audio-jsonl": ("jsonl",),
    "esc50": ("root",),
}
KIND = {
    "coco": "pair",
    "jsonl": "pair",
    "folder": "image",
    "text": "text",
    "audio-folder": "audio",
    "audio-jsonl": "audio_text",
    "esc50": "audio",
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mdm data", description="Prepare pretraining data.")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser(
        "shards",
        help="write WebDataset tar shards",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    s.add_argument("--from", dest="source", required=True, choices=[*IMAGE_TEXT, *AUDIO])
    s.add_argument("--captions", help="COCO captions JSON (--from coco)")
    s.add_argument(
        "--images", help="image folder (--from coco: where file_name lives; --from folder: the root)"
    )
    s.add_argument(
        "--jsonl",
        help='JSON lines {"image": path, "text": str | [str]} (--from jsonl) or {"audio": path, "text": ...} '
        "(--from audio-jsonl)",
    )
    s.add_argument("--audio", help="audio folder, optionally with class sub-folders (--from audio-folder)")
    s.add_argument("--root", help="dataset root holding meta/esc50.csv and audio/ (--from esc50)")
    s.add_argument("--text", nargs="+", help="text files, one sample per non-empty line (--from text)")
    s.add_argument("--out", required=True, help="output directory (shard-NNNNNN.tar + index.json)")
    s.add_argument("--max-count", type=int, default=10_000, help="samples per shard")
    a = sub.add_parser(
        "audio-stats",
        help="per-mel-bin filterbank statistics of audio shards (for audio_frontend.mel_stats)",
        description="Per-mel-bin mean and std of the raw log-mel filterbanks of the clips in audio shards "
        "(real frames only), written as JSON for the front end's mel_stats option.",
    )
    a.add_argument("--shards", nargs="+", required=True, help="shard directories, files or globs")
    a.add_argument("--out", required=True, help="output JSON file")
    a.add_argument("--style", choices=["beats", "audiomae"], default="beats", help="front end style")
    a.add_argument("--limit", type=int, default=0, help="at most this many clips (0: all)")
    return p


def audio_stats(args: argparse.Namespace) -> int:
    from mdm.data.audio import AUDIO_EXTS, AudioFrontendConfig, write_mel_stats
    from mdm.data.shard_reader import expand_shards, iter_tar_samples

    def clips():
        n = 0
        for shard in expand_shards(args.shards, "--shards"):
            for _, sample in iter_tar_samples(shard):
                ext = next((e for e in AUDIO_EXTS if e in sample), None)
                if ext is None:
                    continue
                if args.limit and n >= args.limit:
                    return
                n += 1
                yield f"{shard}:{sample['__key__']}.{ext}", sample[ext]

    try:
        meta = write_mel_stats(list(clips()), AudioFrontendConfig(style=args.style), args.out)
    except (OSError, ValueError) as e:
        print(f"mdm data audio-stats: {e}", file=sys.stderr)
        return 1
    print(
        f"wrote per-bin statistics of {meta['clips']} clips ({meta['frames']} frames, skipped "
        f"{meta['skipped']}) to {args.out}"
    )
    return 0


def main(argv: list[str]) -> int:
    from mdm.data import audio_shards as A
    from mdm.data import shards as S

    args = build_parser().parse_args(argv)
    if args.cmd == "audio-stats":
        return audio_stats(args)
    missing = [f"--{n}" for n in NEEDS[args.source] if not getattr(args, n)]
    if missing:
        print(f"mdm data shards: --from {args.source} needs {' and '.join(missing)}", file=sys.stderr)
        return 2
    kind = KIND[args.source]
    report = S.WriteReport(kind)
    try:
        samples = {
            "coco": lambda: S.from_coco_captions(Path(args.captions), Path(args.images), report),
            "jsonl": lambda: S.from_jsonl(Path(args.jsonl), report),
            "folder": lambda: S.from_image_folder(Path(args.images), report),
            "text": lambda: S.from_text_files([Path(t) for t in args.text], report),
            "audio-folder": lambda: A.from_audio_folder(Path(args.audio), report),
            "audio-jsonl": lambda: A.from_audio_jsonl(Path(args.jsonl), report),
            "esc50": lambda: A.from_esc50(Path(args.root), report),
        }[args.source]()
        S.write_shards(samples, args.out, kind, args.max_count, report=report)
    except (OSError, ValueError) as e:
        print(f"mdm data shards: {e}", file=sys.stderr)
        return 1
    skipped = ", ".join(f"{k}: {v}" for k, v in report.skipped.items()) or "none"
    print(
        f"wrote {sum(report.counts)} {kind} samples in {len(report.shards)} shards to {args.out} (skipped: {skipped})"
    )
    return 0
