"""The ``mdm`` command.

Each sub-command lives in its own module exposing ``main(argv: list[str]) -> int``; this file only
dispatches, importing the module lazily so that ``mdm --help`` is instant.
"""

from __future__ import annotations

import importlib
import logging
import sys

# name → (module, one-line help). Modules are imported only when their command runs.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("mdm.demo", "run the whole pipeline on the embedded demo data and write a report"),
    "import": (
        "mdm.export.cli",
        "import a checkpoint from another toolkit (unilm/torchscale BEiT-3, AudioMAE, BEATs)",
    ),
    "info": ("mdm.models.cli", "list model presets, or describe one (parameters per expert)"),
    "data": (
        "mdm.data.cli",
        "build WebDataset shards from captions JSON, JSONL, image folders or text files",
    ),
    "pretrain": (
        "mdm.train.pretrain",
        "masked data modeling pretraining (MIM / MLM / MVLM / MAE), 1 process to ZeRO-3",
    ),
    "finetune": ("mdm.train.finetune", "fine-tune on VQAv2, NLVR2, retrieval or classification"),
    "evaluate": (
        "mdm.tasks.cli_evaluate",
        "official metrics of a fine-tuned model or of a prediction file (VQA, NLVR2, ...)",
    ),
    "predict": (
        "mdm.tasks.cli_predict",
        "predictions of a fine-tuned model (EvalAI VQA submission file, ...)",
    ),
    "checkpoint": (
        "mdm.train.consolidate",
        "consolidate a (ZeRO-sharded) training checkpoint into a model directory",
    ),
    "export": ("mdm.export.command", "export a checkpoint as safetensors, unilm/BEiT-3, timm or ONNX"),
    "launch": (
        "mdm.launch.cli",
        "plan a multi-node run: --dry-run prints parameters, memory per ZeRO stage, batch",
    ),
    "tokenizer": (
        "mdm.tokenizers.cli",
        "train, evaluate, apply and import visual (dVAE, VQ-KD) and text tokenizers",
    ),
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [
        "usage: mdm <command> [options]",
        "",
        "mdm — masked data modeling for Multiway Transformers (BEiT / BEiT-3 / VLMo / MAE).",
        "",
        "commands:",
    ]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run `mdm <command> --help` for the options of a command."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``mdm`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from mdm import __version__

        print(f"mdm {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        import difflib

        close = difflib.get_close_matches(name, list(COMMANDS), n=1)
        hint = f" Did you mean `mdm {close[0]}`?" if close else ""
        print(f"mdm: unknown command {name!r}.{hint}\n\n{_usage()}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    module = importlib.import_module(COMMANDS[name][0])
    try:
        return int(module.main(rest) or 0)
    except KeyboardInterrupt:
        print("mdm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
