"""``mdm launch``: plan a multi-node run, or print the commands that start it.

    mdm launch --dry-run --nodes 8 --gpus-per-node 8 --config configs/pretrain/beit3_base_mdm.yaml
    mdm launch --nodes 2 --gpus-per-node 8 --config configs/finetune/vqav2_base.yaml   # print commands

``--dry-run`` builds the model on the meta device and prints parameters per expert, the work and
the memory per rank for each ZeRO stage (see :mod:`mdm.launch.memory` for the formulas), the global
batch and the steps. It needs no GPU and reads no data. Without ``--dry-run`` it prints how to start
the run with each launcher script in ``launch/`` (``torchrun.sh``, ``deepspeed.sh``, ``slurm.sbatch``).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from typing import Any

from mdm.launch.memory import GiB, path_parameters
from mdm.launch.plan import Plan, build_plan

_EXPERTS = ("vision", "text", "vl", "shared")


def _parse_batch(text: str) -> dict[str, int]:
    out = {}
    for item in filter(None, text.split(",")):
        if "=" not in item:
            raise argparse.ArgumentTypeError(
                f"--batch {text!r}: use stream=N[,stream=N] (e.g. image=32,text=32)"
            )
        k, v = item.split("=", 1)
        out[k.strip()] = int(v)
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mdm launch", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="pretraining or fine-tuning YAML")
    p.add_argument("--nodes", type=int, default=1, help="machines")
    p.add_argument("--gpus-per-node", type=int, default=8, help="processes per machine")
    p.add_argument(
        "--dry-run", action="store_true", help="print the plan (parameters, memory, batch) and exit"
    )
    p.add_argument(
        "--command", choices=("pretrain", "finetune"), default=None, help="default: from the config"
    )
    p.add_argument(
        "--batch", type=_parse_batch, default={}, help="micro-batch per stream, e.g. image=32,text=32,pair=32"
    )
    p.add_argument("--json", action="store_true", help="with --dry-run: machine-readable output")
    p.add_argument("overrides", nargs="*", help="dotted key=value config overrides")
    return p


def _m(n: float) -> str:
    return f"{n / 1e6:9.2f}" if n else "        -"


def _g(b: float) -> str:
    return f"{b / GiB:8.2f}"


def _parameter_lines(plan: Plan) -> list[str]:
    lines = ["parameters (M)      " + "".join(f"{e:>9}" for e in (*_EXPERTS, "total"))]
    components = sorted(
        {c for c, _ in plan.table},
        key=["embeddings", "attention", "ffn", "layer_scale", "final_norm", "other"].index,
    )
    for c in components:
        row = [plan.table.get((c, e), 0) for e in _EXPERTS]
        lines.append(f"  {c:<18}" + "".join(_m(n) for n in row) + _m(sum(row)))
    totals = [sum(n for (_, e), n in plan.table.items() if e == x) for x in _EXPERTS]
    lines.append(f"  {'backbone':<18}" + "".join(_m(n) for n in totals) + _m(sum(totals)))
    paths = ", ".join(f"{k} {v / 1e6:.1f} M" for k, v in path_parameters(plan.table).items())
    lines.append(f"  a forward runs through: {paths}")
    if plan.extra_params:
        lines.append(
            "  heads/objectives: " + ", ".join(f"{k} {v / 1e6:.2f} M" for k, v in plan.extra_params.items())
        )
    frozen = (
        f"; frozen (visual tokenizer, replicated) {plan.frozen_params / 1e6:.1f} M"
        if plan.frozen_params
        else ""
    )
    lines.append(f"  trainable {plan.trainable / 1e6:.1f} M{frozen}")
    return lines


def _batch_lines(plan: Plan) -> list[str]:
    lines = ["work per rank and micro-batch"]
    for p in plan.passes:
        logits = ", ".join(f"{pos:.0f}×{c}" for pos, c in p.logits)
        lines.append(f"  {p.name:<32} {p.batch:>5} × {p.tokens:>4} tokens × {p.layers:>2} layers (D={p.dim})"
                     + (f"; logits {logits} per sequence" if logits else ""))  # fmt: skip
    micro = ", ".join(f"{k} {v}" for k, v in plan.micro_batch.items())
    glob = ", ".join(f"{k} {v}" for k, v in plan.global_batch.items())
    total = sum(plan.global_batch.values())
    lines.append(f"batch: micro {micro}; grad_accum {plan.grad_accum}; {plan.world_size} ranks "
                 f"→ global {glob} ({total} samples per step)")  # fmt: skip
    flops = plan.step_flops()
    if plan.steps is not None:
        lines.append(f"steps: {plan.steps:,} → {plan.steps * total:,} samples, {flops:.3g} model FLOPs per step, "
                     f"{flops * plan.steps:.3g} in total")  # fmt: skip
    else:
        lines.append(
            f"steps: {plan.epochs:g} epochs (steps depend on the dataset size); {flops:.3g} FLOPs per step"
        )
    return lines


def _memory_lines(plan: Plan) -> list[str]:
    states = plan.states()
    half = plan.precision != "fp32"
    act = {c: plan.activations(c) for c in (False, True)}
    frozen = plan.frozen_bytes()
    rows = [
        (f"parameters ({'16-bit' if half else 'fp32'})", [s.params for s in states]),
        (f"gradients ({'16-bit' if half else 'fp32'})", [s.grads for s in states]),
        (
            "optimizer (" + ("fp32 master + Adam m, v" if half else "Adam m, v") + ")",
            [s.optimizer for s in states],
        ),
        ("model states", [s.total for s in states]),
        ("activations", [act[False]] * 4),
        ("activations, checkpointed", [act[True]] * 4),
    ]
    if frozen:
        rows.append(("frozen tokenizer", [frozen] * 4))
    rows += [
        ("total", [s.total + act[False] + frozen for s in states]),
        ("total, checkpointed", [s.total + act[True] + frozen for s in states]),
    ]
    lines = [f"memory per rank (GiB), {plan.precision}" + " " * 12 + "".join(f"  ZeRO-{s}" for s in range(4))]
    for label, values in rows:
        lines.append(f"  {label:<38}" + "".join(_g(v) for v in values))
    lines.append(
        f"  (configured: ZeRO stage {plan.zero_stage}; activation formula and assumptions: docs/launch.md)"
    )
    return lines


def format_plan(plan: Plan) -> str:
    """The human-readable dry-run report."""
    m = plan.model
    head = [
        f"config: {plan.config_path} (mdm {plan.command})",
        f"cluster: {plan.nodes} node(s) × {plan.gpus_per_node} GPU(s) = {plan.world_size} ranks",
        f"model: {m.arch}: depth {m.depth}, width {m.embed_dim}, {m.num_heads} heads, FFN {m.ffn_dim}, "
        f"{m.img_size} px / patch {m.patch_size} ({m.num_patches} patches), "
        f"{'shared' if m.shared_attention else 'multiway'} attention, VL-FFN in top {m.vl_ffn_layers} layers",
    ]
    notes = [f"note: {n}" for n in plan.notes]
    return "\n".join(
        head
        + [""]
        + _parameter_lines(plan)
        + [""]
        + _batch_lines(plan)
        + [""]
        + _memory_lines(plan)
        + [""]
        + notes
    )


def plan_to_dict(plan: Plan) -> dict[str, Any]:
    """A JSON-serialisable summary (bytes per rank, parameter counts)."""
    return {
        "command": plan.command, "world_size": plan.world_size, "precision": plan.precision,
        "parameters": {f"{c}.{e}": n for (c, e), n in sorted(plan.table.items())},
        "paths": path_parameters(plan.table), "heads": plan.extra_params, "trainable": plan.trainable,
        "frozen": plan.frozen_params, "micro_batch": plan.micro_batch, "global_batch": plan.global_batch,
        "grad_accum": plan.grad_accum, "steps": plan.steps, "step_flops": plan.step_flops(),
        "zero": [vars(s) | {"total": s.total} for s in plan.states()],
        "activations": {"no_checkpointing": plan.activations(False), "checkpointing": plan.activations(True)},
    }  # fmt: skip


def launch_commands(args: argparse.Namespace, command: str) -> str:
    """How to start this run with each script in ``launch/``."""
    run = " ".join(shlex.quote(x) for x in [command, "--config", args.config, *args.overrides])
    n, g = args.nodes, args.gpus_per_node
    lines = [f"# one machine, {g} processes:", f"NPROC_PER_NODE={g} launch/torchrun.sh {run}"]
    if n > 1:
        lines += [
            f"# {n} machines: run on each with NODE_RANK=0..{n - 1} and node 0's address",
            f"NNODES={n} NODE_RANK=<r> MASTER_ADDR=<node0> MASTER_PORT=29500 NPROC_PER_NODE={g} launch/torchrun.sh {run}",
        ]
    lines += [
        "# DeepSpeed launcher over a hostfile ('host slots=N' per line):",
        f"HOSTFILE=hosts NUM_GPUS={g} launch/deepspeed.sh {run}",
        "# SLURM:",
        f"sbatch --nodes={n} --gpus-per-node={g} launch/slurm.sbatch {run}",
    ]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    from mdm.config import ConfigError

    try:
        plan = build_plan(
            args.config, args.nodes, args.gpus_per_node, args.command, args.overrides, args.batch
        )
    except (ConfigError, ValueError, KeyError, FileNotFoundError) as e:
        print(f"mdm launch: {e}", file=sys.stderr)
        return 2
    if not args.dry_run:
        print(launch_commands(args, plan.command))
        return 0
    print(json.dumps(plan_to_dict(plan), indent=2) if args.json else format_plan(plan))
    return 0
