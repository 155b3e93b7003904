"""Several demo seeds in one table: mean ± spread per task, pretrained vs scratch, and whether a margin holds.

One seed's held-out splits are small (600 VQA questions, 400 NLVR2 statements, 500 retrieval captions),
so a margin of a few points can be one seed's luck. ``mdm demo --seeds 0,1,2`` runs the whole demo once
per seed (``<out>/seed-<N>/``, each with its own report) and this module writes ``<out>/report.md`` with,
per task and metric: the mean and spread of the pretrained and the scratch runs, the mean margin and its
spread, the smallest margin, and whether the margin holds on every seed (smallest margin > 0) and
exceeds its spread. The spread is the sample standard deviation over seeds.

With ``--ft-seeds`` a seed's value of each task is the mean over its fine-tuning seeds
(``<out>/seed-<N>/finetune/ft_seeds.json``), so a margin is judged over pretraining seeds, each averaged
over fine-tunings.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from mdm.report import markdown_table, text_table

__all__ = [
    "SeedRow",
    "HEADLINE",
    "seed_rows",
    "seeds_table",
    "write_seeds_report",
    "read_seed_results",
    "mean_over_ft_seeds",
    "ft_seeds_table",
]

#: The metric each task is judged by, then the other metrics shown.
HEADLINE: dict[str, tuple[str, ...]] = {
    "vqav2": ("vqa_acc",),
    "nlvr2": ("nlvr2_acc",),
    "retrieval": ("r_mean", "tr_r1", "ir_r1"),
    "captioning": ("CIDEr_beam", "CIDEr"),
}
HEADER = ("task", "metric", "pretrained", "scratch", "margin", "min margin", "holds")

Results = dict[str, dict[str, dict[str, float]]]  # {task: {init: metrics}}


@dataclass
class SeedRow:
    """One task metric over seeds (values in the metric's units)."""

    task: str
    metric: str
    pretrained: list[float]
    scratch: list[float]

    @property
    def margins(self) -> list[float]:
        return [p - s for p, s in zip(self.pretrained, self.scratch)]

    @property
    def holds(self) -> bool:
        """The margin is positive on every seed and its mean exceeds its spread."""
        m = self.margins
        return min(m) > 0 and statistics.fmean(m) > spread(m)


def spread(values: Sequence[float]) -> float:
    """Sample standard deviation (0 for a single value)."""
    return statistics.stdev(values) if len(values) > 1 else 0.0


def _pm(values: Sequence[float]) -> str:
    return f"{statistics.fmean(values):.2f} ± {spread(values):.2f}"


def seed_rows(per_seed: dict[int, Results]) -> list[SeedRow]:
    """Rows of :data:`HEADLINE` metrics for the tasks every seed has."""
    seeds = sorted(per_seed)
    rows = []
    for task, metrics in HEADLINE.items():
        if not all(task in per_seed[s] for s in seeds):
            continue
        for k in metrics:
            rows.append(
                SeedRow(
                    task,
                    k,
                    [float(per_seed[s][task]["pretrained"][k]) for s in seeds],
                    [float(per_seed[s][task]["scratch"][k]) for s in seeds],
                )
            )
    return rows


def _cells(r: SeedRow) -> tuple[str, ...]:
    return (r.task, r.metric, _pm(r.pretrained), _pm(r.scratch), _pm(r.margins), f"{min(r.margins):+.2f}",
            "yes" if r.holds else "no")  # fmt: skip


def seeds_table(per_seed: dict[int, Results], markdown: bool = False) -> str:
    """The summary table, as markdown or aligned text."""
    rows = [_cells(r) for r in seed_rows(per_seed)]
    return markdown_table(HEADER, rows) if markdown else text_table(HEADER, rows)


def mean_over_ft_seeds(results: Results, table: dict) -> Results:
    """``results`` with each task of an ``ft_seeds.json`` table replaced by the mean over its fine-tuning
    seeds (metric by metric, for the metrics every run has)."""
    runs = [table["runs"][str(k)] for k in table["ft_seeds"]]
    out = {task: dict(inits) for task, inits in results.items()}
    for task in table["tasks"]:
        out[task] = {}
        for init in runs[0][task]:
            keys = set.intersection(*(set(r[task][init]) for r in runs))
            out[task][init] = {
                k: statistics.fmean(float(r[task][init][k]) for r in runs) for k in sorted(keys)
            }
    return out


def ft_seeds_table(table: dict, markdown: bool = False) -> str:
    """Per task headline metric of an ``ft_seeds.json`` table: pretrained and scratch over the fine-tuning
    seeds (mean ± sample sd), the paired margins and their mean."""
    seeds = table["ft_seeds"]
    rows = []
    for task in table["tasks"]:
        for k in HEADLINE[task][:1]:
            pre = [float(table["runs"][str(s)][task]["pretrained"][k]) for s in seeds]
            scr = [float(table["runs"][str(s)][task]["scratch"][k]) for s in seeds]
            margins = [p - c for p, c in zip(pre, scr)]
            rows.append((task, k, _pm(pre), _pm(scr), " / ".join(f"{m:+.2f}" for m in margins),
                         f"{statistics.fmean(margins):+.2f}"))  # fmt: skip
    header = (
        "task",
        "metric",
        "pretrained",
        "scratch",
        f"margins (ft seeds {', '.join(map(str, seeds))})",
        "mean",
    )
    return markdown_table(header, rows) if markdown else text_table(header, rows)


def read_seed_results(out: str | Path, seeds: Sequence[int]) -> dict[int, Results]:
    """``{seed: results}`` from ``<out>/seed-<N>/finetune/results.json`` (averaged over the fine-tuning seeds
    of ``ft_seeds.json`` beside it, if any); a missing seed is an error naming it."""
    per_seed = {}
    for s in seeds:
        path = Path(out) / f"seed-{s}" / "finetune" / "results.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: seed {s} has no results (run mdm demo --seeds ... first)")
        per_seed[s] = json.loads(path.read_text())
        ft = path.with_name("ft_seeds.json")
        if ft.is_file():
            per_seed[s] = mean_over_ft_seeds(per_seed[s], json.loads(ft.read_text()))
    return per_seed


def _ft_seeds_note(out: Path, seeds: Sequence[int]) -> list[str]:
    tables = [out / f"seed-{s}" / "finetune" / "ft_seeds.json" for s in seeds]
    if not any(t.is_file() for t in tables):
        return []
    lines = []
    for s, t in zip(seeds, tables):
        if t.is_file():
            table = json.loads(t.read_text())
            lines += [f"Seed {s}, fine-tuning seeds {', '.join(map(str, table['ft_seeds']))}:", "",
                      ft_seeds_table(table, markdown=True), ""]  # fmt: skip
        else:
            lines += [f"Seed {s}: one fine-tuning per task (no `ft_seeds.json`).", ""]
    return lines


def write_seeds_report(out: str | Path, per_seed: dict[int, Results], times: dict[int, float]) -> Path:
    """Writes ``<out>/report.md``: the seeds table, per-seed margins and links to the per-seed reports."""
    out = Path(out)
    seeds = sorted(per_seed)
    rows = seed_rows(per_seed)
    lines = [
        "# mdm demo report: several seeds",
        "",
        f"Seeds {', '.join(map(str, seeds))}; each seed is a whole demo (data, tokenizers, pretraining, "
        "fine-tuning) in `seed-<N>/`. Values are mean ± sample standard deviation over seeds; *holds* "
        "means the margin is positive on every seed and its mean exceeds its spread."
        + (
            " A seed's values are the means over its fine-tuning seeds (below)."
            if _ft_seeds_note(out, seeds)
            else ""
        ),
        "",
        seeds_table(per_seed, markdown=True),
        "",
        "Margins per seed:",
        "",
        markdown_table(
            ("task", "metric", *[f"seed {s}" for s in seeds]),
            [(r.task, r.metric, *[f"{m:+.2f}" for m in r.margins]) for r in rows],
        ),
        "",
        "Wall time per seed: " + ", ".join(f"seed {s} {times[s]:.0f} s" for s in seeds if s in times) + ".",
        "",
        *_ft_seeds_note(out, seeds),
    ]
    lines += [f"- [seed {s}](seed-{s}/report.md)" for s in seeds]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
