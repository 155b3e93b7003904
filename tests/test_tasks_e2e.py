"""Every recipe end to end on CPU: official-format fixtures → train a few steps → save → `mdm evaluate` /
`mdm predict` through their ``main(argv)``; metrics are checked against independent computations."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from mdm.cli import main as mdm_main
from mdm.models import create_model
from mdm.tasks import TaskConfig, TaskDataConfig, build_task, save_task_model
from mdm.tasks.cli_evaluate import main as evaluate_main
from mdm.tasks.cli_predict import main as predict_main
from mdm.tasks.fixtures import HashTokenizer, write_image_folder, write_karpathy, write_nlvr2, write_vqav2
from mdm.tasks.vqa_eval import question_accuracy, round_half_away

TOK = HashTokenizer(1024)
METRICS = {
    "vqav2": {"vqa_acc", "vqa_score"},
    "nlvr2": {"nlvr2_acc"},
    "retrieval": {"tr_r1", "tr_r5", "tr_r10", "ir_r1", "ir_r5", "ir_r10", "r_mean"},
    "classification": {"top1", "top5"},
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: intra-op threads only add contention on a shared 2-core machine (3 s vs 15 ms a step)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def roots(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("data")
    write_vqav2(base / "vqav2", {"train2014": 8, "val2014": 4, "test-dev2015": 3})
    write_nlvr2(base / "nlvr2", {"train": 8, "dev": 6, "test1": 3})
    write_karpathy(base / "retrieval", {"train": 6, "restval": 2, "val": 4, "test": 4})
    write_image_folder(base / "classification", {"train": 4, "val": 3})
    return {k: base / k for k in METRICS}


def finetune(name: str, root: Path, steps: int = 12, **data) -> tuple:
    task = build_task(
        TaskConfig(name=name), TaskDataConfig(root=str(root), image_size=32, num_workers=0, **data)
    )
    torch.manual_seed(0)
    model = task.build_model(create_model("vlmo_tiny", depth=2, img_size=32))
    loader = DataLoader(task.build_dataset("train", TOK), batch_size=4, shuffle=True, collate_fn=task.collate)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    while len(losses) < steps:
        for batch in loader:
            out = model(batch)
            parts = [v for k, v in out.items() if k.endswith("_loss")]  # the total is the sum of *_loss
            assert parts and torch.allclose(out["loss"], sum(parts))
            opt.zero_grad()
            out["loss"].backward()
            opt.step()
            losses.append(out["loss"].item())
    return task, model, losses


def _saved(tmp_path: Path, roots, name: str, **data) -> tuple:
    task, model, losses = finetune(name, roots[name], **data)
    assert all(torch.isfinite(torch.tensor(losses)))
    ckpt = save_task_model(tmp_path / f"{name}_model", model, task, text_tokenizer="hash:1024")
    return task, model, ckpt


def _evaluate(ckpt: Path, root: Path, tmp_path: Path, *extra: str) -> dict:
    out = tmp_path / "metrics.json"
    argv = [
        "--checkpoint",
        str(ckpt),
        f"data.root={root}",
        "--metrics-json",
        str(out),
        "--num-workers",
        "0",
        *extra,
    ]
    assert evaluate_main(argv) == 0
    return json.loads(out.read_text())


def test_vqav2_end_to_end_and_official_rescoring(tmp_path, roots):
    task, model, ckpt = _saved(tmp_path, roots, "vqav2", answer_min_count=1, val_holdout_images=2)
    metrics = _evaluate(ckpt, roots["vqav2"], tmp_path, "--split", "val2014")
    assert METRICS["vqav2"] <= set(metrics)

    sub = tmp_path / "val_predictions.json"
    argv = [
        "--checkpoint",
        str(ckpt),
        f"data.root={roots['vqav2']}",
        "--split",
        "val2014",
        "--output",
        str(sub),
    ]
    assert predict_main(argv + ["--num-workers", "0"]) == 0
    rows = json.loads(sub.read_text())
    assert all(set(r) == {"question_id", "answer"} and isinstance(r["answer"], str) for r in rows)
    # independent scoring from the raw annotation file
    anns = {
        a["question_id"]: a
        for a in json.loads((roots["vqav2"] / "v2_mscoco_val2014_annotations.json").read_text())[
            "annotations"
        ]
    }
    accs = [question_accuracy(r["answer"], anns[r["question_id"]]["answers"]) for r in rows]
    assert len(rows) == len(anns) and metrics["vqa_acc"] == round_half_away(100 * sum(accs) / len(accs))
    # `mdm evaluate --predictions` reproduces the number (through the top-level `mdm` command)
    out = tmp_path / "rescored.json"
    assert (
        mdm_main(
            [
                "evaluate",
                "--task",
                "vqav2",
                "--predictions",
                str(sub),
                f"data.root={roots['vqav2']}",
                "--split",
                "val2014",
                "--metrics-json",
                str(out),
            ]
        )
        == 0
    )
    assert json.loads(out.read_text())["vqa_acc"] == metrics["vqa_acc"]

    test = tmp_path / "submit.json"  # default split: test-dev2015, the EvalAI format
    assert (
        predict_main(
            [
                "--checkpoint",
                str(ckpt),
                f"data.root={roots['vqav2']}",
                "--output",
                str(test),
                "--num-workers",
                "0",
            ]
        )
        == 0
    )
    qs = json.loads((roots["vqav2"] / "v2_OpenEnded_mscoco_test-dev2015_questions.json").read_text())[
        "questions"
    ]
    assert [r["question_id"] for r in json.loads(test.read_text())] == [q["question_id"] for q in qs]


def test_nlvr2_end_to_end(tmp_path, roots):
    _, _, ckpt = _saved(tmp_path, roots, "nlvr2")
    metrics = _evaluate(ckpt, roots["nlvr2"], tmp_path)
    assert set(metrics) == METRICS["nlvr2"]
    out = tmp_path / "dev.json"
    assert (
        predict_main(
            [
                "--checkpoint",
                str(ckpt),
                f"data.root={roots['nlvr2']}",
                "--split",
                "dev",
                "--output",
                str(out),
                "--num-workers",
                "0",
            ]
        )
        == 0
    )
    preds = {r["identifier"]: r["prediction"] for r in json.loads(out.read_text())}
    rows = [json.loads(line) for line in (roots["nlvr2"] / "dev.json").read_text().splitlines()]
    assert metrics["nlvr2_acc"] == pytest.approx(
        100 * sum(preds[r["identifier"]] == r["label"] for r in rows) / len(rows)
    )
    rescored = tmp_path / "r.json"
    assert (
        evaluate_main(
            [
                "--task",
                "nlvr2",
                "--predictions",
                str(out),
                f"data.root={roots['nlvr2']}",
                "--metrics-json",
                str(rescored),
            ]
        )
        == 0
    )
    assert json.loads(rescored.read_text())["nlvr2_acc"] == pytest.approx(metrics["nlvr2_acc"])


def test_retrieval_end_to_end(tmp_path, roots):
    task, model, ckpt = _saved(tmp_path, roots, "retrieval")
    metrics = _evaluate(ckpt, roots["retrieval"], tmp_path, "--split", "test")
    assert set(metrics) == METRICS["retrieval"] and all(0 <= v <= 100 for v in metrics.values())
    out = tmp_path / "p.json"
    assert (
        predict_main(
            [
                "--checkpoint",
                str(ckpt),
                f"data.root={roots['retrieval']}",
                "--output",
                str(out),
                "--num-workers",
                "0",
            ]
        )
        == 0
    )
    rows = json.loads(out.read_text())
    assert len(rows) == 8 and all(len(r["retrieved"]) == 4 for r in rows)
    # IR@1 from the prediction file (ties are unlikely with real-valued features)
    assert metrics["ir_r1"] == pytest.approx(
        100 * sum(r["retrieved"][0] == r["image"] for r in rows) / len(rows)
    )


def test_classification_end_to_end(tmp_path, roots):
    task, model, ckpt = _saved(tmp_path, roots, "classification")
    metrics = _evaluate(ckpt, roots["classification"], tmp_path)
    assert set(metrics) == METRICS["classification"] and metrics["top5"] == 100.0  # 2 classes
    out = tmp_path / "p.json"
    assert (
        predict_main(
            [
                "--checkpoint",
                str(ckpt),
                f"data.root={roots['classification']}",
                "--output",
                str(out),
                "--num-workers",
                "0",
            ]
        )
        == 0
    )
    rows = json.loads(out.read_text())
    assert metrics["top1"] == pytest.approx(
        100 * sum(Path(r["image"]).parent.name == r["label"] for r in rows) / len(rows)
    )


def test_finetuned_directory_loads_as_backbone_and_exports_to_unilm(tmp_path):
    from mdm.export.command import export_checkpoint
    from mdm.models import from_pretrained

    task = build_task(
        TaskConfig(name="vqav2"), TaskDataConfig(root=str(tmp_path)), {"answers": ["yes", "no", "2"]}
    )
    model = task.build_model(create_model("beit3_tiny", depth=2, img_size=32))  # unilm's layout
    ckpt = save_task_model(tmp_path / "model", model, task, text_tokenizer="hash:1024")
    backbone = from_pretrained(ckpt)
    assert all(torch.equal(v, model.backbone.state_dict()[k]) for k, v in backbone.state_dict().items())
    export_checkpoint(str(ckpt), "unilm", str(tmp_path / "vqa.pth"))
    sd = torch.load(tmp_path / "vqa.pth", weights_only=False)["model"]
    assert torch.equal(sd["head.3.weight"], model.head[3].weight)
    assert torch.equal(sd["pooler.dense.bias"], model.pooler.dense.bias)


def test_fine_tuning_learns_the_fixture_vqa(roots):
    task, model, losses = finetune(
        "vqav2", roots["vqav2"], steps=40, answer_min_count=1, val_holdout_images=2
    )
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.7 * first, (first, last)


def test_cli_errors_are_for_people(tmp_path, roots, capsys):
    assert evaluate_main(["--checkpoint", str(tmp_path / "nope")]) == 2
    assert "not a fine-tuned mdm model directory" in capsys.readouterr().err
    _, _, ckpt = _saved(tmp_path, roots, "classification")
    assert evaluate_main(["--checkpoint", str(ckpt), "data.rot=/x"]) == 2
    assert "did you mean" in capsys.readouterr().err
    assert evaluate_main(["--checkpoint", str(ckpt), "--task", "nlvr2"]) == 2
    assert "is a 'classification' model" in capsys.readouterr().err
