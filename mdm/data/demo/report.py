"""The report ``mdm demo`` writes: ``<out>/report.md`` with its figures in ``<out>/report/``.

Sections: stage times; the data (example scenes with their captions, questions and statements); the visual
tokenizer (``mdm tokenizer show`` code maps, code-atlas reconstructions, held-out usage and perplexity);
pretraining curves per objective; masked predictions of the pretrained model (MVLM words with and
without the image, MIM patches); fine-tuning curves and the downstream table, pretrained vs scratch;
the exported model directories.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from mdm.report import captioned_images, image_rows, markdown_table, plot_curves, text_table

__all__ = ["METRICS", "table_rows", "print_table", "write_report"]

log = logging.getLogger(__name__)

#: Metrics shown per task (all of them are kept in ``finetune/results.json``).
METRICS: dict[str, tuple[str, ...]] = {
    "vqav2": ("vqa_acc",),
    "nlvr2": ("nlvr2_acc",),
    "retrieval": ("tr_r1", "ir_r1", "tr_r5", "ir_r5", "r_mean"),
    "captioning": ("CIDEr", "Bleu_4", "CIDEr_beam", "Bleu_4_beam"),
}
HEADER = ("task", "metric", "pretrained", "scratch", "margin")
FIG = "report"  # figures folder, relative to the report
BACKGROUND = "(busy)"  # suffix of stage times measured in the background process (they overlap others)


def table_rows(results: dict[str, dict[str, dict[str, float]]]) -> list[tuple[str, str, float, float, float]]:
    """``(task, metric, pretrained, scratch, pretrained - scratch)`` for the metrics of :data:`METRICS`."""
    rows = []
    for task, keys in METRICS.items():
        for k in keys:
            p, s = float(results[task]["pretrained"][k]), float(results[task]["scratch"][k])
            rows.append((task, k, p, s, p - s))
    return rows


def _verdict(results: dict[str, dict[str, dict[str, float]]]) -> str:
    main = {"vqav2": "vqa_acc", "nlvr2": "nlvr2_acc", "retrieval": "r_mean", "captioning": "CIDEr_beam"}
    margins = {t: results[t]["pretrained"][k] - results[t]["scratch"][k] for t, k in main.items()}
    wins = [t for t, m in margins.items() if m > 0]
    summary = ", ".join(f"{t} {main[t]} {m:+.2f}" for t, m in margins.items())
    head = (
        "pretrained beats scratch on every task"
        if len(wins) == len(main)
        else "pretrained does NOT beat scratch everywhere"
    )
    return f"{head} ({summary})"


def print_table(results: dict[str, dict[str, dict[str, float]]]) -> None:
    """Prints the downstream table and the verdict."""
    print(text_table(HEADER, table_rows(results)))
    print("\n" + _verdict(results))


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []


def _data_section(out: Path, fig: Path) -> list[str]:
    from mdm.data.demo.examples import image_batch

    data = out / "data"
    karpathy = json.loads((data / "retrieval" / "dataset_coco.json").read_text())["images"]
    val = [im for im in karpathy if im["split"] == "val"][:6]
    paths = [data / "retrieval" / im["filepath"] / im["filename"] for im in val]
    image_rows([("retrieval val", list(image_batch(paths, 48)))], fig / "scenes.png")
    vqa_q = json.loads((data / "vqav2" / "v2_OpenEnded_mscoco_val2014_questions.json").read_text())[
        "questions"
    ]
    vqa_a = json.loads((data / "vqav2" / "v2_mscoco_val2014_annotations.json").read_text())["annotations"]
    nlvr = [json.loads(x) for x in (data / "nlvr2" / "dev.json").read_text().splitlines()[:4]]
    lines = [
        "## The demo data",
        "",
        f"![scenes]({FIG}/scenes.png)",
        "",
        "Captions of these images (Karpathy `dataset_coco.json`):",
        "",
    ]
    lines += [f"{i + 1}. {im['sentences'][0]['raw']}" for i, im in enumerate(val)]
    lines += ["", "VQAv2 questions (val2014, first image): " + "; ".join(
        f"*{q['question']}* → **{a['multiple_choice_answer']}**" for q, a in zip(vqa_q[:3], vqa_a[:3]))]  # fmt: skip
    lines += [
        "",
        "NLVR2 statements (dev): " + "; ".join(f"*{r['sentence']}* → {r['label']}" for r in nlvr),
        "",
    ]
    lines.append(f"Sizes: `{json.loads((data / 'manifest.json').read_text())['sizes']}`")
    return lines + [""]


def _tokenizer_section(out: Path, fig: Path, run: Callable[[list[str]], None]) -> tuple[list[str], Any, Any]:
    import torch

    import mdm.tokenizers as T
    from mdm.data.demo.examples import code_atlas, image_batch, paint_codes
    from mdm.tokenizers.show import code_colours

    tok_dir = out / "tokenizers" / "visual"
    val = sorted((out / "data" / "retrieval" / "val2014").glob("*.jpg"))[:8]
    run(["tokenizer", "show", "--tokenizer", str(tok_dir), "--images", *map(str, val), "--num", "8", "--out", str(fig / "tokenizer_show.png")])  # fmt: skip
    tok = T.load(tok_dir)
    train_imgs = image_batch(sorted((out / "data" / "pretrain" / "images").glob("*.png")), tok.img_size)
    atlas, counts = code_atlas(tok, train_imgs)
    x = image_batch(val, tok.img_size)
    codes = tok.encode(x)
    palette = torch.from_numpy(code_colours(tok.codebook_size)).float().div(255)  # (K, 3)
    maps = palette[codes].permute(0, 3, 1, 2)  # (B, 3, h, w)
    image_rows(
        [("input", list(x)), ("codes", list(maps)), ("code atlas", list(paint_codes(codes, atlas)))],
        fig / "tokenizer_atlas.png",
    )
    meta = json.loads((tok_dir / "config.json").read_text())
    metrics = meta.get("metrics", {})
    teacher = meta.get("teacher", {})
    taught = (
        "DINOv2 ViT-S/14 (ONNX)" if teacher.get("kind") == "onnx" else f"a random {teacher.get('name', '')}"
    )
    used = int((counts > 0).sum())
    lines = [
        "## Visual tokenizer (VQ-KD)", "",
        f"`mdm tokenizer train` (teacher: {taught}): {tok.codebook_size} codes on a "
        f"{tok.grid_size[0]}×{tok.grid_size[1]} grid; held-out " + ", ".join(f"{k} {v:.3g}" for k, v in metrics.items()) + ".", "",
        f"![tokenizer show]({FIG}/tokenizer_show.png)", "",
        f"VQ-KD reconstructs teacher features, not pixels; the *code atlas* row repaints each patch with the mean "
        f"pretraining patch of its code ({used} of {tok.codebook_size} codes occur in {len(train_imgs)} images):", "",
        f"![code atlas]({FIG}/tokenizer_atlas.png)", "",
    ]  # fmt: skip
    return lines, tok, atlas


def _pretraining_section(out: Path, fig: Path) -> list[str]:
    rows = _read_jsonl(out / "pretrain" / "metrics.jsonl")
    last = rows[-1] if rows else {}
    known = ["mim_loss", "mlm_loss", "mvlm_image_loss", "mvlm_text_loss", "itc_loss"]
    losses = [k for k in known if k in last]
    accs = [k.replace("_loss", "_acc") for k in losses]
    plot_curves(rows, losses, fig / "pretrain_loss.png", "pretraining losses", "cross-entropy")
    plot_curves(
        rows,
        accs,
        fig / "pretrain_acc.png",
        "pretraining accuracies (masked tokens; ITC: top-1 in batch)",
        "accuracy",
    )
    final = ", ".join(f"{k} {last[k]:.3f}" for k in losses + accs if last.get(k) is not None)
    speed = f"; {last['samples_per_s']:.0f} samples/s" if last.get("samples_per_s") else ""
    names = " + ".join(
        n
        for n, k in (
            ("MIM", "mim_loss"),
            ("MLM", "mlm_loss"),
            ("MVLM", "mvlm_text_loss"),
            ("ITC", "itc_loss"),
        )
        if k in last
    )
    itc = (
        [
            "VLMo's image-text contrastive loss (ITC, `mdm demo --itc`) runs beside BEiT-3's masked data modeling; the "
            "retrieval fine-tuning starts its projections from the ITC head (`docs/demo.md` compares it with masked "
            "modeling alone).",
            "",
        ]
        if "itc_loss" in last
        else []
    )
    return [
        f"## Pretraining ({names})", "",
        f"`mdm pretrain --config configs/pretrain/demo_vlmo.yaml`, {last.get('step', 0)} steps; final {final}{speed}.", "",
        *itc,
        f"![losses]({FIG}/pretrain_loss.png) ![accuracies]({FIG}/pretrain_acc.png)", "",
    ]  # fmt: skip


def _masked_section(out: Path, fig: Path, tok_visual: Any, atlas: Any) -> list[str]:
    import mdm.tokenizers as T
    from mdm.data.demo.examples import (  # fmt: skip
        image_batch,
        load_pretrain_model,
        masked_patch_predictions,
        masked_word_predictions,
        paint_codes,
    )

    model = load_pretrain_model(out / "export" / "pretrained", tok_visual.codebook_size)
    size = model.backbone.cfg.img_size
    text_tok = T.load(out / "tokenizers" / "text")
    data = out / "data" / "retrieval"
    items = [
        im
        for im in json.loads((data / "dataset_coco.json").read_text())["images"]
        if im["split"] in ("val", "test")
    ]
    x = image_batch([data / im["filepath"] / im["filename"] for im in items], size)
    texts = [im["sentences"][0]["raw"] for im in items]
    preds, acc = masked_word_predictions(model, text_tok, x, texts)
    table = [(p.render("truth"), p.render("with_image"), p.render("text_only")) for p in preds[:6]]
    mask, codes, predicted, mim_acc = masked_patch_predictions(model, tok_visual, x)
    k = 8
    image_rows(
        [("input", list(x[:k])), ("masked input", list(paint_codes(codes[:k], atlas, mask[:k]))),
         ("true codes (atlas)", list(paint_codes(codes[:k], atlas))), ("predicted (atlas)", list(paint_codes(predicted[:k], atlas)))],
        fig / "mim_predictions.png",
    )  # fmt: skip
    return [
        "## What the pretrained model predicts", "",
        f"Colour and shape words of {len(texts)} held-out captions are replaced by `[MASK]` and predicted by the MLM head: "
        f"**{acc['with_image']:.1f} %** correct when the image is in the same pass (MVLM), **{acc['text_only']:.1f} %** "
        f"from the text alone ({int(acc['masked_words'])} words).", "",
        markdown_table(("caption", "predicted with the image", "predicted from the text only"), table), "",
        f"Masked image modeling on the same images (40 % block masks): **{mim_acc:.1f} %** of the masked patches get their "
        "visual token right. Rows: image; masked patches (grey); tokens; predicted tokens, painted with the code atlas.", "",
        f"![MIM]({FIG}/mim_predictions.png)", "",
    ]  # fmt: skip


def _caption_section(out: Path, fig: Path, results: dict[str, dict[str, dict[str, float]]]) -> list[str]:
    """Generated captions (beam search) of held-out images from both captioning models, as a figure."""
    from mdm.data.demo.examples import image_batch

    data = out / "data" / "retrieval"
    val = [
        im for im in json.loads((data / "dataset_coco.json").read_text())["images"] if im["split"] == "val"
    ][:6]
    runs = out / "finetune"
    made = {
        init: {str(r["image_id"]): r["caption"] for r in json.loads((runs / f"captioning-{init}" / "captions_beam.json").read_text())}
        for init in ("pretrained", "scratch")
    }  # fmt: skip
    texts = [
        [f"reference: {im['sentences'][0]['raw']}", f"pretrained: {made['pretrained'].get(str(im['cocoid']), '?')}",
         f"scratch: {made['scratch'].get(str(im['cocoid']), '?')}"]
        for im in val
    ]  # fmt: skip
    captioned_images(
        list(image_batch([data / im["filepath"] / im["filename"] for im in val], 48)),
        texts,
        fig / "captions.png",
    )
    pre, scr = results["captioning"]["pretrained"], results["captioning"]["scratch"]
    return [
        "## Captioning", "",
        "Karpathy val images captioned by the two fine-tuned models (`mdm predict`, beam search of 3 with length "
        "penalty 1.5 — the demo's captions are long lists of shapes, and shorter penalties stop early; the fine-tuning's "
        "own evaluation decodes greedily), scored with the COCO "
        f"caption metrics (`mdm evaluate --task captioning --predictions`): CIDEr-D **{pre['CIDEr_beam']:.2f}** from the "
        f"pretrained backbone vs **{scr['CIDEr_beam']:.2f}** from scratch (greedy {pre['CIDEr']:.2f} vs {scr['CIDEr']:.2f}).", "",
        f"![captions]({FIG}/captions.png)", "",
    ]  # fmt: skip


def _finetune_section(out: Path, fig: Path, results: dict[str, dict[str, dict[str, float]]]) -> list[str]:
    lines = ["## Fine-tuning: pretrained vs scratch", ""]
    lines += [
        "Each task is fine-tuned twice with the same config and seed (`configs/finetune/demo_<task>.yaml`): from the "
        "pretrained backbone and from a random initialisation. Metrics on the held-out split (VQAv2 val2014, NLVR2 dev, "
        "Karpathy val for retrieval and captioning; captioning's `_beam` rows decode with beam search):", "",
        markdown_table(HEADER, table_rows(results)), "", f"**{_verdict(results)}.**", "",
    ]  # fmt: skip
    for task in results:
        rows = []
        for init in ("pretrained", "scratch"):
            rows += [{"step": r["step"], init: r["loss"]} for r in _read_jsonl(out / "finetune" / f"{task}-{init}" / "metrics.jsonl") if "loss" in r]  # fmt: skip
        if plot_curves(
            rows, ["pretrained", "scratch"], fig / f"finetune_{task}.png", f"{task}: training loss", "loss"
        ):
            lines.append(f"![{task}]({FIG}/finetune_{task}.png)")
    return lines + [""]


def write_report(
    out: str | Path,
    results: dict[str, dict[str, dict[str, float]]],
    exported: Sequence[str],
    times: dict[str, float],
    seed: int,
    quick: bool,
    run: Callable[[list[str]], None],
) -> Path:
    """Writes ``<out>/report.md`` and its figures; returns the report path.

    Args:
        out: the demo directory.
        results: ``{task: {"pretrained"|"scratch": metrics}}``.
        exported: exported model directories.
        times: wall seconds per stage.
        seed: the demo seed.
        quick: whether this was ``--quick``.
        run: runs an ``mdm`` command line (used for ``mdm tokenizer show``).
    """
    out = Path(out)
    fig = out / FIG
    fig.mkdir(parents=True, exist_ok=True)
    lines = [
        "# mdm demo report", "",
        f"Seed {seed}{' (--quick: a smoke test, numbers are not meaningful)' if quick else ''}. Stage times: "
        + ", ".join(f"{k} {v:.0f} s" for k, v in times.items())
        + f" (wall time before the report {sum(v for k, v in times.items() if not k.endswith(BACKGROUND)):.0f} s; "
        "the background process's time overlaps the other stages).", "",
    ]  # fmt: skip
    lines += _data_section(out, fig)
    tok_lines, tok, atlas = _tokenizer_section(out, fig, run)
    lines += tok_lines + _pretraining_section(out, fig) + _masked_section(out, fig, tok, atlas)
    lines += _finetune_section(out, fig, results) + _caption_section(out, fig, results)
    lines += [
        "## Exported models",
        "",
        "`mdm export --format safetensors` (load with `mdm.from_pretrained(dir)`):",
        "",
    ]
    lines += [f"- `{p}`" for p in exported] + [""]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
