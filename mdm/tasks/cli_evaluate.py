"""``mdm evaluate``: official metrics of a fine-tuned model, or of a prediction file.

Examples::

    mdm evaluate --checkpoint runs/finetune/vqav2_base/final data.root=/data/vqav2 --metrics-json m.json
    mdm evaluate --task vqav2 --predictions submit.json data.root=/data/vqav2 --split val2014
    mdm evaluate --task nlvr2 --predictions dev_predictions.json data.root=/data/nlvr2 --split dev
    mdm evaluate --task captioning --predictions captions.json data.root=/data/coco --split test

Metric names: ``vqa_acc`` (official VQA accuracy; ``vqa_score`` is ViLT's training-time score),
``nlvr2_acc``, ``tr_r1 tr_r5 tr_r10 ir_r1 ir_r5 ir_r10 r_mean``, ``top1 top5``, captioning's
``Bleu_1..Bleu_4 METEOR ROUGE_L CIDEr`` (METEOR only with Java; :mod:`mdm.tasks.caption_eval`). They are printed one per
line and, with ``--metrics-json FILE``, written as one JSON object.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

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
from mdm.tasks.common import find_file, read_json, read_json_lines


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mdm evaluate",
        description="Evaluate a fine-tuned model (--checkpoint) or score a prediction file (--predictions).",
    )
    add_common_args(p)
    p.add_argument(
        "--predictions",
        help="vqav2: an EvalAI file [{question_id, answer}]; nlvr2: [{identifier, prediction}]; "
        "captioning: COCO results [{image_id, caption}]",
    )
    p.add_argument(
        "--subset",
        action="store_true",
        help="score only the records that have a prediction "
        "(the official VQA evaluation requires all questions of the split)",
    )
    p.add_argument("--metrics-json", help="also write the metrics as one JSON object to this file")
    return p


def score_file(args: argparse.Namespace) -> dict[str, float]:
    """Scores ``--predictions`` against the split's published annotations."""
    sections = resolve_sections(args)
    name = sections.task.name
    if not (args.task or args.config or any(o.startswith("task.name=") for o in args.overrides)):
        raise ValueError("--predictions needs --task (vqav2, nlvr2 or captioning)")
    if not sections.data.root:
        raise ValueError("set data.root=<dataset directory> to score predictions")
    root, preds = Path(sections.data.root), read_json(Path(args.predictions))
    if name == "vqav2":
        from mdm.tasks.vqa_eval import evaluate_vqa
        from mdm.tasks.vqav2_data import load_annotations

        annotations = load_annotations(root, args.split or "val2014")
        return evaluate_vqa(preds, annotations, subset=args.subset, source=args.predictions)
    if name == "nlvr2":
        from mdm.tasks.nlvr2 import score_nlvr2

        split = args.split or "dev"
        rows = read_json_lines(find_file(root, f"{split}.json", ("", "data", "nlvr2/data")))
        return score_nlvr2(preds, [r for _, r in rows], subset=args.subset, source=args.predictions)
    if name == "captioning":
        from mdm.tasks.base import build_task
        from mdm.tasks.captioning import score_caption_file

        task = build_task(sections.task, sections.data)
        refs = task.references(args.split or "test")
        return score_caption_file(preds, refs, source=args.predictions, meteor=sections.task.meteor)
    raise ValueError(
        f"scoring a prediction file is supported for vqav2, nlvr2 and captioning; evaluate a {name} model with --checkpoint"
    )


def evaluate_checkpoint(args: argparse.Namespace) -> dict[str, float]:
    """Runs the fine-tuned model on the split and computes the task's metrics."""
    from mdm.tasks.io import load_task_model, read_task_meta

    meta = read_task_meta(args.checkpoint)
    sections = resolve_sections(args, meta)
    device = pick_device(args.device)
    maybe_init_distributed(device)
    task, model, meta = load_task_model(args.checkpoint, sections.task, sections.data, device)
    tokenizer = load_text_tokenizer(args.tokenizer or meta.get("text_tokenizer"))
    if tokenizer is None and task.cfg.name not in ("classification", "audio_classification"):
        raise ValueError(f"{args.checkpoint} records no text tokenizer; pass --tokenizer")
    dataset = task.build_dataset(args.split or "val", tokenizer)
    workers = sections.data.num_workers if args.num_workers is None else args.num_workers
    return task.evaluate(model, make_loader(task, dataset, args, workers))


def report(metrics: dict[str, Any], path: str | None) -> None:
    """Prints ``name value`` lines and writes the JSON file (rank 0 only)."""
    from mdm.distributed.ops import rank

    if rank() != 0:
        return
    width = max(map(len, metrics), default=0)
    for k, v in metrics.items():
        shown = int(v) if k.startswith("num_") else (f"{v:.4f}" if isinstance(v, float) else v)
        print(f"{k:<{width}}  {shown}")
    if path:
        write_json(path, metrics)


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if bool(args.checkpoint) == bool(args.predictions):
        print("mdm evaluate: error: give exactly one of --checkpoint and --predictions", file=sys.stderr)
        return 2
    try:
        metrics = score_file(args) if args.predictions else evaluate_checkpoint(args)
    except USER_ERRORS as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"mdm evaluate: error: {msg}", file=sys.stderr)
        return 2
    report(metrics, args.metrics_json)
    return 0
