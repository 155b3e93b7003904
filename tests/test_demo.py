"""``mdm demo --quick`` end to end through the real ``mdm`` entry point: every stage runs, the report and
its figures are written, the table printed at the end is the one in ``finetune/results.json``, the
exported models load, and a directory that mdm did not create is never emptied."""

from __future__ import annotations

import json
import re

import pytest

from mdm.cli import main as mdm_main
from mdm.data.demo.report import METRICS
from mdm.demo import MARKER, TASKS, make_plan


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "run"
    return out, mdm_main(["demo", "--quick", "--out", str(out), "--seed", "3", "--jobs", "2"])


@pytest.mark.slow
def test_quick_demo_writes_report_table_and_exports(quick_run, capsys):
    out, code = quick_run
    assert code == 0
    results = json.loads((out / "finetune" / "results.json").read_text())
    assert set(results) == set(TASKS) and all(set(r) == {"pretrained", "scratch"} for r in results.values())
    report = (out / "report.md").read_text()
    for task, keys in METRICS.items():
        for key in keys:
            p, s = results[task]["pretrained"][key], results[task]["scratch"][key]
            row = f"| {task} | {key} | {p:.2f} | {s:.2f} | {p - s:.2f} |"
            assert row in report, row
    for png in re.findall(r"\]\((report/[^)]+\.png)\)", report):
        assert (out / png).stat().st_size > 1000, png
    assert len(re.findall(r"\.png\)", report)) >= 8
    pre = [json.loads(x) for x in (out / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    assert {"mim_loss", "mlm_loss", "mvlm_image_loss", "mvlm_text_loss"} <= set(pre[-1])
    assert pre[-1]["step"] == 30

    import mdm

    backbone = mdm.from_pretrained(out / "export" / "pretrained")
    assert backbone.cfg.img_size == 48 and backbone.cfg.grid_size == 3
    for task in TASKS:
        assert (out / "export" / task / "heads.safetensors").is_file()


@pytest.mark.slow
def test_quick_demo_is_deterministic_where_cheap_to_check(quick_run, tmp_path):
    """Data, tokenizers and pretraining input are functions of the seed: regenerate the cheap parts."""
    from mdm.cli import main

    out, _ = quick_run
    from mdm.data.demo import QUICK, write_demo_dataset

    write_demo_dataset(tmp_path / "data", QUICK, seed=3)
    for rel in (
        "corpus.txt",
        "vqav2/v2_mscoco_val2014_annotations.json",
        "nlvr2/dev.json",
        "retrieval/dataset_coco.json",
    ):
        assert (tmp_path / "data" / rel).read_bytes() == (out / "data" / rel).read_bytes(), rel
    plan = make_plan(quick=True)
    assert main(["tokenizer", "train-text", "--input", str(tmp_path / "data" / "corpus.txt"), "--out",
                 str(tmp_path / "spm"), "--vocab-size", str(plan.text_vocab), "--model-type", "bpe",
                 "--embedding-rows", "512"]) == 0  # fmt: skip
    assert (tmp_path / "spm" / "spm.model").read_bytes() == (
        out / "tokenizers" / "text" / "spm.model"
    ).read_bytes()


@pytest.mark.slow
def test_same_seed_same_table_whether_runs_are_in_background_or_not(quick_run, tmp_path):
    """The default run puts scratch and one pretrained fine-tuning in a child process (``--jobs 2``); a
    second run with everything in one process (``--jobs 1``) must give exactly the same table."""
    out, code = quick_run
    assert code == 0
    again = tmp_path / "again"
    assert mdm_main(["demo", "--quick", "--out", str(again), "--seed", "3", "--jobs", "1"]) == 0
    first = json.loads((out / "finetune" / "results.json").read_text())
    second = json.loads((again / "finetune" / "results.json").read_text())
    assert first == second
    assert (out / "finetune" / "retrieval-pretrained.log").is_file()  # it did run in the background
    assert not (again / "finetune" / "retrieval-pretrained.log").exists()


def test_refuses_to_empty_a_directory_it_did_not_create(tmp_path, capsys):
    (tmp_path / "precious.txt").write_text("keep me")
    assert mdm_main(["demo", "--quick", "--out", str(tmp_path)]) == 1
    assert (tmp_path / "precious.txt").read_text() == "keep me"
    assert "not written by mdm demo" in capsys.readouterr().err
    assert not (tmp_path / MARKER).exists()
