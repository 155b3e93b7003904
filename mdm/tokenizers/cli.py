"""``mdm tokenizer``: train, evaluate, apply and import visual and text tokenizers.

mdm tokenizer train --config configs/tokenizer/vqkd_demo.yaml [key=value ...] [--resume]
mdm tokenizer eval --tokenizer DIR [--images P ... | --shards P ... | --demo N] [--probe demo|DIR]
mdm tokenizer eval --tokenizer ACOUSTIC_DIR [--audio P ... | --shards P ... | --demo N]
mdm tokenizer encode --tokenizer DIR --shards P ... (--out DIR | --in-place)
mdm tokenizer show --tokenizer DIR [--images P ... | --shards P ... | --demo N] --out show.png
mdm tokenizer import dall-e --encoder encoder.pkl [--decoder decoder.pkl] --out DIR --allow-pickle
mdm tokenizer import unilm-vqkd --checkpoint vqkd.pth --out DIR
mdm tokenizer import spm --model beit3.spm --out DIR [--embedding-rows 64010]
mdm tokenizer train-text --input corpus.txt ... --out DIR [--vocab-size 8000]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from mdm.config import ConfigError, load_config

__all__ = ["main"]

log = logging.getLogger(__name__)


def _add_image_source(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group()
    src.add_argument("--images", nargs="+", metavar="PATH", help="image files, folders or globs")
    src.add_argument("--shards", nargs="+", metavar="PATH", help="WebDataset tar shards, folders or globs")
    src.add_argument("--demo", type=int, metavar="N", help="N held-out demo images (the default: 256)")
    p.add_argument("--limit", type=int, default=1024, help="at most this many images (default 1024)")
    p.add_argument("--seed", type=int, default=1_000_003, help="seed of the demo images")


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="mdm tokenizer", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("train", help="train a dVAE or VQ-KD from a config")
    p.add_argument("--config", required=True, help="configs/tokenizer/<dvae|vqkd>_*.yaml")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. optim.steps=100")
    p.add_argument("--resume", action="store_true", help="continue from <out_dir>/train_state.pt")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p = sub.add_parser("eval", help="codebook usage, perplexity, reconstruction MSE or teacher cosine")
    p.add_argument("--tokenizer", required=True)
    _add_image_source(p)
    p.add_argument(
        "--audio", nargs="+", metavar="PATH", help="acoustic tokenizers: audio files, folders or globs"
    )
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument(
        "--probe",
        metavar="demo|DIR",
        help="also a linear probe on the bag of codes: 'demo' (single-object demo scenes labelled with "
        "shape, colour, object) or a folder of class sub-folders",
    )
    p.add_argument(
        "--probe-images", type=int, default=2000, help="demo probe images, half to fit (default 2000)"
    )
    p.add_argument(
        "--probe-kmeans", action="store_true", help="also probe a pixel k-means codebook of the same size"
    )
    p = sub.add_parser("encode", help="precompute codes into shards (<key>.tok.npy)")
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--shards", nargs="+", required=True)
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--out", help="folder for the rewritten shards")
    where.add_argument("--in-place", action="store_true", help="rewrite the shards in place (atomically)")
    p.add_argument("--member", default="tok.npy", help="extension of the codes member (default tok.npy)")
    p.add_argument("--batch-size", type=int, default=64)
    p = sub.add_parser("show", help="one PNG: inputs, reconstructions, code maps")
    p.add_argument("--tokenizer", required=True)
    _add_image_source(p)
    p.add_argument("--num", type=int, default=8, help="images to show")
    p.add_argument("--out", required=True, help="PNG to write")
    _import_parsers(sub)
    p = sub.add_parser("train-text", help="train a SentencePiece model from text files")
    p.add_argument("--input", nargs="+", required=True, help="text files, one sentence per line")
    p.add_argument("--out", required=True)
    p.add_argument("--vocab-size", type=int, default=8000)
    p.add_argument("--model-type", choices=["unigram", "bpe"], default="unigram")
    p.add_argument("--embedding-rows", type=int, default=None, help="rows of the model's text embedding")
    return ap


def _import_parsers(sub: argparse._SubParsersAction) -> None:
    imp = sub.add_parser("import", help="import a tokenizer from another toolkit").add_subparsers(
        dest="source", required=True
    )
    p = imp.add_parser("dall-e", help="OpenAI DALL-E encoder.pkl / decoder.pkl (pickles)")
    p.add_argument("--encoder", required=True)
    p.add_argument("--decoder")
    p.add_argument("--out", required=True)
    p.add_argument("--img-size", type=int, default=112, help="tokenizer resolution (BEiT: 112)")
    p.add_argument(
        "--allow-pickle", action="store_true", help="consent to unpickling (runs code from the file)"
    )
    p = imp.add_parser("unilm-vqkd", help="unilm BEiT v2 VQ-KD checkpoint (.pth)")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--encoder-heads", type=int, default=None)
    p.add_argument("--decoder-heads", type=int, default=None)
    p = imp.add_parser("spm", help="an existing SentencePiece model (e.g. BEiT-3's beit3.spm)")
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--embedding-rows", type=int, default=None, help="64010 for BEiT-3")


def _images(args: argparse.Namespace, size: int, default_n: int):
    from mdm.tokenizers.config import ImageDataConfig
    from mdm.tokenizers.data import load_images

    if args.images:
        cfg = ImageDataConfig(source="folder", paths=args.images)
    elif args.shards:
        cfg = ImageDataConfig(source="shards", paths=args.shards)
    else:
        n = args.demo or default_n
        cfg = ImageDataConfig(source="demo", num_images=n)
    limit = min(args.limit, args.demo or default_n) if cfg.source == "demo" else args.limit
    return load_images(cfg, size, limit, seed=args.seed)


def _train(args: argparse.Namespace) -> int:
    from mdm.tokenizers.config import TokenizerTrainConfig
    from mdm.tokenizers.train import train_tokenizer

    cfg = load_config(TokenizerTrainConfig, args.config, args.overrides)
    metrics = train_tokenizer(cfg, resume=args.resume, progress=not args.no_progress)
    print(json.dumps(metrics, indent=2))
    return 0


def _eval(args: argparse.Namespace) -> int:
    from mdm.tokenizers.evaluate import evaluate
    from mdm.tokenizers.io import load, load_teacher

    tok = load(args.tokenizer)
    if getattr(tok, "modality", "") == "audio":
        return _eval_acoustic(args, tok)
    teacher = load_teacher(args.tokenizer) if tok.kind == "vqkd" else None
    if tok.kind == "vqkd" and teacher is None:
        log.warning("%s: teacher cannot be rebuilt from the directory; no teacher cosine", args.tokenizer)
    metrics = evaluate(tok, _images(args, tok.img_size, 256), teacher, batch_size=args.batch_size)
    if args.probe:
        metrics.update(_probe(args, tok))
    print(json.dumps({"tokenizer_id": getattr(tok, "tokenizer_id", ""), **metrics}, indent=2))
    return 0


def _eval_acoustic(args: argparse.Namespace, tok) -> int:
    """Held-out codebook usage of an acoustic tokenizer, with the front end it was trained with."""
    from mdm.config import from_dict
    from mdm.data.audio import AudioFrontendConfig
    from mdm.tokenizers.acoustic_train import AudioClipsConfig, AudioTeacher, evaluate_acoustic, load_clips
    from mdm.tokenizers.io import read_meta

    meta = read_meta(args.tokenizer)
    fe = from_dict(AudioFrontendConfig, meta.get("frontend", {}), source=f"{args.tokenizer}/config.json")
    if args.audio:
        clips = AudioClipsConfig(source="folder", paths=args.audio, num_clips=args.limit, frontend=fe)
    elif args.shards:
        clips = AudioClipsConfig(source="shards", paths=args.shards, num_clips=args.limit, frontend=fe)
    else:  # held-out sound-world clips (another world seed than training's)
        train = meta.get("train_config", {}).get("audio", {})
        clips = AudioClipsConfig(
            source="demo",
            eval_clips=min(args.demo or 128, args.limit),
            demo_seed=int(train.get("demo_seed", 0)),
            demo_duration=float(train.get("demo_duration", 3.0)),
            frontend=fe,
        )
    teacher_dir = meta.get("audio_teacher", {}).get("model_dir", "")
    teacher = AudioTeacher(teacher_dir) if teacher_dir and Path(teacher_dir).exists() else None
    metrics = evaluate_acoustic(
        tok, load_clips(clips, held_out=clips.source == "demo"), fe.pad_value, teacher, args.batch_size
    )
    print(json.dumps({"tokenizer_id": getattr(tok, "tokenizer_id", ""), **metrics}, indent=2))
    return 0


def _probe(args: argparse.Namespace, tok) -> dict[str, float]:
    from mdm.tokenizers.probe import PixelKMeans, demo_probe_sets, folder_probe_set, probe_codes

    if args.probe == "demo":
        data = demo_probe_sets(args.probe_images, tok.img_size, seed=args.seed)
    else:
        data = folder_probe_set(args.probe, tok.img_size)
    metrics = probe_codes(tok.encode, tok.codebook_size, data)
    if args.probe_kmeans:
        patch = tok.img_size // tok.grid_size[0]
        n_fit = len(data.images) // 2  # the probe's training half: no held-out image is seen
        km = PixelKMeans(tok.codebook_size, patch, seed=args.seed).fit(data.images[:n_fit])
        metrics.update({f"kmeans_{k}": v for k, v in probe_codes(km.encode, tok.codebook_size, data).items()})
    return metrics


def _encode(args: argparse.Namespace) -> int:
    from mdm.tokenizers.data import list_shards
    from mdm.tokenizers.encode import encode_shards
    from mdm.tokenizers.io import load

    tok = load(args.tokenizer)
    out = None if args.in_place else Path(args.out)
    info = encode_shards(tok, list_shards(args.shards), out, member=args.member, batch_size=args.batch_size)
    print(json.dumps(info, indent=2))
    return 0


def _show(args: argparse.Namespace) -> int:
    from mdm.tokenizers.io import load
    from mdm.tokenizers.show import show_image

    tok = load(args.tokenizer)
    args.limit = min(args.limit, args.num)
    picture = show_image(tok, _images(args, tok.img_size, args.num)[: args.num])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    picture.save(args.out)
    print(args.out)
    return 0


def _import(args: argparse.Namespace) -> int:
    from mdm.tokenizers.io import import_spm, import_unilm_vqkd, load_dall_e_pickles, save_tokenizer

    if args.source == "dall-e":
        tok = load_dall_e_pickles(args.encoder, args.decoder, args.allow_pickle, img_size=args.img_size)
        tok_id = save_tokenizer(
            tok, args.out, extra={"source": {"encoder": args.encoder, "decoder": args.decoder}}
        )
    elif args.source == "unilm-vqkd":
        tok = import_unilm_vqkd(Path(args.checkpoint), args.encoder_heads, args.decoder_heads)
        tok_id = save_tokenizer(tok, args.out, extra={"source": {"checkpoint": args.checkpoint}})
    else:
        tok = import_spm(Path(args.model), args.embedding_rows)
        tok_id = save_tokenizer(tok, args.out, extra={"source": {"model": args.model}})
    print(f"{args.out} ({tok_id})")
    return 0


def _train_text(args: argparse.Namespace) -> int:
    from mdm.tokenizers.io import save_tokenizer
    from mdm.tokenizers.text import train_sentencepiece

    def lines():
        for path in args.input:
            with open(path, encoding="utf-8") as f:
                yield from f

    for path in args.input:
        if not Path(path).is_file():
            raise FileNotFoundError(f"{path}: no such text file")
    tok = train_sentencepiece(
        lines(), vocab_size=args.vocab_size, model_type=args.model_type, embedding_rows=args.embedding_rows
    )
    tok_id = save_tokenizer(
        tok, args.out, extra={"source": {"input": args.input, "vocab_size": args.vocab_size}}
    )
    print(
        f"{args.out} ({tok_id}): {tok.num_pieces} pieces, mask id {tok.mask_id}, {tok.vocab_size} embedding rows"
    )
    return 0


COMMANDS = {
    "train": _train,
    "eval": _eval,
    "encode": _encode,
    "show": _show,
    "import": _import,
    "train-text": _train_text,
}


def main(argv: list[str]) -> int:
    """Entry point of ``mdm tokenizer``."""
    from mdm.tokenizers.data import ImageReadError
    from mdm.tokenizers.io import PickleRefused

    args = _parser().parse_args(argv)
    try:
        return COMMANDS[args.cmd](args)
    except (ConfigError, FileNotFoundError, ValueError, KeyError, ImageReadError, PickleRefused) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"mdm tokenizer {args.cmd}: error: {msg}", file=sys.stderr)
        return 2
