"""``mdm predict``: run a fine-tuned model on a split and write its predictions as JSON.

Examples::

    mdm predict --checkpoint runs/finetune/vqav2_base/final data.root=/data/vqav2 --output submit.json
    mdm predict --checkpoint runs/finetune/nlvr2_base/final data.root=/data/nlvr2 --split test1

Formats: vqav2 writes the EvalAI submission ``[{"question_id": int, "answer": str}, ...]`` (default split
``test-dev2015``); nlvr2 ``[{"identifier", "prediction": "True"|"False"}]``; retrieval, for each caption,
its image and the 10 best images; classification the top-1 class and the top 5 of each image; captioning
the COCO results format ``[{"image_id", "caption"}]`` (default split: Karpathy ``test``).
"""

from __future__ import annotations

import argparse
import sys

from mdm.tasks.cli_common import (
    USER_ERRORS,
    add_common_args,
    load_text_tokenizer,
    make_loader,
    maybe_init_distributed,
    pick_device,
    resolve_sections,
    write_json,
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mdm predict", description="Write the predictions of a fine-tuned model."
    )
    add_common_args(p)
    p.add_argument("--output", help="JSON file to write (default: predictions_<task>_<split>.json)")
    return p


def predict(args: argparse.Namespace) -> tuple[list[dict], str]:
    """The predictions and the output path."""
    from mdm.tasks.io import load_task_model, read_task_meta

    if not args.checkpoint:
        raise ValueError("--checkpoint <fine-tuned model directory> is required")
    meta = read_task_meta(args.checkpoint)
    sections = resolve_sections(args, meta)
    device = pick_device(args.device)
    maybe_init_distributed(device)
    task, model, meta = load_task_model(args.checkpoint, sections.task, sections.data, device)
    tokenizer = load_text_tokenizer(args.tokenizer or meta.get("text_tokenizer"))
    if tokenizer is None and task.cfg.name not in ("classification", "audio_classification"):
        raise ValueError(f"{args.checkpoint} records no text tokenizer; pass --tokenizer")
    split = args.split or "test"
    dataset = task.build_dataset(split, tokenizer)
    workers = sections.data.num_workers if args.num_workers is None else args.num_workers
    rows = task.predict(model, make_loader(task, dataset, args, workers))
    spec = "+".join(task.resolve_split(split)).replace(":", "-")
    return rows, args.output or f"predictions_{task.cfg.name}_{spec}.json"


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        rows, path = predict(args)
    except USER_ERRORS as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"mdm predict: error: {msg}", file=sys.stderr)
        return 2
    from mdm.distributed.ops import rank

    if rank() == 0:
        write_json(path, rows)
        print(f"wrote {len(rows)} predictions to {path}")
    return 0
