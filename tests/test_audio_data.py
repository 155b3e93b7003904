"""Sound world (determinism, labels against an analysis of the waveform), the published layouts, the
audio shard writers and CLI, and the audio / audio_text pretraining streams (batch contract, exact
resume with 0 and 2 workers, corrupt clips skipped and counted, mixed with an image stream)."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import random
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from mdm.data import audio_shards as A
from mdm.data.audio import AudioFrontendConfig
from mdm.data.demo.sound_writers import write_sound_world, write_wav
from mdm.data.demo.sounds import CLASSES, TAGS, make_clip, make_clips, render
from mdm.data.shards import WriteReport, write_shards
from mdm.data.streams import PretrainDataConfig, SourceConfig, StreamConfig, build_pretrain_stream
from tests.test_data_streams import MODEL, CharTokenizer, _pairs, _same

SR = 16000


# ---------------------------------------------------------------------------------------------- world
def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


def test_sound_world_is_deterministic_and_balanced(tmp_path):
    a, b, c = (
        write_sound_world(tmp_path / n, 5, seed=s, duration=1.0) for n, s in (("a", 0), ("b", 0), ("c", 1))
    )
    assert a == b == c and a["clips"] == 50
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b") != _digest(tmp_path / "c")
    rows = list(csv.DictReader(open(tmp_path / "a" / "meta" / "esc50.csv")))
    assert list(rows[0]) == ["filename", "fold", "target", "category", "esc10", "src_file", "take"]
    per_fold = {(r["fold"], r["target"]) for r in rows}
    assert len(per_fold) == 5 * len(CLASSES)  # every class in every fold
    assert all(
        r["filename"].startswith(f"{r['fold']}-") and r["filename"].endswith(f"-{r['target']}.wav")
        for r in rows
    )


def _dominant(x: np.ndarray) -> float:
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.argmax(spec) * SR / len(x))


def _bursts(x: np.ndarray, win: int = 320) -> int:
    """Number of separate energy bursts (a click or a beep each), on a 20 ms RMS envelope."""
    env = np.sqrt(np.convolve(x**2, np.ones(win) / win, "same"))[:: win // 4]
    on = env > 0.25 * env.max()
    return int(on[0]) + int(np.sum(on[1:] & ~on[:-1]))


def _analyse(clip) -> str:
    """The class of a clip's main event from its waveform alone (rendered without noise or distractors;
    only the event's time span is taken from the metadata)."""
    main = next(e for e in clip.events if e.main)
    x = render(dataclasses.replace(clip, events=(main,), noise_db=-200.0))
    seg = x[int(main.onset * SR) : int(main.end * SR) + 400]
    n = len(seg)
    frames = [np.abs(np.fft.rfft(seg[i : i + 1024] * np.hanning(1024))) for i in range(0, n - 1024, 512)]
    spread = np.median([np.sum(f > 0.1 * f.max()) for f in frames]) if frames else 0
    count = _bursts(seg)
    if count >= 2:  # a rhythm: tonal beeps or broadband clicks
        if (
            _dominant(seg) > 300
            and np.sum(np.abs(np.fft.rfft(seg)) > 0.1 * np.abs(np.fft.rfft(seg)).max()) < 200
        ):
            return "beeps" if count == 3 else "?"
        return {2: "two clicks", 4: "four clicks"}.get(count, "?")
    if spread > 20:  # one broadband burst
        return "noise burst"
    thirds = [_dominant(seg[k * n // 3 : (k + 1) * n // 3]) for k in range(3)]
    if thirds[2] > 1.5 * thirds[0]:
        return "rising chirp"
    if thirds[0] > 1.5 * thirds[2]:
        return "falling chirp"

    spec = np.abs(np.fft.rfft(seg * np.hanning(n)))
    local = np.flatnonzero((spec[1:-1] > spec[:-2]) & (spec[1:-1] > spec[2:])) + 1
    top = np.sort(local[np.argsort(spec[local])[-3:]]) * SR / n  # the three strongest peaks, by frequency
    if len(top) == 3 and (
        min(abs(top[1] / top[0] - r) for r in (1.2, 1.25)) < 0.02 and abs(top[2] / top[0] - 1.5) < 0.02
    ):
        return "chord"  # a triad: root, third, fifth
    pitches = [_dominant(seg[i : i + 1024]) for i in range(0, n - 1024, 256)]
    spread = max(pitches) / min(pitches)
    return (
        "siren" if spread > 1.2 else "warble" if spread > 1.04 else "tone"
    )  # two pitches / vibrato / steady


def test_labels_agree_with_an_analysis_of_the_generated_events():
    clips = make_clips(60, seed=3)
    for c in clips:
        got = _analyse(c)
        want = CLASSES[c.label]
        assert got == want, (c.index, want, got, c.events)
        main = next(e for e in c.events if e.main)
        assert TAGS.index(main.kind) in c.tags and len(c.tags) == len({e.kind for e in c.events})
        if main.kind in ("tone", "warble"):  # pitch where the event says it is
            seg = render(dataclasses.replace(c, events=(main,), noise_db=-200.0))[
                int(main.onset * SR) : int(main.end * SR)
            ]
            assert abs(_dominant(seg) - main.f0) < 0.08 * main.f0
    assert "rising tone" in make_clip(0, 2).caption and "two clicks" in make_clip(0, 6).caption


# ---------------------------------------------------------------------------------------------- shards
@pytest.fixture(scope="module")
def sound_world(tmp_path_factory):
    root = tmp_path_factory.mktemp("sw")
    write_sound_world(root, 5, seed=0, duration=0.6, sample_rate=22050)  # 44.1 kHz-like: resampled on read
    return root


def _members(out: Path) -> list[dict]:
    samples: dict[str, dict] = {}
    for shard in sorted(out.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for m in tar:
                key, _, ext = m.name.partition(".")
                samples.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return list(samples.values())


def test_esc50_shards_keep_folds_and_count_bad_clips(sound_world, tmp_path):
    import shutil

    root = tmp_path / "esc"
    shutil.copytree(sound_world, root)
    bad = sorted((root / "audio").iterdir())[4]
    bad.write_bytes(b"RIFF garbage")
    from mdm.data.cli import main

    assert (
        main(
            [
                "shards",
                "--from",
                "esc50",
                "--root",
                str(root),
                "--out",
                str(tmp_path / "out"),
                "--max-count",
                "8",
            ]
        )
        == 0
    )
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert index["kind"] == "audio" and index["total"] == 49 and index["skipped"] == {"unreadable audio": 1}
    samples = _members(tmp_path / "out")
    meta = [json.loads(s["json"]) for s in samples]
    assert {m["fold"] for m in meta} == {1, 2, 3, 4, 5}
    assert all(int(s["cls"]) == m["target"] == CLASSES.index(m["category"]) for s, m in zip(samples, meta))
    assert all("wav" in s for s in samples)


def test_audio_folder_and_jsonl_shards(sound_world, tmp_path):
    folder = tmp_path / "folder"
    for i, name in enumerate(("dog", "cat")):
        for k in range(2):
            write_wav(folder / name / f"{k}.wav", render(make_clip(0, i * 2 + k, 0.5)), SR)
    (folder / "cat" / "broken.flac").write_bytes(b"fLaC nope")
    rep = WriteReport("audio")
    samples = list(A.from_audio_folder(folder, rep))
    assert [int(s["cls"]) for s in samples] == [0, 0, 1, 1] and rep.skipped == {
        "unreadable audio": 1
    }  # cat < dog
    jsonl = tmp_path / "c.jsonl"
    lines = (sound_world / "captions.jsonl").read_text().splitlines()[:4]
    jsonl.write_text(
        "\n".join(
            [
                lines[0],
                "{not json",
                json.dumps({"audio": json.loads(lines[1])["audio"], "text": " "}),
                *lines[2:],
            ]
        )
    )
    (tmp_path / "audio").symlink_to(sound_world / "audio")
    rep = WriteReport("audio_text")
    samples = list(A.from_audio_jsonl(jsonl, rep))
    assert len(samples) == 3 and rep.skipped == {"malformed record": 1, "empty text": 1}
    assert samples[0]["txt"].decode() == json.loads(lines[0])["text"]


# ---------------------------------------------------------------------------------------------- streams
@pytest.fixture(scope="module")
def audio_shards(tmp_path_factory):
    import io

    import soundfile

    root = tmp_path_factory.mktemp("audio_streams")

    def samples(n, bad=()):
        for i in range(n):
            c = make_clip(1, i, duration=0.4 + 0.15 * (i % 4))  # 38..83 frames: padding in most batches
            buf = io.BytesIO()
            soundfile.write(buf, render(c), SR, format="WAV", subtype="PCM_16")
            data = b"RIFF\x00\x00junk" if i in bad else buf.getvalue()
            yield {
                "__key__": f"c{i:04d}",
                "wav": data,
                "txt": c.caption.encode(),
                "cls": str(c.label).encode(),
            }

    write_shards(samples(24), root / "clips", "audio", max_count=6)
    write_shards(samples(8, bad={2, 5}), root / "bad", "audio", max_count=4)
    images = ({"__key__": s["__key__"], "jpg": s["jpg"]} for s in _pairs(12, "i"))
    write_shards(images, root / "images", "image", max_count=6)
    return root


def _cfg(root, kinds, workers=0, bs=4, **audio):
    streams = {}
    for kind, src in kinds.items():
        streams[kind] = StreamConfig(
            sources=[SourceConfig([str(root / src)])], batch_size=bs, max_text_len=40, **audio
        )
    fe = AudioFrontendConfig(target_frames=0, num_mel_bins=64)
    return PretrainDataConfig(**streams, num_workers=workers, audio_frontend=fe, min_mask_patches=2)


def _stream(cfg, seed=0):
    return build_pretrain_stream(cfg, set(cfg.streams()), CharTokenizer(), MODEL, 0, 1, seed)


def test_audio_batch_contract_mixed_with_images(audio_shards):
    cfg = _cfg(
        audio_shards, {"audio": "clips", "audio_text": "clips", "image": "images"}, audio_masking="time"
    )
    state, tstate = random.getstate(), torch.get_rng_state()
    stream = _stream(cfg)
    steps = [next(stream) for _ in range(3)]
    assert random.getstate() == state and torch.equal(torch.get_rng_state(), tstate)
    saw_padding = False
    for step in steps:
        assert set(step) == {"audio", "audio_text", "image"} and step["image"]["image"].shape == (
            4,
            3,
            32,
            32,
        )
        for kind in ("audio", "audio_text"):
            b = step[kind]
            B, T, F = b["audio"].shape
            assert (B, F) == (4, 64) and T % 16 == 0 and b["audio"].dtype == torch.float32
            P = (T // 16) * (F // 16)
            assert b["audio_mask"].shape == (4, P) and b["audio_mask"].dtype == torch.bool
            assert set(b["audio_mask"].sum(1).tolist()) == {round(0.8 * (T // 16)) * 4}
            grid = b["audio_mask"].view(4, T // 16, 4)  # time masking: whole time columns
            assert ((grid.all(2)) | (~grid.any(2))).all()
            if "audio_padding_mask" in b:
                saw_padding = True
                pad = b["audio_padding_mask"]
                assert pad.shape == (4, T) and pad.any() and not pad[:, 0].any()
                pad_value = cfg.audio_frontend.pad_value
                assert torch.allclose(b["audio"][pad], torch.full_like(b["audio"][pad], pad_value))
        assert "text" not in step["audio"]
        t = step["audio_text"]
        assert (
            t["text"].shape == t["text_input"].shape == t["text_mask"].shape == t["text_padding_mask"].shape
        )
        tok = CharTokenizer()
        assert all(tok.decode(row).startswith(("a ", "an ", "two ", "three ", "four ")) for row in t["text"])
    assert saw_padding


@pytest.mark.parametrize("workers", [0, 2])
def test_audio_streams_resume_exactly(audio_shards, workers):
    cfg = _cfg(audio_shards, {"audio": "clips", "image": "images"}, workers, audio_masking="time_frequency")
    reference = [next(s) for s in [_stream(cfg)] for _ in range(6)]
    first = _stream(cfg)
    for _ in range(2):
        next(first)
    state = json.loads(json.dumps(first.state_dict()))
    resumed = _stream(cfg)
    resumed.load_state_dict(state)
    rest = [next(resumed) for _ in range(4)]
    assert all(_same(a, b) for a, b in zip(reference[2:], rest))
    assert not torch.equal(reference[2]["audio"]["audio_mask"], reference[3]["audio"]["audio_mask"])


def test_corrupt_clips_are_skipped_and_counted(audio_shards, caplog):
    cfg = _cfg(audio_shards, {"audio": "bad"}, bs=3)
    stream = _stream(cfg)
    for _ in range(2):
        assert next(stream)["audio"]["audio"].shape[0] == 3
    assert stream.skipped.get("audio_bad_audio", 0) >= 1
    assert "c0002" in caplog.text or "c0005" in caplog.text
