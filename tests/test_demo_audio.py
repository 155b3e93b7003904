"""``mdm demo --modality audio --quick`` through the real ``mdm`` entry point: every stage runs (sound
worlds, shards, the iteration-1 acoustic tokenizer, AudioMAE and BEATs pretraining, four fine-tunings),
the report with its spectrogram figure is written and agrees with ``results.json``."""

from __future__ import annotations

import json

import pytest

from mdm.cli import main as mdm_main
from mdm.demo_audio import RUNS


@pytest.mark.slow
def test_quick_audio_demo_writes_report_and_results(tmp_path, capsys):
    out = tmp_path / "run"
    assert (
        mdm_main(["demo", "--modality", "audio", "--quick", "--out", str(out), "--seed", "1", "--jobs", "1"])
        == 0
    )
    res = json.loads((out / "results.json").read_text())
    assert set(res["finetune"]) == {name for name, _, _ in RUNS}
    assert all(0 <= r["acc"] <= 100 for r in res["finetune"].values())
    assert (
        res["tokenizers"]["iter1"]["kind"] == "acoustic_rp" and 0 < res["tokenizers"]["iter1"]["usage"] <= 1
    )
    assert res["amae_loss"]["first"] > 0 and 0 <= res["beats_acc"]["last"] <= 1
    assert 0 < res["beats_chance"]["majority_code"] <= 1
    report = (out / "report.md").read_text()
    a, s = res["finetune"]["audiomae"]["acc"], res["finetune"]["scratch-audiomae"]["acc"]
    assert f"| AudioMAE (amae) | {a:.2f} | {s:.2f} | {a - s:.2f} |" in report
    for png in ("spectrograms.png", "curves_audiomae.png", "curves_beats.png"):
        assert (out / png).stat().st_size > 1000, png
    printed = capsys.readouterr().out
    assert "AudioMAE reconstruction loss" in printed and "report:" in printed
    # a directory mdm did not create is never emptied
    other = tmp_path / "mine"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    assert mdm_main(["demo", "--modality", "audio", "--quick", "--out", str(other)]) == 1
    assert (other / "keep.txt").exists()
