"""Two gloo processes on CPU: the gathered contrastive loss and its gradients equal the one-process loss
on the concatenated batch, and distributed evaluation returns the single-process metrics."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from mdm.distributed.ops import all_gather_with_grad
from mdm.models import create_model
from mdm.tasks import TaskConfig, TaskDataConfig, build_task
from mdm.tasks.fixtures import HashTokenizer, write_karpathy, write_vqav2
from mdm.tasks.retrieval import ContrastiveLoss

pytestmark = [pytest.mark.dist, pytest.mark.slow]  # ~25 s: two spawned interpreters
WORLD = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _inputs():
    g = torch.Generator().manual_seed(0)
    layer = torch.nn.Linear(6, 5)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(5, 6, generator=g))
        layer.bias.copy_(torch.randn(5, generator=g))
    # rank 0 holds 3 pairs, rank 1 holds 2 (uneven batches are gathered too)
    return layer, torch.randn(5, 6, generator=g), torch.randn(5, 6, generator=g), [slice(0, 3), slice(3, 5)]


def _loss(layer, img, txt):
    return ContrastiveLoss()(
        F.normalize(layer(img), dim=-1), F.normalize(layer(txt), dim=-1), torch.tensor(7.0)
    )["loss"]


def _tasks(root: Path):
    tok = HashTokenizer(256)
    out = []
    runs = (
        ("retrieval", "ret", {}, {}),
        ("retrieval", "ret", {}, {"rerank_k": 3, "rerank_batch_size": 4}),  # two-stage: ranks share queries
        ("vqav2", "vqa", {"answer_min_count": 1}, {}),
    )
    for name, sub, extra, task_kw in runs:
        task = build_task(
            TaskConfig(name=name, **task_kw),
            TaskDataConfig(root=str(root / sub), image_size=32, num_workers=0, **extra),
        )
        torch.manual_seed(0)
        model = task.build_model(create_model("vlmo_tiny", depth=1, img_size=32))
        out.append((task, model, task.build_dataset("val" if name == "retrieval" else "val2014", tok)))
    return out


def _worker(rank: int, port: int, root: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    layer, img, txt, parts = _inputs()
    x = torch.ones(3, requires_grad=True)
    gathered = all_gather_with_grad(x * (rank + 1))  # d/dx of sum(gathered * w) must come back summed
    (gathered * torch.arange(6.0)).sum().backward()
    loss = _loss(layer, img[parts[rank]], txt[parts[rank]])
    loss.backward()
    grads = [p.grad.clone() for p in layer.parameters()]
    for g in grads:  # what DDP / DeepSpeed do: average over ranks
        dist.all_reduce(g)
        g /= WORLD
    metrics = []
    for task, model, ds in _tasks(Path(root)):
        sampler = DistributedSampler(ds, shuffle=False)
        metrics.append(
            task.evaluate(model, DataLoader(ds, batch_size=3, sampler=sampler, collate_fn=task.collate))
        )
    result = {
        "loss": loss.item(),
        "grads": [g.tolist() for g in grads],
        "x_grad": x.grad.tolist(),
        "metrics": metrics,
    }
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def test_gathered_contrastive_loss_and_distributed_evaluation(tmp_path):
    write_karpathy(tmp_path / "ret", {"val": 5})
    write_vqav2(tmp_path / "vqa", {"train2014": 2, "val2014": 3})
    layer, img, txt, _ = _inputs()
    want_loss = _loss(layer, img, txt)  # one process, whole batch
    want_loss.backward()
    want_grads = [p.grad for p in layer.parameters()]
    want_metrics = [
        task.evaluate(model, DataLoader(ds, batch_size=4, collate_fn=task.collate))
        for task, model, ds in _tasks(tmp_path)
    ]

    mp.spawn(_worker, args=(free_port(), str(tmp_path), str(tmp_path)), nprocs=WORLD, join=True)
    for rank in range(WORLD):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got["loss"] == pytest.approx(want_loss.item(), rel=1e-6)  # every rank sees the global loss
        for g, w in zip(got["grads"], want_grads):
            assert torch.allclose(torch.tensor(g), w, atol=1e-6)
        # gathered = [x*1, x*2]; weights 0..5 -> rank 0 gets 1*(0,1,2)+... summed over both ranks' losses
        weights = torch.arange(6.0).view(2, 3)
        assert got["x_grad"] == pytest.approx((weights[rank] * (rank + 1) * WORLD).tolist())
        for m, w in zip(got["metrics"], want_metrics):
            assert m.keys() == w.keys() and all(m[k] == pytest.approx(w[k], abs=1e-6, nan_ok=True) for k in w)
