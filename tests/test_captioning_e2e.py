"""Captioning end to end on CPU: Karpathy fixture → train a few steps → save → ``mdm predict`` (COCO
results) → ``mdm evaluate`` from the checkpoint and from the prediction file; and unilm / safetensors
export of a captioning model.

The caption metrics (:mod:`mdm.tasks.caption_eval`) are tested on their own; here the plumbing is: the
same candidates and references must reach them from both ``mdm evaluate`` paths.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from mdm.models import create_model
from mdm.tasks import TaskConfig, TaskDataConfig, build_task, save_task_model
from mdm.tasks.cli_evaluate import main as evaluate_main
from mdm.tasks.cli_predict import main as predict_main
from mdm.tasks.fixtures import HashTokenizer, write_karpathy

TOK = HashTokenizer(1024)
MASK_ID = 1023


@pytest.fixture(autouse=True)
def stand_in_metrics(monkeypatch):
    """Records what reaches ``mdm.tasks.caption_eval.evaluate_captions`` and runs the real scorer
    without METEOR (starting Java costs ~10 s a call)."""
    import mdm.tasks.caption_eval as module

    seen: list = []
    real = module.evaluate_captions

    def evaluate_captions(references, candidates, java=None):
        seen.append((dict(references), dict(candidates)))
        return real(references, candidates, java=False)

    monkeypatch.setattr(module, "evaluate_captions", evaluate_captions)
    yield seen


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _trained(tmp_path: Path, arch: str = "vlmo_tiny", steps: int = 8):
    root = tmp_path / "coco"
    write_karpathy(root, {"train": 6, "restval": 2, "val": 3, "test": 3})
    cfg = TaskConfig(
        name="captioning", mask_token_id=MASK_ID, beam_size=2, max_caption_len=6, label_smoothing=0.1
    )
    task = build_task(cfg, TaskDataConfig(root=str(root), image_size=32, num_workers=0, max_text_len=12))
    torch.manual_seed(0)
    model = task.build_model(create_model(arch, depth=2, img_size=32))
    loader = DataLoader(task.build_dataset("train", TOK), batch_size=4, shuffle=True, collate_fn=task.collate)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses: list[float] = []
    while len(losses) < steps:
        for batch in loader:
            out = model(batch)
            opt.zero_grad()
            out["loss"].backward()
            opt.step()
            losses.append(out["loss"].item())
    assert all(torch.isfinite(torch.tensor(losses)))
    ckpt = save_task_model(tmp_path / "model", model, task, text_tokenizer="hash:1024")
    return root, task, model, ckpt


def test_captioning_predict_and_evaluate(tmp_path, stand_in_metrics):
    root, task, model, ckpt = _trained(tmp_path)
    common = [f"data.root={root}", "--num-workers", "0"]
    preds = tmp_path / "captions.json"
    assert predict_main(["--checkpoint", str(ckpt), *common, "--output", str(preds)]) == 0
    rows = json.loads(preds.read_text())
    assert len(rows) == 3 and all(set(r) == {"image_id", "caption"} for r in rows)
    assert all(isinstance(r["image_id"], int) and isinstance(r["caption"], str) for r in rows)
    assert sorted(r["image_id"] for r in rows) == [11, 12, 13]  # the cocoids of the Karpathy test split

    m1 = tmp_path / "m1.json"
    assert (
        evaluate_main(["--checkpoint", str(ckpt), *common, "--split", "test", "--metrics-json", str(m1)]) == 0
    )
    m2 = tmp_path / "m2.json"
    argv = ["--task", "captioning", "--predictions", str(preds), f"data.root={root}", "--split", "test"]
    assert evaluate_main([*argv, "--metrics-json", str(m2)]) == 0
    metrics = json.loads(m1.read_text())
    assert metrics == json.loads(m2.read_text()) and "CIDEr" in metrics
    (refs1, cands1), (refs2, cands2) = stand_in_metrics
    assert refs1 == refs2 and cands1 == cands2 and len(refs1["11"]) == 2
    assert cands1 == {str(r["image_id"]): r["caption"] for r in rows}

    preds.write_text(json.dumps(rows[:2]))  # an image without a caption is an error that says so
    assert evaluate_main(argv) == 2


def test_captioning_export_unilm_round_trip(tmp_path):
    from mdm.export.unilm import mdm_to_unilm, unilm_to_task_state_dict, unilm_variant

    root, task, model, ckpt = _trained(tmp_path, arch="beit3_tiny", steps=1)
    sd = model.state_dict()
    backbone = {k[len("backbone.") :]: v for k, v in sd.items() if k.startswith("backbone.")}
    heads = {k: v for k, v in sd.items() if not k.startswith("backbone.")}
    assert set(heads) == {"mlm_head.weight", "mlm_head.bias"}  # BEiT3ForCaptioning's names and shapes
    assert unilm_variant(heads) == "captioning"
    unilm = mdm_to_unilm(backbone, heads)
    assert unilm["mlm_head.weight"].shape == (model.backbone.cfg.vocab_size, model.backbone.cfg.embed_dim)
    back = unilm_to_task_state_dict(unilm)
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)


def test_captioning_export_files(tmp_path):
    """``mdm export`` of a fine-tuned captioning model: unilm ``.pth`` with ``mlm_head.*``; safetensors
    directory with the head in ``heads.safetensors``."""
    from safetensors.torch import load_file

    from mdm.export.command import main as export_main

    root, task, model, ckpt = _trained(tmp_path, arch="beit3_tiny", steps=1)
    head = model.mlm_head.weight.detach()
    assert export_main(["--checkpoint", str(ckpt), "--format", "unilm", "--out", str(tmp_path / "u")]) == 0
    (pth,) = (tmp_path / "u").glob("*.pth")
    assert "captioning" in pth.name
    sd = torch.load(pth, map_location="cpu", weights_only=True)["model"]
    assert torch.equal(sd["mlm_head.weight"], head) and "mlm_head.bias" in sd
    assert (
        export_main(["--checkpoint", str(ckpt), "--format", "safetensors", "--out", str(tmp_path / "s")]) == 0
    )
    heads = load_file(str(tmp_path / "s" / "heads.safetensors"))
    assert torch.equal(heads["mlm_head.weight"], head)
