"""``mdm demo --modality audio``: audio masked data modeling end to end on the generated sound world.

    mdm demo --modality audio [--out mdm-demo-audio] [--seed 0] [--quick] [--jobs 2]

Stages (each runs the real command through its ``main(argv)``, printed as a ``$ mdm ...`` line):

1. two sound worlds (:mod:`mdm.data.demo.sound_writers`): an unlabelled pretraining corpus and a smaller
   labelled world in the ESC-50 layout (another world seed), for fine-tuning;
2. ``mdm data shards --from audio-jsonl``: audio shards of the pretraining corpus, and
   ``mdm data audio-stats``: their per-mel-bin filterbank statistics, the front end's ``mel_stats`` in
   every later command (tokenizers, pretraining, fine-tuning; docs/audio.md §7);
3. ``mdm tokenizer train`` — BEATs iteration 1: the random-projection acoustic tokenizer
   (``configs/tokenizer/acoustic_demo_iter1.yaml``), its codebook usage on held-out clips;
4. ``mdm pretrain`` — AudioMAE (``configs/pretrain/demo_audiomae.yaml``) and BEATs iteration 1
   (``configs/pretrain/demo_beats.yaml``, against the iteration-1 codes); with ``--jobs 2`` BEATs runs in
   a child process on the second core;
5. ``mdm tokenizer train`` — BEATs iteration 2 (not with ``--quick``): the self-distilled tokenizer
   learns from the iteration-1 model (``configs/tokenizer/acoustic_demo_iter2.yaml``);
6. ``mdm finetune`` — sound classification (``audio_classification``, ESC-50 layout, folds 1–4 → fold 5)
   from the AudioMAE model, the BEATs model, and from scratch with each architecture, same recipe and
   seed (``configs/finetune/demo_audio.yaml``);
7. the report: ``<out>/report.md`` with the pretraining curves, the tokenizer usage, the spectrogram
   figure (input, masked input, AudioMAE's reconstruction) and the table, also printed.

Everything is seeded: the same ``--seed`` on the same machine gives the same table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mdm.demo import MARKER, DemoError, Stages, configs_dir, run_command

#: (name, init, architecture of a scratch run) of the fine-tunings.
RUNS = (
    ("audiomae", "pretrain/audiomae/model", "audiomae_tiny"),
    ("beats", "pretrain/beats/model", "beats_tiny"),
    ("scratch-audiomae", "scratch", "audiomae_tiny"),
    ("scratch-beats", "scratch", "beats_tiny"),
)


@dataclass
class AudioPlan:
    """Sizes and per-command overrides of one audio demo run (``--quick`` shrinks everything).

    Attributes:
        quick: the smoke-test variant.
        pretrain_clips_per_class: clips per class of the unlabelled pretraining corpus.
        task_clips_per_class: clips per class of the labelled ESC-50-layout world.
        duration: seconds per clip.
        frames: fbank frames of a clip (the model's position table, the front end's target length).
        iteration2: train BEATs' iteration-2 tokenizer.
        tokenizer / pretrain / tokenizer2 / finetune: overrides of the shipped configs.
    """

    quick: bool
    pretrain_clips_per_class: int = 60
    task_clips_per_class: int = 20
    duration: float = 3.0
    frames: int = 304
    iteration2: bool = True
    tokenizer: list[str] = field(default_factory=list)
    pretrain: list[str] = field(default_factory=list)
    tokenizer2: list[str] = field(default_factory=list)
    finetune: list[str] = field(default_factory=list)


def make_plan(quick: bool) -> AudioPlan:
    """The full audio demo, or the ``--quick`` smoke test (same pipeline, tiny sizes and step counts)."""
    if not quick:
        return AudioPlan(False)
    return AudioPlan(
        True,
        pretrain_clips_per_class=4,
        task_clips_per_class=5,
        duration=1.0,
        frames=112,
        iteration2=False,
        tokenizer=["audio.eval_clips=16"],
        pretrain=["train.steps=12", "optim.warmup_steps=2", "logging.every=3", "data.audio.batch_size=8"],
        finetune=["epochs=2", "warmup_epochs=0.5", "logging.every=2"],
    )


def _frames(plan: AudioPlan) -> list[str]:
    return [f"model.audio_frames={plan.frames}", f"data.audio_frontend.target_frames={plan.frames}"]


def prepare_out(out: Path, seed: int, quick: bool) -> None:
    """Empties a previous demo directory (never one mdm did not create) and marks ``out``."""
    import shutil

    if out.exists() and any(out.iterdir()):
        if not (out / MARKER).is_file():
            raise DemoError(
                f"{out} exists, is not empty and was not written by mdm demo; choose another --out"
            )
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text(json.dumps({"seed": seed, "quick": quick, "modality": "audio"}) + "\n")


def stage_worlds(out: Path, plan: AudioPlan, seed: int) -> dict[str, Any]:
    from mdm.data.demo.sound_writers import write_sound_world

    pre = write_sound_world(
        out / "world" / "pretrain", plan.pretrain_clips_per_class, 1000 + seed, plan.duration
    )
    task = write_sound_world(out / "world" / "esc50", plan.task_clips_per_class, seed, plan.duration)
    info = {"pretrain_clips": pre["clips"], "task_clips": task["clips"], "classes": task["classes"]}
    print(json.dumps(info))
    return info


def mel_stats_path(out: Path) -> str:
    """Per-mel-bin statistics of the pretraining corpus (unlabelled clips: no fine-tuning label is seen)."""
    return f"{out}/shards/mel_stats.json"


def stage_shards(out: Path) -> None:
    run_command(["data", "shards", "--from", "audio-jsonl", "--jsonl", f"{out}/world/pretrain/captions.jsonl",
                 "--out", f"{out}/shards/audio", "--max-count", "1000000"])  # fmt: skip
    run_command(["data", "audio-stats", "--shards", f"{out}/shards/audio", "--out", mel_stats_path(out)])


def tokenizer_argv(out: Path, plan: AudioPlan, seed: int, cfg: Path, iteration: int) -> list[str]:
    name = f"iter{iteration}"
    argv = ["tokenizer", "train", "--config", f"{cfg}/tokenizer/acoustic_demo_{name}.yaml", "--no-progress",
            f"out_dir={out}/tokenizers/{name}", f"seed={seed}", f"audio.demo_seed={1000 + seed}",
            f"audio.demo_duration={plan.duration}", f"audio.frontend.mel_stats={mel_stats_path(out)}"]  # fmt: skip
    if iteration == 2:
        argv += [
            f"audio_teacher.model_dir={out}/pretrain/beats/model",
            f"acoustic_vqkd.audio_frames={plan.frames}",
        ]
        return argv + plan.tokenizer2
    return argv + plan.tokenizer


def pretrain_argv(out: Path, plan: AudioPlan, seed: int, cfg: Path, which: str) -> list[str]:
    argv = ["pretrain", "--config", f"{cfg}/pretrain/demo_{which}.yaml",
            f"data.audio.sources=[{{shards: [{out}/shards/audio]}}]", f"train.out_dir={out}/pretrain/{which}",
            f"train.seed={seed}", "logging.progress=false", f"data.audio_frontend.mel_stats={mel_stats_path(out)}",
            *_frames(plan), *plan.pretrain]  # fmt: skip
    if which == "beats":
        argv.append(f"audio_tokenizer={out}/tokenizers/iter1")
    return argv


def finetune_argv(
    out: Path, plan: AudioPlan, seed: int, cfg: Path, name: str, init: str, arch: str
) -> list[str]:
    """``mdm finetune`` arguments of one run; pretrained and scratch runs differ only in ``init``."""
    run_dir = out / "finetune" / name
    source = f"{out}/{init}" if init != "scratch" else "scratch"
    return ["finetune", "--config", f"{cfg}/finetune/demo_audio.yaml", "--metrics-json", f"{run_dir}/metrics.json",
            f"data.root={out}/world/esc50", f"init={source}", f"model.arch={arch}", f"model.audio_frames={plan.frames}",
            f"data.audio.frontend.target_frames={plan.frames}", f"data.audio.frontend.mel_stats={mel_stats_path(out)}",
            f"train.out_dir={run_dir}", f"train.seed={seed}", "logging.progress=false", *plan.finetune]  # fmt: skip


def run_child(argv: list[str], log_file: Path) -> subprocess.Popen:
    """``mdm <argv>`` in a single-threaded child process, output in ``log_file``."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    print(f"[background] $ mdm {' '.join(argv)}  (log: {log_file})", flush=True)
    return subprocess.Popen([sys.executable, "-m", "mdm.cli", *argv], stdout=log_file.open("w"),
                            stderr=subprocess.STDOUT, env=env)  # fmt: skip


def wait_child(proc: subprocess.Popen, log_file: Path, name: str) -> None:
    if proc.wait() != 0:
        raise DemoError(f"{name} failed (exit code {proc.returncode}); see {log_file}")


def stage_pretrain(out: Path, plan: AudioPlan, seed: int, cfg: Path, jobs: int) -> None:
    beats = pretrain_argv(out, plan, seed, cfg, "beats")
    if jobs > 1:
        log_file = out / "pretrain" / "beats.log"
        proc = run_child(beats, log_file)
        run_command(pretrain_argv(out, plan, seed, cfg, "audiomae"))
        wait_child(proc, log_file, "BEATs pretraining")
        return
    run_command(pretrain_argv(out, plan, seed, cfg, "audiomae"))
    run_command(beats)


def stage_finetune(out: Path, plan: AudioPlan, seed: int, cfg: Path, jobs: int) -> None:
    """The four fine-tunings; with two jobs, the scratch runs go to a child process one after the other."""
    here = [r for r in RUNS if r[1] != "scratch"] if jobs > 1 else list(RUNS)
    procs = []
    if jobs > 1:
        cmds = [finetune_argv(out, plan, seed, cfg, n, i, a) for n, i, a in RUNS if i == "scratch"]
        script = "; ".join(f"{sys.executable} -m mdm.cli " + " ".join(_quote(x) for x in c) for c in cmds)
        log_file = out / "finetune" / "scratch.log"
        log_file.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        print(f"[background] scratch fine-tunings (log: {log_file})", flush=True)
        procs.append(subprocess.Popen(["bash", "-c", f"set -e; {script}"], stdout=log_file.open("w"),
                                      stderr=subprocess.STDOUT, env=env))  # fmt: skip
    for name, init, arch in here:
        print(f"\n--- fine-tuning sound classification: {name}", flush=True)
        run_command(finetune_argv(out, plan, seed, cfg, name, init, arch))
    for proc in procs:
        wait_child(proc, out / "finetune" / "scratch.log", "scratch fine-tunings")


def _quote(s: str) -> str:
    import shlex

    return shlex.quote(s)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mdm demo --modality audio",
        description="Acoustic tokenizer → AudioMAE and BEATs pretraining → sound classification (pretrained "
        "vs scratch) → report, on the generated sound world. About 10 minutes on 2 CPU cores (--quick: ~1).",
    )
    p.add_argument("--modality", choices=["audio"], default="audio")
    p.add_argument("--out", default="mdm-demo-audio", help="output directory (default: mdm-demo-audio/)")
    p.add_argument("--seed", type=int, default=0, help="seed of the worlds and of every training run")
    p.add_argument("--quick", action="store_true", help="a much smaller run (smoke test)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument(
        "--jobs",
        type=int,
        default=min(2, os.cpu_count() or 1),
        help="processes at once (default: min(2, cores))",
    )
    return p


def main(argv: list[str]) -> int:
    """Entry point of ``mdm demo --modality audio``."""
    import torch

    from mdm.demo_audio_report import collect, print_table, write_report

    args = build_parser().parse_args(argv)
    torch.set_num_threads(max(1, args.threads))
    out, plan, seed = Path(args.out), make_plan(args.quick), args.seed
    try:
        cfg = configs_dir()
        prepare_out(out, seed, args.quick)
        st = Stages(total=7 if plan.iteration2 else 6)
        start = time.perf_counter()
        st.run("sound worlds", lambda: stage_worlds(out, plan, seed))
        st.run("audio shards", lambda: stage_shards(out))
        st.run(
            "acoustic tokenizer (iteration 1)", lambda: run_command(tokenizer_argv(out, plan, seed, cfg, 1))
        )
        st.run("pretraining (AudioMAE, BEATs)", lambda: stage_pretrain(out, plan, seed, cfg, args.jobs))
        if plan.iteration2:
            st.run(
                "acoustic tokenizer (iteration 2)",
                lambda: run_command(tokenizer_argv(out, plan, seed, cfg, 2)),
            )
        st.run("fine-tuning", lambda: stage_finetune(out, plan, seed, cfg, args.jobs))
        results = collect(out, plan, seed)
        results["wall_seconds"] = time.perf_counter() - start
        results["stage_seconds"] = dict(st.times)
        report = st.run("report", lambda: write_report(out, results))
    except DemoError as e:
        print(f"mdm demo: {e}", file=sys.stderr)
        return 1
    print_table(results)
    print(f"\nreport: {report}\ntotal: {time.perf_counter() - start:.0f} s")
    return 0
