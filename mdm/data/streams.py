"""Resumable, mixed, per-rank/per-worker pretraining streams over WebDataset tar shards.

Five stream kinds — ``image``, ``text``, ``pair``, ``audio`` (clips) and ``audio_text`` (clip + caption;
decoded and collated by :mod:`mdm.data.audio_stream`) — each read from one or more sources (shard sets)
mixed by weight; every step yields one batch per configured kind (BEiT-3 trains on images, texts and
pairs in every step).

**Exact resume.** Work is split into ``world_size × num_workers`` *slots*. A slot's stream is a pure
function of ``(seed, slot)``: its shard order per epoch, its source mixing, each batch's augmentation
and masks (a ``random.Random`` seeded by the slot and the batch counter). Every batch carries its
slot's position after it (per source: shard sequence index and sample offset; the mixing RNG state;
batches produced). The main process keeps the position of the last *consumed* batch of each slot —
prefetched batches don't count — and a resumed loader starts every slot there, and rotates slot
numbers so that DataLoader's round-robin continues with the slot that was next. No sample is replayed
or skipped, with any number of workers.

**Bad data.** An undecodable image, a truncated tar or an empty text is skipped, counted per reason
(``skipped``) and logged; the run goes on.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mdm.data.audio import AudioFrontendConfig
from mdm.data.audio_stream import AUDIO_KINDS, collate_audio, decode_audio
from mdm.data.masking import BlockMasking, mask_text
from mdm.data.shard_reader import ShardReadError, expand_shards, iter_tar_samples
from mdm.data.transforms import ViewConfig, two_views
from mdm.tokenizers.data import IMAGE_EXTS, ImageReadError, decode_image

log = logging.getLogger(__name__)
KINDS = ("image", "text", "pair", *AUDIO_KINDS)
TEXT_KINDS = ("text", "pair", "audio_text")
DEFAULT_TEXT_MASK = {"text": 0.15, "pair": 0.5, "audio_text": 0.5}
MAX_REJECTED_PER_BATCH = 10_000  # a stream that only skips is misconfigured: fail instead of spinning


@dataclass
class SourceConfig:
    """One shard set. ``shards``: paths, directories and globs (local), URLs webdataset opens
    (``https://``, ``gs://``, ``pipe:CMD``, ...), all with brace patterns (``a-{000..009}.tar``)."""

    shards: list[str] = field(default_factory=list)
    weight: float = 1.0


@dataclass
class StreamConfig:
    """One stream kind.

    Attributes:
        sources: shard sets, mixed by ``weight``.
        batch_size: samples per step on each rank.
        max_text_len: texts are truncated to this length including [bos]/[eos] (text and pair streams);
            a batch is padded only to its longest text.
        text_mask_ratio: MLM ratio (default 0.15 for text, 0.5 for pairs, as BEiT-3).
        image_mask_ratio: fraction of patches masked (BEiT-3: 0.4; BEiT v1: 75/196 ≈ 0.383; MAE: 0.75).
        image_masking: ``block`` (BEiT block-wise) or ``random`` (exactly ``round(ratio · P)`` patches per
            image, uniformly — MAE's masking).
        audio_mask_ratio: audio and audio_text streams: fraction of spectrogram patches masked (AudioMAE:
            0.8; 0 = no ``audio_mask``).
        audio_masking: ``random`` (unstructured), ``time`` (whole time columns), ``frequency`` (whole
            frequency rows) or ``time_frequency`` (AudioMAE's 2-D masking with ``audio_time_mask_ratio``
            and ``audio_freq_mask_ratio``); see :func:`mdm.data.audio.audio_mask`.
        audio_time_mask_ratio / audio_freq_mask_ratio: ``time_frequency`` masking (AudioMAE: 0.6 / 0.5).
    """

    sources: list[SourceConfig] = field(default_factory=list)
    batch_size: int = 32
    max_text_len: int = 64
    text_mask_ratio: float | None = None
    image_mask_ratio: float = 0.4
    image_masking: Literal["block", "random"] = "block"
    audio_mask_ratio: float = 0.8
    audio_masking: Literal["random", "time", "frequency", "time_frequency"] = "random"
    audio_time_mask_ratio: float = 0.6
    audio_freq_mask_ratio: float = 0.5


def random_masking(num_patches: int, ratio: float, rng: random.Random) -> torch.Tensor:
    """(P,) bool with exactly ``round(ratio · P)`` True entries, uniformly placed."""
    mask = torch.zeros(num_patches, dtype=torch.bool)
    mask[rng.sample(range(num_patches), round(ratio * num_patches))] = True
    return mask


@dataclass
class PretrainDataConfig:
    """The ``data:`` section of ``mdm pretrain``.

    Attributes:
        image / text / pair / audio / audio_text: the streams (omit a kind to not read it).
        views: crop, flip, normalisation, tokenizer view size.
        audio_frontend: how audio and audio_text clips become filterbanks (:mod:`mdm.data.audio`).
        min_mask_patches: smallest masking block (BEiT: 16; scaled down on small grids).
        num_workers: DataLoader workers per stream kind and rank.
        split: ``resample`` — every slot walks all shards in its own order (infinite, open_clip-style);
            ``partition`` — shards are dealt to slots, disjoint when there are enough of them.
        precomputed_codes: use ``<key>.tok.npy`` codes from the shards (no crop; flips apply to codes).
    """

    image: StreamConfig | None = None
    text: StreamConfig | None = None
    pair: StreamConfig | None = None
    audio: StreamConfig | None = None
    audio_text: StreamConfig | None = None
    views: ViewConfig = field(default_factory=ViewConfig)
    audio_frontend: AudioFrontendConfig = field(default_factory=AudioFrontendConfig)
    min_mask_patches: int = 16
    num_workers: int = 2
    split: Literal["resample", "partition"] = "partition"
    precomputed_codes: bool = False

    def streams(self) -> dict[str, StreamConfig]:
        return {k: getattr(self, k) for k in KINDS if getattr(self, k) is not None}

    def micro_batch_size(self) -> int:
        """The largest per-rank batch of the streams (what DeepSpeed calls the micro-batch)."""
        return max((s.batch_size for s in self.streams().values()), default=1)


class _Cursor:
    """Position in one source for one slot: ``(shard sequence index, sample offset)``."""

    def __init__(self, shards: list[str], slot: int, n_slots: int, seed: str, mode: str) -> None:
        self.shards, self.slot, self.n_slots, self.seed, self.mode = shards, slot, n_slots, seed, mode
        self.seq, self.offset = 0, 0
        self._it: Iterator | None = None

    def _shard_at(self, seq: int) -> str:
        n = len(self.shards)
        if self.mode == "resample":
            return self.shards[random.Random(f"{self.seed}/{self.slot}/{seq}").randrange(n)]
        # partition: every epoch shuffles all shards with the same seed on every slot, then deals them
        # round-robin (slot s gets order[s], order[s + n_slots], ...): disjoint whenever n >= n_slots
        mine = len(range(self.slot % n if n < self.n_slots else self.slot, n, max(self.n_slots, 1)))
        epoch, k = divmod(seq, mine)
        order = list(range(n))
        random.Random(f"{self.seed}/epoch{epoch}").shuffle(order)
        if n < self.n_slots:  # fewer shards than slots: slots share shards
            return self.shards[order[self.slot % n]]
        return self.shards[order[self.slot + k * self.n_slots]]

    def next_raw(self, skipped: dict[str, int]) -> dict[str, bytes]:
        fruitless, error = 0, None  # shards in a row that gave no sample, and the last failure
        while True:
            if self._it is None:
                self._it = iter_tar_samples(self._shard_at(self.seq), self.offset)
            try:
                offset, sample = next(self._it)
                self.offset = offset + 1
                return sample
            except StopIteration:
                pass
            except ShardReadError as e:
                skipped[e.reason] = skipped.get(e.reason, 0) + 1
                error = e
                log.warning("skipped the rest of a shard (%s): %s", e.reason, e)
            if self.offset == 0:
                fruitless += 1
                if fruitless > 2 * len(self.shards) + 8:
                    raise RuntimeError(
                        f"no readable sample in {fruitless} shards in a row (e.g. {self._shard_at(self.seq)}"
                        f"{f'; last error: {error}' if error else ''}); are the shards empty or corrupt?"
                    )
            self._it, self.seq, self.offset = None, self.seq + 1, 0

    def state(self) -> tuple[int, int]:
        return self.seq, self.offset


class StreamDataset(IterableDataset):
    """Batches of one stream kind; each item is ``{"slot", "position", "skipped", "batch"}``."""

    def __init__(
        self,
        kind: str,
        cfg: PretrainDataConfig,
        text_tokenizer: Any,
        img_size: int,
        patch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        start: dict[int, dict],
        slot_offset: int,
    ) -> None:
        self.kind, self.cfg, self.scfg = kind, cfg, cfg.streams()[kind]
        self.tok, self.img_size, self.grid = text_tokenizer, img_size, img_size // patch_size
        self.rank, self.world, self.seed, self.start, self.slot_offset = (
            rank,
            world_size,
            seed,
            start,
            slot_offset,
        )
        self.shards = [
            expand_shards(s.shards, f"data.{kind}.sources[{i}]") for i, s in enumerate(self.scfg.sources)
        ]
        if not self.shards:
            raise ValueError(f"data.{kind}: no sources")
        if kind in TEXT_KINDS and text_tokenizer is None:
            raise ValueError(f"data.{kind}: a text tokenizer is needed (set text_tokenizer)")
        ratio = self.scfg.image_mask_ratio
        if kind in AUDIO_KINDS:
            cfg.audio_frontend.validate()
            self.masking = None
        elif ratio <= 0:
            self.masking = None
        elif self.scfg.image_masking == "random":
            self.masking = lambda rng: random_masking(self.grid * self.grid, ratio, rng)
        else:
            self.masking = BlockMasking.from_ratio(self.grid, ratio, cfg.min_mask_patches)

    def __iter__(self):
        info = get_worker_info()
        workers, phys = (info.num_workers, info.id) if info else (1, 0)
        local = (phys + self.slot_offset) % workers
        slot, n_slots = self.rank * workers + local, self.world * workers
        base = f"{self.seed}/{self.kind}"
        cursors = [
            _Cursor(sh, slot, n_slots, f"{base}/{i}", self.cfg.split) for i, sh in enumerate(self.shards)
        ]
        mix = random.Random(f"{base}/mix/{slot}")
        batches, skipped = 0, {}
        pos = self.start.get(local)
        if pos is not None:
            for c, (seq, off) in zip(cursors, pos["cursors"]):
                c.seq, c.offset = seq, off
            mix.setstate(_to_state(pos["mix"]))
            batches, skipped = pos["batches"], dict(pos["skipped"])
        weights = [s.weight for s in self.scfg.sources]
        while True:
            samples, rejected = [], 0
            while len(samples) < self.scfg.batch_size:
                src = mix.choices(range(len(cursors)), weights)[0] if len(cursors) > 1 else 0
                sample = self._decode(cursors[src].next_raw(skipped), mix, skipped)
                if sample is not None:
                    samples.append(sample)
                    continue
                rejected += 1
                if rejected > MAX_REJECTED_PER_BATCH:
                    raise RuntimeError(
                        f"data.{self.kind}: {rejected} samples in a row were unusable ({skipped}); "
                        "check the shards (mdm data shards reports what it skipped in index.json)"
                    )
            batch = self._collate(samples, random.Random(f"{base}/batch/{slot}/{batches}"))
            batches += 1
            position = {
                "cursors": [c.state() for c in cursors],
                "mix": mix.getstate(),
                "batches": batches,
                "skipped": dict(skipped),
            }
            yield {"slot": local, "position": position, "batch": batch}

    def _decode(self, raw: dict[str, bytes], mix: random.Random, skipped: dict[str, int]) -> dict | None:
        def skip(reason: str, what: str) -> None:
            skipped[reason] = skipped.get(reason, 0) + 1
            log.warning("skipped sample %s: %s", raw.get("__key__"), what)

        out: dict[str, Any] = {}
        if self.kind in AUDIO_KINDS:
            decoded = decode_audio(raw, self.cfg.audio_frontend, skip)
            if decoded is None:
                return None
            out.update(decoded)
        if self.kind in ("image", "pair"):
            ext = next((e for e in raw if e in IMAGE_EXTS), None)
            if ext is None:
                skip("no_image", "no image member")
                return None
            try:
                out["image"] = decode_image(raw[ext], f"{raw['__key__']}.{ext}")
            except ImageReadError as e:
                skip("bad_image", str(e))
                return None
            if self.cfg.precomputed_codes:
                if "tok.npy" not in raw:
                    skip("no_codes", "precomputed_codes=true but no tok.npy member")
                    return None
                from mdm.tokenizers.encode import read_npy

                out["codes"] = torch.from_numpy(read_npy(raw["tok.npy"]).astype("int64"))
        if self.kind in TEXT_KINDS:
            texts = []
            if "json" in raw:
                try:
                    texts = [t for t in json.loads(raw["json"]).get("captions", []) if str(t).strip()]
                except (json.JSONDecodeError, AttributeError):
                    texts = []
            if not texts and "txt" in raw:
                texts = [raw["txt"].decode("utf-8", errors="replace")]
            texts = [t.strip() for t in texts if t.strip()]
            if not texts:
                skip("empty_text", "empty text")
                return None
            out["text"] = texts[mix.randrange(len(texts))]
        return out

    def _collate(self, samples: list[dict], rng: random.Random) -> dict[str, torch.Tensor]:
        batch: dict[str, torch.Tensor] = {}
        if self.kind in AUDIO_KINDS:
            sc = self.scfg
            batch.update(
                collate_audio(
                    samples,
                    self.cfg.audio_frontend,
                    sc.audio_mask_ratio,
                    sc.audio_masking,
                    rng,
                    sc.audio_time_mask_ratio,
                    sc.audio_freq_mask_ratio,
                )
            )
        if self.kind in ("image", "pair"):
            views, tviews, codes, masks = [], [], [], []
            for s in samples:
                v, tv, flipped = two_views(
                    s["image"], self.img_size, self.cfg.views, rng, augment=not self.cfg.precomputed_codes
                )
                views.append(v)
                tviews.append(tv)
                if "codes" in s:
                    codes.append(s["codes"].flip(-1) if flipped else s["codes"])
                if self.masking is not None:
                    masks.append(self.masking(rng))
            batch["image"], batch["tokenizer_image"] = torch.stack(views), torch.stack(tviews)
            if codes:
                batch["image_tokens"] = torch.stack(codes).flatten(1)  # (B, P)
            if masks:
                batch["image_mask"] = torch.stack(masks)  # (B, P)
        if self.kind in TEXT_KINDS:
            ids, pad = self.tok.encode([s["text"] for s in samples], self.scfg.max_text_len)
            keep = max(
                int((~pad).sum(1).max()), 2
            )  # columns that are padding in every row cost time, change nothing
            ids, pad = ids[:, :keep], pad[:, :keep]
            ratio = (
                self.scfg.text_mask_ratio
                if self.scfg.text_mask_ratio is not None
                else DEFAULT_TEXT_MASK[self.kind]
            )
            special = tuple(
                getattr(self.tok, "special_ids", (self.tok.bos_id, self.tok.eos_id, self.tok.pad_id))
            )
            vocab = self.tok.mask_id  # random replacements are real pieces, never unused embedding rows
            text_input, text_mask = mask_text(ids, pad, ratio, self.tok.mask_id, vocab, special, rng)
            batch.update(text=ids, text_padding_mask=pad, text_input=text_input, text_mask=text_mask)
        return batch


def _to_state(s: Any) -> tuple:
    """``random.Random`` state from its JSON/pickle round-tripped form (lists back to tuples)."""
    return (s[0], tuple(s[1]), s[2])


class _KindIterator:
    """Main-process side of one stream kind: consumes batches and remembers each slot's position."""

    def __init__(self, make_dataset, workers: int) -> None:
        self.make_dataset, self.workers = make_dataset, workers
        self.consumed, self.positions = 0, {}
        self._it = None

    def _start(self) -> None:
        n_slots = max(self.workers, 1)
        ds = self.make_dataset(start=dict(self.positions), slot_offset=self.consumed % n_slots)
        # its own generator: creating the iterator must not draw from the global torch RNG, or a resumed
        # run (whose iterators start later) would shift dropout / drop-path masks
        loader = DataLoader(
            ds,
            batch_size=None,
            num_workers=self.workers,
            persistent_workers=False,
            prefetch_factor=2 if self.workers else None,
            generator=torch.Generator().manual_seed(0),
        )
        self._it = iter(loader)

    def __next__(self) -> dict[str, torch.Tensor]:
        if self._it is None:
            self._start()
        item = next(self._it)
        self.positions[int(item["slot"])] = item["position"]
        self.consumed += 1
        return item["batch"]

    def skipped(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for pos in self.positions.values():
            for k, v in pos["skipped"].items():
                total[k] = total.get(k, 0) + v
        return total

    def state_dict(self) -> dict[str, Any]:
        return {"consumed": self.consumed, "positions": self.positions}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.consumed = int(state["consumed"])
        self.positions = {int(k): v for k, v in state["positions"].items()}
        self._it = None


class PretrainStream:
    """Iterator of ``{"image": batch, "text": batch, "pair": batch}`` (the configured kinds)."""

    def __init__(self, kinds: dict[str, _KindIterator]) -> None:
        self.kinds = kinds

    def __iter__(self) -> PretrainStream:
        return self

    def __next__(self) -> dict[str, dict[str, torch.Tensor]]:
        return {k: next(it) for k, it in self.kinds.items()}

    @property
    def skipped(self) -> dict[str, int]:
        """Samples skipped so far on this rank, by ``<kind>_<reason>``."""
        return {f"{k}_{r}": n for k, it in self.kinds.items() for r, n in it.skipped().items()}

    def state_dict(self) -> dict[str, Any]:
        return {k: it.state_dict() for k, it in self.kinds.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k, it in self.kinds.items():
            if k in state:
                it.load_state_dict(state[k])


def build_pretrain_stream(
    cfg: PretrainDataConfig,
    streams: set[str],
    text_tokenizer: Any,
    model_cfg: Any,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
) -> PretrainStream:
    """The stream of the kinds both configured in ``cfg`` and consumed by an objective (``streams``)."""
    configured = cfg.streams()
    missing = streams - set(configured)
    if missing:
        raise ValueError(
            f"the objectives read stream(s) {sorted(missing)} but data.{'/'.join(sorted(missing))} "
            "is not configured"
        )
    kinds = {}
    for kind in KINDS:
        if kind not in configured or kind not in streams:
            continue

        def make(start, slot_offset, kind=kind):
            return StreamDataset(
                kind,
                cfg,
                text_tokenizer,
                model_cfg.img_size,
                model_cfg.patch_size,
                rank,
                world_size,
                seed,
                start,
                slot_offset,
            )

        make(start={}, slot_offset=0)  # fail early on bad shard specs, in the main process
        kinds[kind] = _KindIterator(make, cfg.num_workers)
    return PretrainStream(kinds)
