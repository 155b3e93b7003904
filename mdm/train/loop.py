"""The training loop shared by ``mdm pretrain`` and ``mdm finetune``.

The loop knows nothing about objectives or tasks: it calls ``model(batch)`` and expects a dict with a
``"loss"`` tensor plus scalar entries to log. Everything device- or sharding-specific goes through the
:class:`~mdm.distributed.strategy.Strategy`. Guarantees:

* **Exact resume**: model, optimizer, step, every RNG and the data-stream position are checkpointed, so N
  steps + kill + resume gives the same losses as an uninterrupted run.
* **Non-finite losses** skip the optimizer step on every rank and are counted; ``max_bad_steps`` in a
  row abort with a message that says what to try.
* Atomic checkpoints every ``ckpt_every`` steps and at the end; the last ``keep_last`` are kept.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mdm.train.checkpoint import CheckpointManager, git_revision, resolve_resume, rng_state, set_rng_state
from mdm.train.metrics import LoggingConfig, MetricSink
from mdm.train.optim import OptimConfig, lr_at

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """The loop.

    Attributes:
        steps: optimizer steps in the whole run.
        grad_accum: micro-batches per optimizer step.
        ckpt_every: checkpoint every N steps (and always at the end); 0 = only at the end.
        keep_last: complete checkpoints to keep.
        resume: ``auto`` (newest checkpoint of this run, if any), ``none``, or a checkpoint path.
        seed: base seed (each rank adds its rank).
        out_dir: run directory (metrics, checkpoints, final model).
        max_bad_steps: consecutive non-finite steps before aborting.
        peak_tflops: per-device peak for the MFU estimate (0 = :func:`device_peak_tflops`).
        stop_after: stop (as if killed) after this many steps of *this* invocation; 0 = never. For tests
            and for splitting a long run into jobs.
        compile: ``torch.compile`` every transformer block (opt-in; see :func:`compile_blocks`).
        compile_backend: the ``torch.compile`` backend (``inductor``; ``aot_eager`` compiles the graphs
            without generating kernels, e.g. to check a run quickly).
    """

    steps: int = 1000
    grad_accum: int = 1
    ckpt_every: int = 500
    keep_last: int = 3
    resume: str = "auto"
    seed: int = 0
    out_dir: str = "runs/pretrain"
    max_bad_steps: int = 5
    peak_tflops: float = 0.0
    stop_after: int = 0
    compile: bool = False
    compile_backend: str = "inductor"


class TrainingAborted(RuntimeError):
    """Too many consecutive non-finite steps."""


def to_device(obj: Any, device: torch.device) -> Any:
    """Moves every tensor in a nested dict/list to ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device) for v in obj)
    return obj


def compile_blocks(model: nn.Module, backend: str = "inductor") -> int:
    """Compiles each transformer block of ``model`` in place (``nn.Module.compile``); returns how many.

    Blocks, not the whole model: the packing of padded text (:mod:`mdm.models.layers.packing`) has
    data-dependent shapes and the objectives branch on the batch, so the whole model would break into
    many graphs and recompile per batch. A block's input is the packed parts with symbolic row counts
    (``dynamic=True``): one graph per block kind, reused across text lengths. In-place compilation keeps
    parameter names, so checkpoints and exports are unchanged.
    """
    from mdm.models.multiway import MultiwayBlock
    from mdm.objectives.heads import VisionBlock

    n = 0
    for module in model.modules():
        if isinstance(module, (MultiwayBlock, VisionBlock)):
            module.compile(backend=backend, dynamic=True)
            n += 1
    return n


#: Dense bf16 tensor-core peaks (TFLOP/s, without sparsity) from the vendors' data sheets, matched as
#: substrings of ``torch.cuda.get_device_name()`` in this order; ``train.peak_tflops`` overrides them.
BF16_PEAK_TFLOPS: dict[str, float] = {
    "H200": 989.0,
    "H100 PCIe": 756.0,
    "H100": 989.0,
    "A100": 312.0,
    "L40S": 362.0,
    "A10G": 125.0,
    "A10": 125.0,
    "L4": 121.0,
    "RTX 4090": 165.0,
    "RTX 3090": 71.0,
    "V100": 125.0,  # fp16: V100 has no bf16
}


def device_peak_tflops(device: torch.device) -> float:
    """The MFU denominator of ``device``: the bf16 table entry of a known GPU, a measured fp32 matmul on
    CPU, 0 (no MFU) for an unknown GPU."""
    if device.type == "cpu":
        return measure_matmul_tflops()
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peak in BF16_PEAK_TFLOPS.items():
            if key in name:
                return peak
        log.warning("no bf16 peak known for %r: set train.peak_tflops for the MFU estimate", name)
    return 0.0


def measure_matmul_tflops(n: int = 1024, reps: int = 5) -> float:
    """Achieved fp32 TFLOP/s of an n×n matmul on this CPU (the MFU denominator when no peak is given)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - t) / 1e12


class Trainer:
    """Runs the loop.

    Args:
        model: returns a dict with ``"loss"`` from ``model(batch)``.
        optimizer: built over the model's trainable parameters.
        strategy: single / DDP / DeepSpeed.
        data: an iterator of batches with ``state_dict()``/``load_state_dict()`` (exact resume); an
            optional ``skipped`` mapping of counts of skipped samples is logged.
        train: loop config. optim: schedule and clipping. logging: sinks.
        prepare: called on each batch after it is moved to the device (e.g. fills visual tokens).
        flops_per_batch: model FLOPs (forward + backward) of one micro-batch, for the MFU estimate.
        samples_per_batch: samples in one micro-batch on one rank.
        tokens_per_batch: encoder tokens in one micro-batch on one rank (for ``tokens_per_s``).
        run_config: the resolved config, saved with every checkpoint.
        hooks: called with the trainer after every optimizer step (e.g. periodic evaluation).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        strategy,
        data: Iterator,
        train: TrainConfig,
        optim: OptimConfig,
        logging_cfg: LoggingConfig,
        prepare: Callable[[Any], Any] | None = None,
        flops_per_batch: Callable[[Any], float] | None = None,
        samples_per_batch: Callable[[Any], int] | None = None,
        tokens_per_batch: Callable[[Any], int] | None = None,
        run_config: dict | None = None,
        hooks: list[Callable[[Trainer], None]] | None = None,
    ) -> None:
        self.train, self.optim, self.logging_cfg = train, optim, logging_cfg
        self.strategy = strategy
        self.data = data
        self.prepare = prepare or (lambda b: b)
        self.flops_per_batch = flops_per_batch
        self.samples_per_batch = samples_per_batch or _count_samples
        self.tokens_per_batch = tokens_per_batch
        self._tokens_window = 0
        self.run_config = run_config or {}
        self.hooks = list(hooks or [])
        self.out = Path(train.out_dir)
        self.ckpt = CheckpointManager(self.out / "checkpoints", train.keep_last, strategy)
        self.sink = MetricSink(self.out, logging_cfg, strategy.is_main, self.run_config)
        self.model = strategy.setup(model, optimizer)
        if train.compile:
            n = compile_blocks(strategy.module, train.compile_backend)
            log.info("torch.compile (%s): %d blocks", train.compile_backend, n)
        self.step = 0
        self.bad_in_row = 0
        self.bad_total = 0
        self.peak_tflops = train.peak_tflops or device_peak_tflops(strategy.device)

    # ------------------------------------------------------------------ state
    def _client_state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "bad_total": self.bad_total,
            "rng": rng_state(),
            "data": self.data.state_dict() if hasattr(self.data, "state_dict") else None,
        }

    def _meta(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "config": self.run_config,
            "git_revision": git_revision(),
            "world_size": self.strategy.world_size,
            "strategy": self.strategy.name,
        }

    def save(self) -> Path:
        return self.ckpt.save(self.step, self._client_state(), self._meta())

    def maybe_resume(self) -> bool:
        """Restores the newest (or the given) checkpoint; returns whether it did."""
        path = resolve_resume(self.train.resume, self.out / "checkpoints")
        if path is None:
            torch.manual_seed(self.train.seed + self.strategy.rank)
            return False
        state = self.ckpt.load(path)
        self.step = int(state["step"])
        self.bad_total = int(state.get("bad_total", 0))
        if state.get("data") is not None:
            self.data.load_state_dict(state["data"])
        set_rng_state(state["rng"])
        self.sink.truncate_after(self.step)
        log.info("resumed from %s at step %d", path, self.step)
        return True

    # ------------------------------------------------------------------ loop
    def _micro_step(self, acc: dict[str, float]) -> tuple[bool, int, float]:
        """One micro-batch forward/backward; returns (finite, samples, flops)."""
        batch = self.prepare(to_device(next(self.data), self.strategy.device))
        with self.strategy.autocast():
            out = self.model(batch)
        loss = out["loss"]
        if self.strategy.any_rank(not bool(torch.isfinite(loss.detach()).all())):
            return False, 0, 0.0
        self.strategy.backward(loss)
        for k, v in out.items():
            if isinstance(v, torch.Tensor) and v.numel() == 1:
                acc[k] = acc.get(k, 0.0) + float(v.detach()) / self.train.grad_accum
            elif isinstance(v, (int, float)):
                acc[k] = acc.get(k, 0.0) + float(v) / self.train.grad_accum
        flops = self.flops_per_batch(batch) if self.flops_per_batch else 0.0
        if self.tokens_per_batch is not None:
            self._tokens_window += self.tokens_per_batch(batch)
        return True, self.samples_per_batch(batch), flops

    def _handle_bad_step(self) -> None:
        self.strategy.zero_grad()
        self.bad_in_row += 1
        self.bad_total += 1
        log.warning(
            "step %d: non-finite loss or gradient, step skipped (%d in a row)", self.step, self.bad_in_row
        )
        if self.bad_in_row >= self.train.max_bad_steps:
            raise TrainingAborted(
                f"{self.bad_in_row} consecutive steps had a non-finite loss or gradient (step {self.step}). "
                "Try a lower optim.lr, a longer optim.warmup_steps, optim.clip_grad > 0, or "
                "distributed.precision=bf16 instead of fp16; resume=auto restarts from the last checkpoint."
            )

    def fit(self) -> dict[str, float]:
        """Runs from the current (possibly resumed) step to ``train.steps``; returns the last logged row."""
        self.maybe_resume()
        total, every = self.train.steps, max(self.logging_cfg.every, 1)
        pbar = _progress(self.strategy.is_main and self.logging_cfg.progress, self.step, total)
        window: dict[str, float] = {}
        n_window, t_window, samples_w, flops_w, last = 0, time.perf_counter(), 0, 0.0, {}
        started = 0
        while self.step < total:
            lr = lr_at(self.step, self.optim, total)
            self.strategy.set_lr(lr, self.step)
            acc: dict[str, float] = {}
            ok = True
            for _ in range(self.train.grad_accum):
                ok, n, fl = self._micro_step(acc)
                if not ok:
                    break
                samples_w += n
                flops_w += fl
            grad_norm = self.strategy.clip_and_step(self.optim.clip_grad) if ok else float("nan")
            if ok and not math.isfinite(grad_norm) and self.strategy.amp_dtype != torch.float16:
                ok = False  # the strategy already skipped the update
            if not ok:
                self._handle_bad_step()
            else:
                self.bad_in_row = 0
                for k, v in acc.items():
                    window[k] = window.get(k, 0.0) + v
                n_window += 1
            self.step += 1
            started += 1
            pbar.update(1)
            if ok:
                pbar.set_postfix(loss=f"{acc.get('loss', float('nan')):.4f}", lr=f"{lr:.2e}")
            if self.step % every == 0 or self.step == total:
                last = self._log(
                    window, n_window, time.perf_counter() - t_window, samples_w, flops_w, lr, grad_norm
                )
                window, n_window, t_window, samples_w, flops_w = {}, 0, time.perf_counter(), 0, 0.0
            for hook in self.hooks:
                hook(self)
            if self.train.ckpt_every and self.step % self.train.ckpt_every == 0 and self.step < total:
                self.save()
            if self.train.stop_after and started >= self.train.stop_after and self.step < total:
                log.info("stop_after=%d reached at step %d", self.train.stop_after, self.step)
                pbar.close()
                self.sink.close()
                return last
        pbar.close()
        self.save()
        self.sink.close()
        return last

    def _log(self, window, n, dt, samples, flops, lr, grad_norm) -> dict[str, float]:
        world = self.strategy.world_size
        row = {k: v / max(n, 1) for k, v in window.items()}
        if world > 1 and row:  # average the logged losses/accuracies over ranks
            keys = sorted(row)
            t = self.strategy.all_reduce_sum(
                torch.tensor([row[k] for k in keys], device=self.strategy.device)
            )
            row = {k: float(v) / world for k, v in zip(keys, t.tolist())}
        row.update(
            lr=lr,
            grad_norm=grad_norm,
            samples_per_s=samples * world / max(dt, 1e-9),
            skipped_steps=self.bad_total,
        )
        if self.tokens_per_batch is not None:
            row["tokens_per_s"] = self._tokens_window * world / max(dt, 1e-9)
            self._tokens_window = 0
        if flops and self.peak_tflops:
            achieved = flops / max(dt, 1e-9) / 1e12
            row.update(tflops_per_device=achieved, mfu=achieved / self.peak_tflops)
        skipped = getattr(self.data, "skipped", None)
        if skipped:
            for k, v in dict(skipped).items():
                t = self.strategy.all_reduce_sum(torch.tensor([float(v)], device=self.strategy.device))
                row[f"skipped_{k}"] = int(t.item())
        self.sink.log(self.step, row)
        return row


def _count_samples(batch: Any) -> int:
    if isinstance(batch, dict):
        if "image" in batch and isinstance(batch["image"], torch.Tensor):
            return int(batch["image"].shape[0])
        if "text" in batch and isinstance(batch["text"], torch.Tensor):
            return int(batch["text"].shape[0])
        nested = [v for v in batch.values() if isinstance(v, dict)]
        if nested:
            return sum(_count_samples(v) for v in nested)
        tensors = [v for v in batch.values() if isinstance(v, torch.Tensor) and v.ndim > 0]
        return int(tensors[0].shape[0]) if tensors else 0
    return 0


class _NullBar:
    def update(self, n: int) -> None: ...
    def set_postfix(self, **kw) -> None: ...
    def close(self) -> None: ...


def _progress(enabled: bool, start: int, total: int):
    if not enabled:
        return _NullBar()
    from tqdm import tqdm

    return tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True)
