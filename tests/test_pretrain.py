"""``mdm pretrain`` end to end on tiny generated shards: learning, exact resume, bad data, tokenizer path."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
import torch

from mdm.train.metrics import read_metrics
from mdm.train.pretrain import main
from tests.pretrain_fixtures import build_world, learning_overrides, pretrain_overrides

CONFIG = "configs/pretrain/test_tiny.yaml"
OBJECTIVE_LOSSES = ("mim_loss", "mlm_loss", "mvlm_image_loss", "mvlm_text_loss")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_world(tmp_path_factory.mktemp("world"))


def _run(args: list[str]) -> None:
    assert main(["--config", CONFIG, *args]) == 0


def test_every_objective_learns(world, tmp_path):
    _run([*learning_overrides(world, tmp_path, 100), "train.ckpt_every=0", "logging.every=5"])
    rows = read_metrics(tmp_path / "metrics.jsonl")
    first, last = rows[:2], rows[-2:]
    for key in OBJECTIVE_LOSSES:
        start = sum(r[key] for r in first) / 2
        end = sum(r[key] for r in last) / 2
        assert end < 0.8 * start, f"{key}: {start:.3f} -> {end:.3f}"
    for key in ("loss", "lr", "samples_per_s", "tokens_per_s", "mfu", "mim_acc", "mlm_acc"):
        assert key in rows[-1]
    assert (tmp_path / "model" / "model.safetensors").exists()


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_is_exact(world, tmp_path, workers):
    """2N straight == N, a hard stop, N resumed: identical losses at every step (dropout, masks, data)."""
    common = [
        "logging.every=1",
        f"data.num_workers={workers}",
        "model.drop_path_rate=0.1",
        "train.ckpt_every=3",
    ]
    _run([*pretrain_overrides(world, tmp_path / "a", 8), *common])
    _run([*pretrain_overrides(world, tmp_path / "b", 8), *common, "train.stop_after=5"])
    assert not (tmp_path / "b" / "model").exists()  # stopped before the end
    _run([*pretrain_overrides(world, tmp_path / "b", 8), *common])
    a = read_metrics(tmp_path / "a" / "metrics.jsonl")
    b = read_metrics(tmp_path / "b" / "metrics.jsonl")
    assert [r["step"] for r in b] == list(range(1, 9))
    for key in ("loss", *OBJECTIVE_LOSSES):
        assert [r[key] for r in a] == [r[key] for r in b], key


def _corrupt_shards(world, out: Path) -> Path:
    """The pair shards with a broken JPEG, an empty caption and a truncated last shard."""
    src = sorted((Path(world["root"]) / "shards" / "pair").glob("*.tar"))
    out.mkdir(parents=True)
    for n, shard in enumerate(src):
        with tarfile.open(shard) as tin, tarfile.open(out / shard.name, "w") as tout:
            for m in tin:
                data = tin.extractfile(m).read()
                if n == 0 and m.name.startswith("000000001."):
                    if m.name.endswith(".png"):
                        data = b"\xff\xd8\xff\xe0 not really a jpeg"
                    elif m.name.endswith(".json"):
                        data = json.dumps({"captions": ["   "]}).encode()
                    elif m.name.endswith(".txt"):
                        data = b""
                if n == 0 and m.name.startswith("000000002.") and m.name.endswith(".json"):
                    data = json.dumps({"captions": [""]}).encode()
                if n == 0 and m.name.startswith("000000002.") and m.name.endswith(".txt"):
                    data = b"  "
                info = tarfile.TarInfo(m.name)
                info.size = len(data)
                tout.addfile(info, io.BytesIO(data))
    last = sorted(out.glob("*.tar"))[-1]
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # cut mid-member
    return out


def test_bad_samples_are_skipped_and_counted(world, tmp_path):
    bad = _corrupt_shards(world, tmp_path / "bad")
    # 28 steps × 4 pairs cover every shard once (partition mode walks all shards each epoch)
    over = [o for o in pretrain_overrides(world, tmp_path / "run", 28) if not o.startswith("data.pair")]
    _run([*over, f"data.pair.sources=[{{shards: [{bad}]}}]", "logging.every=28", "train.ckpt_every=0"])
    last = read_metrics(tmp_path / "run" / "metrics.jsonl")[-1]
    assert last["skipped_pair_bad_image"] >= 1
    assert last["skipped_pair_empty_text"] >= 1
    assert last["skipped_pair_truncated_tar"] >= 1
    assert last["mvlm_text_loss"] == last["mvlm_text_loss"]  # finite


def test_unknown_key_and_missing_stream_fail_clearly(world, tmp_path, capsys):
    assert main(["--config", CONFIG, "model.depht=2"]) == 2
    assert "did you mean 'model.depth'" in capsys.readouterr().err
    over = [o for o in pretrain_overrides(world, tmp_path, 2) if not o.startswith("data.pair")]
    with pytest.raises(ValueError, match="data.pair"):
        main(["--config", CONFIG, *over, "data.pair=null"])


def test_mae_runs_without_a_visual_tokenizer(world, tmp_path):
    over = [
        o
        for o in pretrain_overrides(world, tmp_path, 3)
        if not o.startswith(("visual_tokenizer", "data.pair", "data.text"))
    ]
    _run(
        [
            *over,
            "visual_tokenizer=",
            "data.pair=null",
            "data.text=null",
            "objectives.objectives=[mae]",
            "objectives.mae_decoder_dim=32",
            "objectives.mae_decoder_depth=1",
            "objectives.mae_decoder_heads=2",
            "data.image.image_masking=random",
            "data.image.image_mask_ratio=0.75",
            "model.patch_size=8",
        ]
    )
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert "mae_loss" in rows[-1] and "mim_loss" not in rows[-1]


def test_beit_v2_cls_head_is_not_exported(world, tmp_path):
    over = [o for o in pretrain_overrides(world, tmp_path, 2) if not o.startswith(("data.pair", "data.text"))]
    _run(
        [
            *over,
            "data.pair=null",
            "data.text=null",
            "objectives.objectives=[cls_mim]",
            "objectives.cls_pt_early_layer=1",
            "objectives.cls_pt_layers=1",
        ]
    )
    assert "cls_mim_loss" in read_metrics(tmp_path / "metrics.jsonl")[-1]
    from safetensors.torch import load_file

    assert all(
        k.split(".")[0] != "objectives" for k in load_file(str(tmp_path / "model" / "model.safetensors"))
    )


def test_stagewise_training_leaves_frozen_parameters_untouched(world, tmp_path):
    """VLMo's language stage: only text-side parameters change."""
    from mdm.models.io import from_pretrained

    over = [
        o
        for o in pretrain_overrides(world, tmp_path / "v", 2)
        if not o.startswith(("data.pair", "data.text"))
    ]
    _run([*over, "data.pair=null", "data.text=null", "objectives.objectives=[mim]"])
    over = [
        o
        for o in pretrain_overrides(world, tmp_path / "t", 3)
        if not o.startswith(("data.pair", "data.image"))
    ]
    _run(
        [
            *over,
            "data.pair=null",
            "data.image=null",
            "objectives.objectives=[mlm]",
            f"init={tmp_path / 'v' / 'model'}",
            "optim.trainable=['^backbone\\.text_', '\\.ffn\\.text\\.', '^backbone\\.norm\\.text', '^heads\\.']",
            "optim.weight_decay=0.0",
        ]
    )
    before = from_pretrained(tmp_path / "v" / "model").state_dict()
    after = from_pretrained(tmp_path / "t" / "model").state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith(("text_", "norm.text")) or ".ffn.text." in k for k in changed), (
        changed
    )
    assert any(".ffn.text." in k for k in changed)


def test_itc_runs_beside_mdm_and_its_heads_are_saved_with_the_backbone(world, tmp_path):
    """VLMo's ITC and ITM on the pair stream next to MIM/MLM/MVLM: their entries are logged, and
    ``model/heads.safetensors`` holds the pretraining heads (``heads.itc.*`` / ``heads.itm.*`` are what a
    retrieval fine-tuning starts from; ``mdm finetune`` loading them is tested in test_tasks_models.py). That ITC learns is tested
    on a fixed batch in test_objectives.py: on this tiny world it sits on its log(B) plateau for longer than
    a test should run (the demo's run leaves it after ~200 steps)."""
    from safetensors.torch import load_file

    _run(
        [
            *learning_overrides(world, tmp_path, 10),
            "objectives.objectives=[mim,mlm,mvlm,itc,itm]",
            "logging.every=5",
        ]
    )
    last = read_metrics(tmp_path / "metrics.jsonl")[-1]
    assert {"itc_loss", "itc_acc", "itc_count", "mvlm_text_loss", "itm_loss"} <= set(last)
    assert last["itc_count"] == 4 and last["itm_count"] == 12
    heads = load_file(str(tmp_path / "model" / "heads.safetensors"))
    assert {"heads.itc.vision_head.weight", "heads.itc.language_head.weight", "heads.itc.logit_scale"} <= set(
        heads
    )
    assert {"heads.itm.fc.weight", "heads.itm.pooler.dense.weight"} <= set(heads)
    assert any(k.startswith("heads.mim.") for k in heads) and any(k.startswith("heads.mlm.") for k in heads)
    backbone = load_file(str(tmp_path / "model" / "model.safetensors"))
    assert not any(k.startswith("heads.") for k in backbone)


def test_flops_and_tokens_count_itc_passes():
    """MFU and tokens/s count every backbone pass: ITC adds an image-alone and a text-alone pass per pair."""
    from mdm.models.config import make_config
    from mdm.train.pretrain import _sequences

    cfg = make_config("vlmo_tiny", img_size=32, patch_size=8)  # 16 patches
    pair = {"image": torch.zeros(3, 3, 32, 32), "text": torch.zeros(3, 7, dtype=torch.long)}
    text = {"text": torch.zeros(5, 9, dtype=torch.long)}
    assert _sequences(cfg, {"pair": pair, "text": text}) == [(3, 17 + 7), (5, 9)]
    assert _sequences(cfg, {"pair": pair, "text": text}, itc=True) == [(3, 24), (3, 17), (3, 7), (5, 9)]
    # ITM: one joint pass over the 3B positive and hard-negative pairs
    assert _sequences(cfg, {"pair": pair}, itc=True, itm=True) == [(3, 24), (3, 17), (3, 7), (9, 24)]
