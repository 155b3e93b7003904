"""audio_classification: mAP against scikit-learn (ties included), the ESC-50 and AudioSet readers with
malformed records, SpecAugment and mixup, the head on BEATs and on a Multiway-style stand-in, and
`mdm finetune` → `mdm evaluate` end to end on the sound world, with the 5-fold cross-validation."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score
from torch import nn

from mdm.config import from_dict
from mdm.data.audio import PATCH
from mdm.data.demo.sound_writers import write_sound_world
from mdm.data.demo.sounds import CLASSES, TAGS
from mdm.models import create_model
from mdm.models.beats import BEATsConfig, build_beats
from mdm.models.io import save_pretrained
from mdm.tasks import TaskConfig, TaskDataConfig, build_task
from mdm.tasks.audio_classification import (
    AudioClassificationModel,
    ClipCollate,
    average_precision,
    mean_average_precision,
    mixup,
    pooled_audio_features,
)
from mdm.tasks.audio_data import spec_augment
from mdm.tasks.common import RecordError

TINY_BEATS = BEATsConfig(
    embed_dim=16,
    encoder_layers=2,
    encoder_embed_dim=32,
    encoder_ffn_embed_dim=64,
    encoder_attention_heads=4,
    conv_pos=4,
    conv_pos_groups=4,
    relative_position_embedding=True,
    num_buckets=16,
    max_distance=32,
    gru_rel_pos=True,
    deep_norm=True,
    num_mel_bins=64,
    dropout=0.0,
    attention_dropout=0.0,
)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---------------------------------------------------------------------------------------------- mAP
def test_average_precision_matches_sklearn_with_ties():
    rng = np.random.default_rng(0)
    for trial in range(30):
        n, c = rng.integers(5, 60), rng.integers(1, 6)
        scores = np.round(rng.normal(size=(n, c)), int(rng.integers(0, 2)))  # coarse rounding: many ties
        targets = (rng.random((n, c)) < rng.uniform(0.05, 0.6)).astype(int)
        targets[:, 0] = 0 if trial % 3 == 0 else targets[:, 0]  # a class without positives now and then
        ours, per_class = mean_average_precision(torch.tensor(scores), torch.tensor(targets))
        present = targets.sum(0) > 0
        with np.errstate(invalid="ignore", divide="ignore"):
            ref = (
                average_precision_score(targets[:, present], scores[:, present], average=None)
                if present.any()
                else []
            )
        ref = np.atleast_1d(ref)
        assert np.allclose([p for p in per_class if p is not None], ref, atol=1e-12)
        assert abs(ours - (ref.mean() if len(ref) else 0.0)) < 1e-12
        assert [p is None for p in per_class] == list(~present)
    # all scores tied: AP is the positive rate
    assert average_precision(torch.zeros(4), torch.tensor([1, 0, 0, 1]).bool()) == 0.5


# ---------------------------------------------------------------------------------------------- readers
@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sound_world")
    write_sound_world(root, 5, seed=0, duration=1.0)
    return root


def _task(root, fold=1, layout="auto", frames=96):
    audio = {"layout": layout, "frontend": {"num_mel_bins": 64, "target_frames": frames}}
    data = from_dict(TaskDataConfig, {"root": str(root), "num_workers": 0, "fold": fold, "audio": audio})
    return build_task(TaskConfig(name="audio_classification", pool="mean"), data)


def test_esc50_folds_and_malformed_records(world, tmp_path):
    root = tmp_path / "esc"
    shutil.copytree(world, root)
    csv = (root / "meta" / "esc50.csv").read_text().splitlines()
    csv += [
        "bad-row.wav,notafold,3,tone,True,1,A",
        "5-999999-A-0.wav,5,0,tone,True,999999,A",
    ]  # malformed, missing
    (root / "meta" / "esc50.csv").write_text("\n".join(csv) + "\n")
    (root / "audio" / "2-100011-A-1.wav").write_bytes(b"RIFFnonsense")  # undecodable
    task = _task(root, fold=2)
    assert task.layout == "esc50" and not task.multilabel and task.classes == list(CLASSES)
    assert task.resolve_split("train") == ["fold1", "fold3", "fold4", "fold5"] and task.resolve_split(
        "val"
    ) == ["fold2"]
    train, val = task.build_dataset("train"), task.build_dataset("val")
    assert len(train) == 40 and len(val) == 9  # fold 2 lost its undecodable clip
    assert {r.fold for r in train.items} == {1, 3, 4, 5} and {r.fold for r in val.items} == {2}
    assert dict(val.problems.counts) == {
        "malformed_record": 1,
        "bad_audio": 1,
    }  # fold 5's missing clip: not here
    assert dict(train.problems.counts) == {"malformed_record": 1, "missing_audio": 1}
    item = train[0]
    assert (
        item["audio"].shape == (96, 64) and item["n_frames"] == 96 and item["label"] == 0 and "mixup" in item
    )
    with pytest.raises(ValueError, match="data.fold"):
        _task(root, fold=0).build_dataset("train")
    strict = _task(root, fold=2)
    strict.data.on_error = "error"
    with pytest.raises(RecordError, match="esc50.csv:13: .*2-100011-A-1.wav: cannot decode"):
        strict.build_dataset("val")


def test_audioset_layout_multilabel(world, tmp_path):
    root = tmp_path / "as"
    shutil.copytree(world, root)
    seg = root / "eval_segments.csv"
    seg.write_text(seg.read_text() + 'zzz, 0.000, 1.000, "/m/nonexistent"\nshort, row\n')
    task = _task(root, layout="audioset")
    assert task.multilabel and task.classes == list(TAGS)
    val = task.build_dataset("val")
    assert len(val) == 10 and dict(val.problems.counts) == {"unknown_label": 1, "malformed_record": 1}
    meta = {c["file"][:-4]: c["tags"] for c in json.loads((root / "sounds.json").read_text())["clips"]}
    for i in range(len(val)):
        item = val[i]
        assert [TAGS[j] for j in torch.nonzero(item["labels"]).flatten()] == meta[item["key"]]
    assert len(task.build_dataset("train")) == 40


def test_spec_augment_and_mixup():
    torch.manual_seed(0)
    x = torch.randn(96, 64)
    y = spec_augment(x, 48, 18, fill=-9.0)
    masked = y == -9.0
    cols, rows = masked.all(0), masked.all(1)
    assert cols.sum() < 48 and rows.sum() < 18 and torch.equal(y[~masked], x[~masked])
    assert torch.equal(masked, cols[None, :] | rows[:, None])
    batch = {"audio": torch.randn(4, 32, 64), "label": torch.tensor([0, 1, 2, 3])}
    mixed = mixup(batch, 0.5, 5, smoothing=0.1)
    lam = mixed["mixup_lambda"]
    assert torch.allclose(mixed["audio"], lam * batch["audio"] + (1 - lam) * batch["audio"].flip(0))
    t = mixed["soft_target"]
    assert torch.allclose(t.sum(1), torch.ones(4)) and torch.isclose(
        t[0, 0], torch.tensor(lam * 0.92 + (1 - lam) * 0.02)
    )
    samples = [
        {"audio": torch.zeros(n, 64), "n_frames": n, "key": str(n), "path": "", "labels": torch.ones(3)}
        for n in (32, 20)
    ]
    out = ClipCollate(-1.0, 3, 0.5, 1.0, 0.0)(samples)
    assert (
        out["audio"].shape == (2, 32, 64)
        and out["audio_padding_mask"][1, 20:].all()
        and "soft_target" not in out
    )


class StandIn(nn.Module):
    """The Multiway audio API in miniature: (B, T, F) → (B, 1 + P, D) with an audio [CLS] first."""

    has_audio_cls = True

    def __init__(self, dim: int = 24):
        super().__init__()
        self.proj = nn.Linear(PATCH * PATCH, dim)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.num_features, self.num_layers = dim, 1
        self.seen_padding = None

    def no_weight_decay(self):
        return set()

    def forward(self, audio, audio_padding_mask=None, text=None):
        B, T, F = audio.shape
        self.seen_padding = audio_padding_mask
        p = (
            audio.view(B, T // PATCH, PATCH, F // PATCH, PATCH)
            .permute(0, 1, 3, 2, 4)
            .reshape(B, -1, PATCH * PATCH)
        )
        return torch.cat([self.cls.expand(B, -1, -1), self.proj(p)], 1)


@pytest.mark.parametrize("backbone", ["beats", "stand-in", "multiway"])
def test_head_pools_real_patches_and_trains(backbone):
    torch.manual_seed(0)
    if backbone == "multiway":  # the Multiway audio expert (audio [CLS] first)
        net = create_model("audiomae_tiny", depth=1, audio_frames=64, audio_mel_bins=64)
    else:
        net = build_beats(TINY_BEATS) if backbone == "beats" else StandIn()
    if backbone == "beats":
        net.cfg.padding_rule = "time"
    model = AudioClassificationModel(net, 5, multilabel=False, pool="mean")
    audio = torch.randn(2, 64, 64)
    pad = torch.zeros(2, 64, dtype=torch.bool)
    pad[1, 32:] = True
    batch = {"audio": audio, "audio_padding_mask": pad, "label": torch.tensor([1, 3])}
    out = model(batch)
    assert torch.isfinite(out["loss"]) and out["audio_cls_loss"] is out["loss"]
    out["loss"].backward()
    assert model.head.weight.grad is not None and any(p.grad is not None for p in net.parameters())
    if backbone != "beats":  # padded patches do not enter the mean
        changed = dict(batch, audio=audio.clone())
        changed["audio"][1, 32:] = 100.0
        with torch.no_grad():
            assert torch.allclose(model.infer(batch)["logits"][1], model.infer(changed)["logits"][1])
    else:
        with pytest.raises(ValueError, match="no audio \\[CLS\\]"):
            AudioClassificationModel(net, 5, False, pool="cls")(batch)
    multi = AudioClassificationModel(net, 4, multilabel=True)
    assert torch.isfinite(
        multi({"audio": audio, "labels": torch.tensor([[1.0, 0, 1, 0], [0, 0, 0, 1]])})["loss"]
    )


def test_max_and_mean_max_pools_skip_padding():
    torch.manual_seed(0)
    net = StandIn()
    audio = torch.randn(2, 64, 64)
    pad = torch.zeros(2, 64, dtype=torch.bool)
    pad[1, 32:] = True  # clip 1: the second half of its frames is padding
    batch = {"audio": audio, "audio_padding_mask": pad}
    with torch.no_grad():
        patches = net(audio)[:, 1:]  # (2, 16, D): 4 time × 4 frequency patches, time-major
        real = [patches[0], patches[1, :8]]  # clip 1's real patches: the first two time rows
        peak = pooled_audio_features(net, batch, "max")
        both = pooled_audio_features(net, batch, "mean_max")
        mean = pooled_audio_features(net, batch, "mean")
        for b in range(2):
            assert torch.allclose(peak[b], real[b].amax(0))
            assert torch.allclose(mean[b], real[b].mean(0))
        assert torch.allclose(both, peak + mean)
        louder = dict(batch, audio=audio.clone())
        louder["audio"][1, 32:] = 100.0  # padded frames never reach the maximum
        assert torch.allclose(pooled_audio_features(net, louder, "max")[1], peak[1])
    with pytest.raises(ValueError, match="task.pool"):
        pooled_audio_features(net, batch, "median")


# ---------------------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def beats_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return save_pretrained(
        build_beats(TINY_BEATS), tmp_path_factory.mktemp("beats") / "model", extra={"family": "beats"}
    )


def _finetune(tmp_path, world, init, *extra):
    from mdm.train.finetune import main as finetune_main

    cfg = tmp_path / "esc.yaml"
    cfg.write_text(
        "task: {name: audio_classification, pool: mean}\n"
        "data: {num_workers: 0, audio: {frontend: {num_mel_bins: 64, target_frames: 96}, mixup: 0.5}}\n"
        "batch_size: 8\neval_batch_size: 16\noptim: {lr: 1.0e-3, warmup_steps: 0}\n"
        "train: {steps: 3, ckpt_every: 0}\nlogging: {every: 1}\n"
    )
    argv = [
        "--config",
        str(cfg),
        f"data.root={world}",
        f"init={init}",
        f"train.out_dir={tmp_path / 'run'}",
    ]
    return finetune_main(["--metrics-json", str(tmp_path / "m.json"), *argv, *extra])


def test_finetune_evaluate_one_fold(tmp_path, world, beats_dir, capsys):
    from mdm.tasks.cli_evaluate import main as evaluate_main

    assert _finetune(tmp_path, world, beats_dir, "data.fold=3") == 0
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert set(metrics) == {"acc", "mAP", "num_clips"} and metrics["num_clips"] == 10
    ckpt = tmp_path / "run" / "model"
    assert json.loads((ckpt / "config.json").read_text())["family"] == "beats"
    out = tmp_path / "e.json"
    assert evaluate_main(["--checkpoint", str(ckpt), "--metrics-json", str(out), "--batch-size", "4"]) == 0
    again = json.loads(out.read_text())
    assert abs(again["acc"] - metrics["acc"]) < 1e-9 and abs(again["mAP"] - metrics["mAP"]) < 1e-6
    from mdm.tasks.cli_predict import main as predict_main

    preds = tmp_path / "p.json"
    assert predict_main(["--checkpoint", str(ckpt), "--output", str(preds)]) == 0
    rows = json.loads(preds.read_text())
    assert len(rows) == 10 and all(r["audio"].split("/")[-1].startswith("3-") for r in rows)
    assert all(r["label"] == r["top5"][0] and r["label"] in CLASSES for r in rows)


def test_finetune_multiway_audio_expert_from_scratch(tmp_path, world):
    from mdm.tasks.cli_evaluate import main as evaluate_main

    model = ["model.arch=audiomae_tiny", "model.depth=1", "model.audio_frames=96", "model.audio_mel_bins=64"]
    assert _finetune(tmp_path, world, "scratch", "data.fold=2", *model) == 0
    metrics = json.loads((tmp_path / "m.json").read_text())
    out = tmp_path / "e.json"
    assert evaluate_main(["--checkpoint", str(tmp_path / "run" / "model"), "--metrics-json", str(out)]) == 0
    assert abs(json.loads(out.read_text())["acc"] - metrics["acc"]) < 1e-9


def test_five_fold_cross_validation(tmp_path, world, beats_dir, capsys):
    assert _finetune(tmp_path, world, beats_dir, "train.steps=1") == 0
    cv = json.loads((tmp_path / "m.json").read_text())
    folds = [cv[f"fold{k}_acc"] for k in range(1, 6)]
    assert abs(cv["acc"] - sum(folds) / 5) < 1e-9 and "5-fold CV" in capsys.readouterr().out
    for k in range(1, 6):
        saved = json.loads((tmp_path / "run" / f"fold{k}" / "model" / "config.json").read_text())
        assert saved["data"]["fold"] == k and saved["metrics"]["acc"] == cv[f"fold{k}_acc"]
    # an interrupted cross-validation picks up where it stopped: finished folds are not trained again
    shutil.rmtree(tmp_path / "run" / "fold4")
    assert _finetune(tmp_path, world, beats_dir, "train.steps=1") == 0
    assert json.loads((tmp_path / "m.json").read_text())["fold1_acc"] == cv["fold1_acc"]


def test_finetune_overfits_a_fold_of_distinct_clips(tmp_path, world):
    """The whole fine-tuning path (reader, collate, optimizer groups with layer decay and the tiny head
    init of the demo recipe, the loop) can memorise ten clips of the sound world, one per class, with
    augmentation off: a broken label mapping, a frozen backbone or a head outside the optimizer fails."""
    model = ["model.arch=audiomae_tiny", "model.depth=2", "model.audio_frames=96", "model.audio_mel_bins=64"]
    recipe = ["task.head_init_scale=0.001", "optim.layer_decay=0.75", "optim.lr=2.0e-3", "batch_size=10"]
    fit = ["data.train_splits=[fold1]", "data.val_split=fold1", "data.audio.mixup=0.0", "train.steps=150"]
    fit += ["data.audio.freqm=0", "data.audio.timem=0"]
    assert _finetune(tmp_path, world, "scratch", "data.fold=1", *model, *recipe, *fit) == 0
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["num_clips"] == 10 and metrics["acc"] >= 90.0, metrics
