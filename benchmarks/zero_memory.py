"""Measured per-rank memory of ZeRO-3 vs ZeRO-0 on 2 CPU ranks, next to ``mdm launch --dry-run``'s model.

    .venv/bin/python benchmarks/zero_memory.py            # vlmo_base width, 4 layers (~60M parameters)
    .venv/bin/python benchmarks/zero_memory.py --depth 2  # smaller

For each stage, ``torchrun --nproc_per_node 2`` runs this file as a worker: it builds the backbone with a
squared-output loss, hands it and mdm's AdamW to :class:`mdm.distributed.deepspeed.DeepSpeedStrategy`
(fp32, gloo), runs a few optimizer steps and reports, per rank:

* tracked bytes — the parameter storage the rank holds (its ZeRO-3 partition ``p.ds_tensor``, or the
  full parameter), the fp32 flat partitions DeepSpeed keeps for the optimizer, and the optimizer state
  tensors (Adam m and v);
* resident memory — VmRSS after the imports (baseline) and the peak (``ru_maxrss``) after the steps.

The prediction is :func:`mdm.launch.memory.zero_state_bytes` (params + grads + Adam state, 16 bytes per
parameter in fp32, divided by N as the stage says).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
MiB = 1024**2


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def tensor_bytes(obj) -> int:
    """Bytes of the distinct tensor storages reachable in a nested dict/list of tensors."""
    import torch

    seen, total = set(), 0
    stack = [obj]
    while stack:
        o = stack.pop()
        if isinstance(o, torch.Tensor):
            key = o.untyped_storage().data_ptr()
            if key not in seen and o.numel():
                seen.add(key)
                total += o.untyped_storage().nbytes()
        elif isinstance(o, dict):
            stack.extend(o.values())
        elif isinstance(o, (list, tuple)):
            stack.extend(o)
    return total


def worker(args: argparse.Namespace) -> None:
    import torch

    from mdm.distributed.deepspeed import DeepSpeedStrategy
    from mdm.distributed.strategy import DistributedConfig
    from mdm.models import create_model
    from mdm.train.optim import OptimConfig, build_optimizer

    torch.set_num_threads(1)
    base = rss_mib()

    class Wrapped(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = create_model(
                "vlmo_base", depth=args.depth, vl_ffn_layers=min(2, args.depth), img_size=64, vocab_size=8192
            )

        def forward(self, image, text):
            return self.backbone(image=image, text=text).square().mean()

    torch.manual_seed(0)
    model = Wrapped()
    n_params = sum(p.numel() for p in model.parameters())
    # buckets of 2M elements (8 MB) instead of 50M: at this model size the default buckets would dominate
    ds_cfg = DistributedConfig(strategy="deepspeed", zero_stage=args.stage, reduce_bucket_size=2_000_000)
    st = DeepSpeedStrategy(ds_cfg)
    st.configure(micro_batch=2, grad_accum=1, clip_grad=0.0)
    engine = st.setup(model, build_optimizer(model, OptimConfig(), args.depth))
    g = torch.Generator().manual_seed(st.rank)
    for _ in range(args.steps):
        loss = engine(torch.randn(2, 3, 64, 64, generator=g), torch.randint(3, 8192, (2, 8), generator=g))
        st.backward(loss)
        st.clip_and_step(0.0)
    held = [getattr(p, "ds_tensor", p) for p in engine.module.parameters()]  # partition or full tensor
    ds_opt = engine.optimizer
    inner = getattr(ds_opt, "optimizer", ds_opt)
    flat_list = list(getattr(ds_opt, "fp32_partitioned_groups_flat", []))
    states = [dict(s) for s in inner.state.values()]
    params, flat, state = tensor_bytes(held), tensor_bytes(flat_list), tensor_bytes(states)
    distinct = tensor_bytes([held, flat_list, states])  # shared storages counted once
    gc.collect()
    after = rss_mib()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    row = dict(rank=st.rank, stage=args.stage, n_params=n_params, params=params, fp32_flat=flat, optim_state=state,
               distinct=distinct, rss_base=base, rss_after=after, rss_peak=peak)  # fmt: skip
    with open(f"{args.out}.rank{st.rank}.json", "w") as f:
        json.dump(row, f)
    st.close()


def launch(stage: int, depth: int, steps: int, tmp: str) -> list[dict]:
    out = os.path.join(tmp, f"stage{stage}")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           "--master_port=29517", __file__, "--worker", "--stage", str(stage), "--depth", str(depth),
           "--steps", str(steps), "--out", out]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode:
        sys.exit(f"stage {stage} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return [json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in range(2)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--stage", type=int, default=0)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    from mdm.launch.memory import zero_state_bytes

    with tempfile.TemporaryDirectory() as tmp:
        rows = {s: launch(s, args.depth, args.steps, tmp) for s in (0, 3)}
    n = rows[0][0]["n_params"]
    print(f"{n / 1e6:.1f}M parameters, fp32, 2 ranks, {args.steps} AdamW steps (MiB per rank)")
    print(f"{'stage':<6}{'rank':>5}{'params':>8}{'fp32 flat':>10}{'Adam m,v':>9}{'tracked':>9}"
          f"{'predicted':>10}{'RSS base':>9}{'RSS after':>10}{'RSS peak':>9}")  # fmt: skip
    for stage, rs in rows.items():
        pred = zero_state_bytes(n, 2, "fp32", stage)
        for r in rs:
            print(f"{stage:<6}{r['rank']:>5}{r['params'] / MiB:>8.0f}{r['fp32_flat'] / MiB:>10.0f}"
                  f"{r['optim_state'] / MiB:>9.0f}{r['distinct'] / MiB:>9.0f}{(pred.params + pred.optimizer) / MiB:>10.0f}"
                  f"{r['rss_base']:>9.0f}{r['rss_after']:>10.0f}{r['rss_peak']:>9.0f}")  # fmt: skip
        print(f"{'':<6}predicted params+grads+Adam per rank: {pred.total / MiB:.0f} MiB")
    mean = lambda s, f: sum(f(r) for r in rows[s]) / 2  # noqa: E731
    tracked = lambda r: r["distinct"]  # noqa: E731
    print(f"tracked ZeRO-3 / ZeRO-0 per rank: {mean(3, tracked) / mean(0, tracked):.2f} (1/N = 0.50)")
    grow = lambda r: r["rss_after"] - r["rss_base"]  # noqa: E731
    print(f"RSS growth after the steps, ZeRO-3 / ZeRO-0 per rank: {mean(3, grow) / mean(0, grow):.2f}")


if __name__ == "__main__":
    main()
