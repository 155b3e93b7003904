"""Two gloo processes on CPU: ITC's cross-rank negatives give the loss and gradients of one process
holding the global batch, and ITM draws its hard negatives from the global batch (gathered images, texts
of different lengths and padding), exactly as one process would from the same similarity rows."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mdm.models.config import make_config
from mdm.objectives import LOCAL, ObjectivesConfig, build_pretrain_model, sample_hard_negatives
from mdm.objectives.itm import hard_negative_batch
from mdm.train.pretrain import cross_rank

pytestmark = [pytest.mark.dist, pytest.mark.slow]  # ~15 s: two spawned interpreters
WORLD, PER_RANK = 2, 3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model():
    torch.manual_seed(0)
    cfg = make_config("vlmo_tiny", depth=2, img_size=32)
    return build_pretrain_model(cfg, ObjectivesConfig(objectives=["itc"], codebook_size=16)).train()


def _global_batch():
    """6 pairs; rank 0's captions are 7 tokens long, rank 1's only 5 (padding differs per rank)."""
    g = torch.Generator().manual_seed(1)
    image = torch.randn(WORLD * PER_RANK, 3, 32, 32, generator=g)
    text = torch.randint(4, 1000, (WORLD * PER_RANK, 7), generator=g)
    pad = torch.zeros_like(text, dtype=torch.bool)
    pad[1, 5:] = True
    pad[PER_RANK:, 5:] = True  # rank 1's batch is trimmed to 5 columns by the collate
    pad[PER_RANK + 1, 3:] = True
    return image, text, pad


def _shard(rank: int):
    image, text, pad = _global_batch()
    rows = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    width = 7 if rank == 0 else 5
    return {"image": image[rows], "text": text[rows, :width], "text_padding_mask": pad[rows, :width]}


def _negatives(model, batch, seed: int):
    itc = model.objectives["itc"]
    context: dict = {}
    with torch.no_grad():
        itc(model.backbone, batch, context=context)
    sims = context["itc"]
    pairs = hard_negative_batch(
        batch["image"], batch["text"], batch["text_padding_mask"], sims, itc.cross_rank,
        torch.Generator().manual_seed(seed),
    )  # fmt: skip
    return sims, pairs


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    model = _model()
    model.set_cross_rank(cross_rank())  # what mdm pretrain wires
    batch = _shard(rank)
    loss = model({"pair": batch})["itc_loss"]
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    for g in grads.values():  # what DDP / DeepSpeed do: average over ranks
        dist.all_reduce(g)
        g /= WORLD
    sims, pairs = _negatives(model, batch, seed=10 + rank)
    sims = {"image_to_text": sims.image_to_text, "text_to_image": sims.text_to_image, "offset": sims.offset}
    torch.save(
        {"loss": loss.item(), "grads": grads, "sims": sims, "pairs": pairs}, Path(out, f"rank{rank}.pt")
    )
    dist.destroy_process_group()


def test_itc_cross_rank_negatives_and_itm_global_hard_negatives(tmp_path):
    mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    got = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]

    # one process holding the global batch (texts padded to the longest, as the gather pads them)
    model = _model()
    assert model.objectives["itc"].cross_rank is LOCAL
    image, text, pad = _global_batch()
    whole = {"image": image, "text": text, "text_padding_mask": pad}
    want = model({"pair": whole})["itc_loss"]
    want.backward()
    # each rank's loss is over its own rows against all 6 candidates; their mean is the global loss
    mean = sum(r["loss"] for r in got) / WORLD
    assert abs(mean - want.item()) <= 1e-6
    assert abs(got[0]["loss"] - got[1]["loss"]) > 1e-3  # the ranks' terms do differ
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        for r in got:
            assert torch.allclose(r["grads"][name], p.grad, atol=1e-6), name
    assert any(n.startswith("heads.itc.") for n in got[0]["grads"])

    # ITM: the similarity rows of rank r are the global batch's rows r*3..r*3+2 against all 6 ...
    model.zero_grad()
    context: dict = {}
    with torch.no_grad():
        model.objectives["itc"](model.backbone, whole, context=context)
    for rank, r in enumerate(got):
        rows = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
        assert r["sims"]["offset"] == rank * PER_RANK
        assert torch.allclose(r["sims"]["image_to_text"], context["itc"].image_to_text[rows], atol=1e-5)
        assert torch.allclose(r["sims"]["text_to_image"], context["itc"].text_to_image[rows], atol=1e-5)
        # ... and the negatives are drawn from the gathered global batch, as one process draws them from
        # the global similarity rows with the same generator (text → image first, then image → text)
        pairs, g = r["pairs"], torch.Generator().manual_seed(10 + rank)
        positives = torch.arange(PER_RANK) + rank * PER_RANK
        neg_image = sample_hard_negatives(context["itc"].text_to_image[rows], positives, g)
        neg_text = sample_hard_negatives(context["itc"].image_to_text[rows], positives, g)
        assert torch.equal(pairs["negative_image"], neg_image) and torch.equal(
            pairs["negative_text"], neg_text
        )
        assert (
            not (pairs["negative_image"] == positives).any()
            and not (pairs["negative_text"] == positives).any()
        )
        for b in range(PER_RANK):
            j, k = int(pairs["negative_image"][b]), int(pairs["negative_text"][b])
            assert torch.equal(pairs["image"][PER_RANK + b], image[j])
            keep = ~pairs["text_padding_mask"][2 * PER_RANK + b]
            assert torch.equal(pairs["text"][2 * PER_RANK + b][keep], text[k][~pad[k]])
    assert {int(j) // PER_RANK for r in got for j in r["pairs"]["negative_text"]} == {
        0,
        1,
    }  # both ranks' texts
