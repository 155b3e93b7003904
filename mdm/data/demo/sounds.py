"""The sound world: labelled, captioned synthetic clips of tones, chords, chirps, noise, clicks and rhythms.

A clip is one *main* event — which gives its single label, one of :data:`CLASSES` — plus up to two
quieter *distractor* events of other kinds, over a background hiss. Its multi-label tags
(:data:`TAGS`) are the kinds of all of its events; its caption names them in time order ("a rising
tone then two faint clicks"). Pitch, timing, duration, loudness, background level and distractors
all vary, so the classes are learnable from the spectrogram but not from a fixed template: rising and
falling chirps have the same average spectrum, a warble differs from a steady tone only by a few
percent of vibrato, two and four clicks only by their count.

Everything is a pure function of ``(seed, index)`` (a ``random.Random`` and a numpy ``Generator``
seeded from them; no global RNG): :func:`make_clip` draws the events, :func:`render` synthesises the
waveform. :mod:`mdm.data.demo.sound_writers` writes clips in the published ESC-50, AudioSet and
audio-caption layouts.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np

#: Single-label classes (the main event of a clip); class index = position.
CLASSES: tuple[str, ...] = (
    "tone",
    "chord",
    "rising chirp",
    "falling chirp",
    "noise burst",
    "warble",
    "two clicks",
    "four clicks",
    "beeps",
    "siren",
)
#: Multi-label event tags (kinds of event); tag index = position.
TAGS: tuple[str, ...] = ("tone", "chord", "rising", "falling", "noise", "warble", "click", "beep", "siren")
#: Tag of each class's main event.
CLASS_TAG: dict[str, str] = {
    "tone": "tone",
    "chord": "chord",
    "rising chirp": "rising",
    "falling chirp": "falling",
    "noise burst": "noise",
    "warble": "warble",
    "two clicks": "click",
    "four clicks": "click",
    "beeps": "beep",
    "siren": "siren",
}
_COUNT_WORDS = {1: "a", 2: "two", 3: "three", 4: "four"}


@dataclass(frozen=True)
class Event:
    """One sound event.

    Attributes:
        kind: one of :data:`TAGS`.
        onset: start in seconds.
        duration: length in seconds (for clicks and beeps: from the first onset to the end of the last).
        f0: (start) frequency in Hz; for noise the band centre; unused for clicks.
        f1: end frequency of a chirp, second tone of a siren, vibrato rate (Hz) of a warble.
        gain_db: peak level in dB relative to full scale.
        count: clicks or beeps; 0 otherwise.
        interval: seconds between click / beep onsets.
        quality: chord quality (``major`` / ``minor``), else ``""``.
        main: the event that gives the clip's label.
    """

    kind: str
    onset: float
    duration: float
    f0: float = 0.0
    f1: float = 0.0
    gain_db: float = -6.0
    count: int = 0
    interval: float = 0.0
    quality: str = ""
    main: bool = True

    @property
    def end(self) -> float:
        return self.onset + self.duration


@dataclass(frozen=True)
class Clip:
    """A clip: its events in time order, labels and caption.

    Attributes:
        index: position in the world (class = index mod len(CLASSES)).
        label: single-label class index into :data:`CLASSES`.
        tags: sorted tag indices into :data:`TAGS` (the kinds of all events).
        events: events sorted by onset.
        noise_db: background hiss level (RMS) in dB relative to full scale, −60…−40.
        caption: the events in words.
        duration: clip length in seconds.
        sample_rate: rate of :func:`render`.
        seed: the world seed.
    """

    index: int
    label: int
    tags: tuple[int, ...]
    events: tuple[Event, ...]
    noise_db: float
    caption: str
    duration: float
    sample_rate: int
    seed: int = 0

    @property
    def category(self) -> str:
        return CLASSES[self.label]


def _main_event(cls: str, r: random.Random, duration: float) -> Event:
    """The main event of class ``cls``: parameters drawn from ``r``, placed inside the clip."""
    gain = r.uniform(-18.0, -3.0)
    if cls in ("tone", "chord", "warble"):
        length = r.uniform(0.4, 1.2)
        f0 = math.exp(r.uniform(math.log(200), math.log(2000)))
        kw: dict = {"f0": f0}
        if cls == "warble":
            kw["f1"] = r.uniform(5.0, 12.0)  # vibrato rate
        if cls == "chord":
            kw["quality"] = r.choice(("major", "minor"))
            kw["f0"] = min(f0, 1300.0)
        ev = dict(kind=CLASS_TAG[cls], duration=length, **kw)
    elif cls in ("rising chirp", "falling chirp"):
        length = r.uniform(0.3, 1.0)
        lo = math.exp(r.uniform(math.log(200), math.log(900)))
        hi = lo * r.uniform(2.0, 4.0)
        f0, f1 = (lo, hi) if cls == "rising chirp" else (hi, lo)
        ev = dict(kind=CLASS_TAG[cls], duration=length, f0=f0, f1=f1)
    elif cls == "noise burst":
        ev = dict(
            kind="noise", duration=r.uniform(0.2, 0.8), f0=math.exp(r.uniform(math.log(500), math.log(4000)))
        )
    elif cls in ("two clicks", "four clicks"):
        n = 2 if cls == "two clicks" else 4
        step = r.uniform(0.12, 0.3)
        ev = dict(kind="click", duration=step * (n - 1) + 0.01, count=n, interval=step)
    elif cls == "beeps":
        step = r.uniform(0.15, 0.3)
        ev = dict(kind="beep", duration=step * 2 + 0.1, count=3, interval=step, f0=r.uniform(500, 2500))
    elif cls == "siren":
        f0 = r.uniform(400, 1200)
        ev = dict(kind="siren", duration=r.uniform(0.8, 1.5), f0=f0, f1=f0 * r.uniform(1.25, 1.5))
    else:  # pragma: no cover - CLASSES is closed
        raise ValueError(cls)
    onset = r.uniform(0.05, max(duration - ev["duration"] - 0.05, 0.06))
    return Event(onset=onset, gain_db=gain, main=True, **ev)


def _distractor(kind: str, r: random.Random, duration: float, main_gain: float) -> Event:
    """A quieter event of ``kind`` (6–15 dB under the main event)."""
    gain = main_gain - r.uniform(6.0, 15.0)
    if kind == "click":
        n = r.choice((1, 2))
        step = r.uniform(0.12, 0.3)
        ev = dict(duration=step * (n - 1) + 0.01, count=n, interval=step)
    elif kind == "beep":
        n = r.choice((2, 3))
        step = r.uniform(0.15, 0.3)
        ev = dict(duration=step * (n - 1) + 0.1, count=n, interval=step, f0=r.uniform(500, 2500))
    elif kind in ("rising", "falling"):
        lo = math.exp(r.uniform(math.log(200), math.log(900)))
        hi = lo * r.uniform(2.0, 4.0)
        ev = dict(
            duration=r.uniform(0.3, 0.8), f0=lo if kind == "rising" else hi, f1=hi if kind == "rising" else lo
        )
    elif kind == "noise":
        ev = dict(duration=r.uniform(0.2, 0.6), f0=math.exp(r.uniform(math.log(500), math.log(4000))))
    elif kind == "siren":
        f0 = r.uniform(400, 1200)
        ev = dict(duration=r.uniform(0.8, 1.2), f0=f0, f1=f0 * r.uniform(1.25, 1.5))
    else:  # tone, chord, warble
        ev = dict(duration=r.uniform(0.3, 0.8), f0=math.exp(r.uniform(math.log(200), math.log(1300))))
        if kind == "warble":
            ev["f1"] = r.uniform(5.0, 12.0)
        if kind == "chord":
            ev["quality"] = r.choice(("major", "minor"))
    onset = r.uniform(0.05, max(duration - ev["duration"] - 0.05, 0.06))
    return Event(kind=kind, onset=onset, gain_db=gain, main=False, **ev)


def _phrase(ev: Event) -> str:
    faint = "" if ev.main else "faint "
    if ev.kind in ("click", "beep"):
        noun = ev.kind + ("s" if ev.count > 1 else "")
        return f"{_COUNT_WORDS[ev.count]} {faint}{noun}"
    pitch = ""
    if ev.kind in ("tone", "warble"):
        pitch = "low " if ev.f0 < 400 else "high " if ev.f0 > 1200 else ""
    noun = {
        "tone": f"{pitch}tone",
        "chord": f"{ev.quality} chord",
        "rising": "rising tone",
        "falling": "falling tone",
        "noise": "burst of noise",
        "warble": f"{pitch}warbling tone",
        "siren": "siren",
    }[ev.kind]
    words = f"{faint}{noun}"
    return f"{'an' if words[0] in 'aeiou' else 'a'} {words}"


def caption(events: tuple[Event, ...]) -> str:
    """The events in time order: ``then`` between events that follow each other, ``with`` when they overlap."""
    out = _phrase(events[0])
    for prev, ev in zip(events, events[1:]):
        out += (" then " if ev.onset >= prev.end else " with ") + _phrase(ev)
    return out


def make_clip(seed: int, index: int, duration: float = 3.0, sample_rate: int = 16000) -> Clip:
    """Clip ``index`` of the world ``seed``: class ``index mod len(CLASSES)``, the rest drawn at random."""
    r = random.Random(f"sounds/{seed}/{index}")
    cls = CLASSES[index % len(CLASSES)]
    main = _main_event(cls, r, duration)
    n_distract = r.choices((0, 1, 2), weights=(0.4, 0.4, 0.2))[0]
    kinds = [t for t in TAGS if t != main.kind]
    events = [main] + [_distractor(k, r, duration, main.gain_db) for k in r.sample(kinds, n_distract)]
    events.sort(key=lambda e: e.onset)
    tags = tuple(sorted({TAGS.index(e.kind) for e in events}))
    return Clip(
        index=index,
        label=CLASSES.index(cls),
        tags=tags,
        events=tuple(events),
        # −60…−40 dB: at least ~20 dB under the quietest main event (−18 dB peak). Up to −28 dB (before
        # 2026-12-03) the hiss hid quiet events and its level was the largest difference between clips
        # (docs/audio.md §7.2). One draw either way: every other parameter of a clip is unchanged.
        noise_db=r.uniform(-60.0, -40.0),
        caption=caption(tuple(events)),
        duration=duration,
        sample_rate=sample_rate,
        seed=seed,
    )


# ---------------------------------------------------------------------------------------------- synthesis
def _envelope(n: int, sr: int, ramp: float = 0.015) -> np.ndarray:
    """Raised-cosine attack and release (no onset click)."""
    k = max(1, min(int(ramp * sr), n // 2))
    env = np.ones(n)
    rise = 0.5 - 0.5 * np.cos(np.linspace(0, np.pi, k))
    env[:k], env[n - k :] = rise, rise[::-1]
    return env


def _sine(freq: np.ndarray | float, n: int, sr: int, phase: float) -> np.ndarray:
    """A sine whose instantaneous frequency is ``freq`` (scalar or per sample)."""
    f = np.broadcast_to(np.asarray(freq, dtype=np.float64), (n,))
    return np.sin(phase + 2 * np.pi * np.cumsum(f) / sr)


def _band_noise(n: int, sr: int, centre: float, g: np.random.Generator) -> np.ndarray:
    """White noise band-passed to one octave around ``centre`` (FFT masking)."""
    spec = np.fft.rfft(g.standard_normal(n))
    freqs = np.fft.rfftfreq(n, 1.0 / sr)
    spec[(freqs < centre / math.sqrt(2)) | (freqs > centre * math.sqrt(2))] = 0
    out = np.fft.irfft(spec, n)
    return out / (np.abs(out).max() + 1e-12)


def _click(sr: int, g: np.random.Generator) -> np.ndarray:
    """A 4 ms broadband click: noise under a fast exponential decay."""
    n = int(0.004 * sr)
    return g.standard_normal(n) * np.exp(-np.arange(n) / (0.0008 * sr))


def _render_event(ev: Event, sr: int, g: np.random.Generator) -> np.ndarray:
    """The event alone, peak 1 before its gain."""
    n = max(int(ev.duration * sr), 1)
    t = np.arange(n) / sr
    phase = g.uniform(0, 2 * np.pi)
    if ev.kind == "tone":
        x = _sine(ev.f0, n, sr, phase) + 0.3 * _sine(2 * ev.f0, n, sr, phase)
    elif ev.kind == "chord":
        third = 5 / 4 if ev.quality == "major" else 6 / 5
        x = sum(_sine(ev.f0 * k, n, sr, phase + i) for i, k in enumerate((1.0, third, 1.5)))
    elif ev.kind in ("rising", "falling"):
        x = _sine(ev.f0 * (ev.f1 / ev.f0) ** (t / ev.duration), n, sr, phase)  # exponential sweep
    elif ev.kind == "warble":
        x = _sine(ev.f0 * (1 + 0.06 * np.sin(2 * np.pi * ev.f1 * t)), n, sr, phase)
    elif ev.kind == "siren":
        half = (np.floor(t * 3.0) % 2).astype(bool)  # alternates three times a second
        x = _sine(np.where(half, ev.f1, ev.f0), n, sr, phase)
    elif ev.kind == "noise":
        x = _band_noise(n, sr, ev.f0, g)
    elif ev.kind in ("click", "beep"):
        x = np.zeros(n)
        for k in range(ev.count):
            start = int(k * ev.interval * sr)
            part = (
                _click(sr, g)
                if ev.kind == "click"
                else _sine(ev.f0, int(0.08 * sr), sr, phase) * _envelope(int(0.08 * sr), sr, 0.008)
            )
            part = part[: n - start]
            x[start : start + len(part)] += part
        return x / (np.abs(x).max() + 1e-12)
    else:  # pragma: no cover - TAGS is closed
        raise ValueError(ev.kind)
    x = x * _envelope(n, sr)
    return x / (np.abs(x).max() + 1e-12)


def render(clip: Clip, sample_rate: int | None = None) -> np.ndarray:
    """The clip's waveform: (N,) float32 in [-1, 1] at ``sample_rate`` (default the clip's)."""
    sr = sample_rate or clip.sample_rate
    g = np.random.default_rng([clip.seed, clip.index, 7])
    n = int(round(clip.duration * sr))
    wav = g.standard_normal(n) * 10 ** (clip.noise_db / 20)
    for ev in clip.events:
        x = _render_event(ev, sr, g) * 10 ** (ev.gain_db / 20)
        start = int(ev.onset * sr)
        x = x[: n - start]
        wav[start : start + len(x)] += x
    peak = np.abs(wav).max()
    if peak > 0.99:  # rare pile-ups: scale down rather than clip
        wav *= 0.99 / peak
    return wav.astype(np.float32)


def make_clips(n: int, seed: int = 0, duration: float = 3.0, sample_rate: int = 16000) -> list[Clip]:
    """Clips ``0 .. n-1`` of the world ``seed`` (balanced over the classes)."""
    return [make_clip(seed, i, duration, sample_rate) for i in range(n)]
