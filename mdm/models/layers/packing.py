"""Packed modality parts: compute on the real tokens of a padded part only.

The encoder holds the residual stream as per-modality *parts*, one tensor per modality in sequence order
(see :mod:`mdm.models.layers.multiway`). A part whose input carries a padding mask (text; any later
modality with ragged lengths) can be held **packed**: its real tokens only, row-major over (sample,
position), as one ``(n_real, D)`` matrix. Every per-token operation — LayerNorms, the qkv and output
projections, Sub-LN, the FFN experts, layer scale, drop path and the residual adds — runs on that matrix
as it is, so no FLOP is spent on padding. Attention is the only place where positions meet; there the
rows of all parts are scattered into the padded ``(B, N, ·)`` layout (zeros at padding, which the key
padding mask hides), attention runs as before, and the outputs at real positions are gathered back.
Padded query rows are computed and dropped: a dense attention kernel cannot skip them per sample, and
they are a small share of the attention FLOPs (see ``docs/performance.md``). On CPU, when enough padding
would be skipped, attention instead runs per sample over its real tokens (``per_sample_pays`` in
:mod:`mdm.models.layers.attention`).

A part without padding is held **dense**, ``(B, L, D)``. A batch with no padding at all has no packed
part, and every layer then takes the dense path of before (no gather, no scatter).

:class:`Layout` describes a sequence held this way: the kind, length and padding of every part, and the
:class:`Packing` of each packed one. It is built once per forward (:meth:`Layout.build`) and passed to
every layer, so the index tensors are computed once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from itertools import accumulate

import torch


@dataclass(frozen=True, eq=False)
class Packing:
    """Where the real tokens of one padded ``(B, L)`` part are.

    Attributes:
        index: (n_real,) long, flat position ``b * L + t`` of each real token, ascending (row-major).
        sample: (n_real,) long, the sample ``b`` of each real token (drop path draws per sample).
        batch: B.
        length: L, the part's positions in the padded layout.
        counts: real tokens of each sample (B ints); sample ``b`` holds the packed rows
            ``sum(counts[:b]) : sum(counts[:b + 1])``.
    """

    index: torch.Tensor
    sample: torch.Tensor
    batch: int
    length: int
    counts: tuple[int, ...]

    @classmethod
    def from_padding_mask(cls, padding_mask: torch.Tensor) -> Packing:
        """The packing of a part whose ``padding_mask`` (B, L) is True at padding."""
        B, L = padding_mask.shape
        real = ~padding_mask
        index = real.flatten().nonzero().squeeze(1)  # (n_real,)
        counts = tuple(real.sum(dim=1).tolist())  # one host sync per forward, not per layer
        return cls(index, torch.div(index, L, rounding_mode="floor"), B, L, counts)

    @property
    def n_real(self) -> int:
        return self.index.shape[0]

    @property
    def positions(self) -> torch.Tensor:
        """(n_real,) long, the position ``t`` of each real token within its sample."""
        return self.index - self.sample * self.length

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L, *F) → (n_real, *F): the rows at real positions."""
        return x.reshape(self.batch * self.length, *x.shape[2:]).index_select(0, self.index)

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """(n_real, *F) → (B, L, *F), zeros at padding."""
        out = x.new_zeros(self.batch * self.length, *x.shape[1:])
        return out.index_copy(0, self.index, x).view(self.batch, self.length, *x.shape[1:])

    def per_token(self, per_sample: torch.Tensor) -> torch.Tensor:
        """(B, *F) → (n_real, *F): a per-sample value repeated for each real token of that sample."""
        return per_sample.index_select(0, self.sample)


@dataclass(frozen=True, eq=False)
class Layout:
    """How the encoder holds one sequence: its modality parts, in sequence order.

    Attributes:
        kinds: the kind of each part (``"vision"``, ``"text"``, ...), which picks its experts.
        lengths: L_i, positions of each part in the padded sequence; N = sum(lengths).
        batch: B.
        padding: per part, (B, L_i) bool True at padding, or None when the part has none.
        packings: per part, its :class:`Packing` when it is held packed ``(n_real, D)``, else None
            (held dense ``(B, L_i, D)``).
        rows: per part, when any part is packed: (n_i,) long, the row of each of its tokens in the
            flattened padded sequence ``(B * N, ·)``, in the part's own row order; else ``()``.
    """

    kinds: tuple[str, ...]
    lengths: tuple[int, ...]
    batch: int
    padding: tuple[torch.Tensor | None, ...]
    packings: tuple[Packing | None, ...]
    rows: tuple[torch.Tensor, ...] = ()

    @classmethod
    def build(
        cls,
        kinds: Sequence[str],
        lengths: Sequence[int],
        batch: int,
        padding: Sequence[torch.Tensor | None],
        unpad: bool,
    ) -> Layout:
        """The layout of parts with these kinds, lengths and padding masks.

        With ``unpad`` every part that has at least one padded position is packed; otherwise (and for a
        batch without padding) all parts are dense.
        """
        padding = tuple(p if p is not None and bool(p.any()) else None for p in padding)
        packings = tuple(Packing.from_padding_mask(p) if unpad and p is not None else None for p in padding)
        layout = cls(tuple(kinds), tuple(lengths), batch, padding, packings)
        if layout.packed:
            object.__setattr__(layout, "rows", layout._joint_rows())
        return layout

    @classmethod
    def dense(cls, kinds: Sequence[str], parts: Sequence[torch.Tensor]) -> Layout:
        """The layout of dense parts (B, L_i, ...) without padding."""
        none = (None,) * len(parts)
        return cls(tuple(kinds), tuple(p.shape[1] for p in parts), parts[0].shape[0], none, none)

    @property
    def packed(self) -> bool:
        """Whether any part is held packed."""
        return any(p is not None for p in self.packings)

    @property
    def joint(self) -> bool:
        """More than one modality (the VL experts apply)."""
        return len(self.kinds) > 1

    @property
    def total(self) -> int:
        """N, positions of the padded sequence."""
        return sum(self.lengths)

    def _joint_rows(self) -> tuple[torch.Tensor, ...]:
        N, out, start = self.total, [], 0
        device = next(p.index.device for p in self.packings if p is not None)
        for L, packing in zip(self.lengths, self.packings):
            if packing is not None:
                out.append(packing.sample * N + start + packing.positions)  # (n_i,)
            else:
                b = torch.arange(self.batch, device=device).unsqueeze(1) * N  # (B, 1)
                out.append((b + start + torch.arange(L, device=device)).flatten())  # (B * L,)
            start += L
        return tuple(out)

    def key_keep(self) -> torch.Tensor | None:
        """(B, N) bool, True at the positions attention may look at; None when nothing is padded."""
        if all(p is None for p in self.padding):
            return None
        device = next(p for p in self.padding if p is not None).device
        keep = [
            torch.ones(self.batch, L, dtype=torch.bool, device=device) if p is None else ~p
            for L, p in zip(self.lengths, self.padding)
        ]
        return keep[0] if len(keep) == 1 else torch.cat(keep, dim=1)

    @cached_property
    def key_mask(self) -> torch.Tensor | None:
        """(B, 1, 1, N) bool, :meth:`key_keep` shaped for attention; one tensor per layout, so attention
        can tell by identity that a mask is only the key padding (see ``MultiwayAttention``)."""
        keep = self.key_keep()
        return None if keep is None else keep[:, None, None, :]

    @cached_property
    def attention_area(self) -> int:
        """Σ_b n_b², n_b the real tokens of sample b over all parts: the token pairs attention must score."""
        counts = [0] * self.batch
        for L, packing in zip(self.lengths, self.packings):
            for b in range(self.batch):
                counts[b] += L if packing is None else packing.counts[b]
        return sum(n * n for n in counts)

    @cached_property
    def sample_slices(self) -> tuple[tuple[slice, ...], ...]:
        """Per sample ``b``, per part, the slice of that part's flattened rows holding sample ``b``: the
        real tokens of a packed part (``(n_i, ·)``), all ``L_i`` positions of a dense one (``(B * L_i, ·)``)."""
        per_part = []
        for L, packing in zip(self.lengths, self.packings):
            counts = (L,) * self.batch if packing is None else packing.counts
            stops = list(accumulate(counts))
            per_part.append([slice(stop - n, stop) for n, stop in zip(counts, stops)])
        return tuple(zip(*per_part))

    def scatter(self, parts: Sequence[torch.Tensor]) -> torch.Tensor:
        """Rows of every part, dense (B, L_i, F) or packed (n_i, F), → the padded sequence (B, N, F),
        zeros at padding. Needs :attr:`packed`."""
        F = parts[0].shape[-1]
        out = parts[0].new_zeros(self.batch * self.total, F)
        for rows, x in zip(self.rows, parts):
            out.index_copy_(0, rows, x.reshape(-1, F))
        return out.view(self.batch, self.total, F)

    def gather(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Inverse of :meth:`scatter`: (B, N, F) → the parts, dense (B, L_i, F) or packed (n_i, F)."""
        F = x.shape[-1]
        flat = x.reshape(self.batch * self.total, F)
        out = []
        for rows, L, packing in zip(self.rows, self.lengths, self.packings):
            part = flat.index_select(0, rows)
            out.append(part if packing is not None else part.view(self.batch, L, F))
        return out

    def to_padded(self, parts: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Each part in the padded layout (B, L_i, ...): packed parts unpacked (zeros at padding), dense
        parts as they are."""
        return [x if p is None else p.unpack(x) for x, p in zip(parts, self.packings)]

    def zero_padding(self, parts: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Parts in the padded layout with every padded position set to 0 (what the encoder returns)."""
        return [x if p is None else x.masked_fill(p.unsqueeze(-1), 0.0) for x, p in zip(parts, self.padding)]
