"""DeepSpeed ZeRO stages 0–3 behind the :class:`~mdm.distributed.strategy.Strategy` interface.

The DeepSpeed JSON is generated from the typed :class:`DistributedConfig` and the training config —
never hand-written — so batch sizes, clipping and precision cannot disagree with the rest of the run.
The optimizer is mdm's own ``torch.optim.AdamW`` passed as a client optimizer (no compiled DeepSpeed
ops are needed, which keeps CPU runs working). Frozen modules (the visual tokenizer) are never given
to DeepSpeed, so ZeRO-3 does not partition them — and DeepSpeed may not change how they compute:
ZeRO-3's ``memory_efficient_linear`` (on by default) swaps ``torch.nn.functional.linear`` for a
``matmul`` + ``bias`` version in the whole process, which rounds differently from the fused ``addmm``
and flipped near-tied VQ-KD codes between DDP and ZeRO-3 runs; mdm turns it off and keeps torch's.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from torch import nn

from mdm.distributed.strategy import (
    DistributedConfig,
    Strategy,
    group_lr,
    init_process_group,
    use_fused_adamw,
)

log = logging.getLogger(__name__)

DS_TAG = "deepspeed"
#: client-state key of a DeepSpeed checkpoint listing the 0-dim parameters saved as (1,)
SCALARS_KEY = "mdm_scalar_parameters"


def deepspeed_config(
    cfg: DistributedConfig, micro_batch: int, grad_accum: int, world_size: int, clip_grad: float, cpu: bool
) -> dict[str, Any]:
    """The DeepSpeed config dict for a run.

    Args:
        cfg: distributed settings (ZeRO stage, precision, buckets).
        micro_batch: samples per process per micro-step (of the largest stream).
        grad_accum: micro-steps per optimizer step.
        world_size: number of processes.
        clip_grad: max gradient norm (0 = off).
        cpu: running on CPU, where only fp32 is used.
    """
    zero: dict[str, Any] = {
        "stage": cfg.zero_stage,
        "reduce_bucket_size": cfg.reduce_bucket_size,
        "allgather_bucket_size": cfg.reduce_bucket_size,
        "overlap_comm": not cpu,
        "contiguous_gradients": True,
    }
    if cfg.zero_stage == 3:
        zero.update(
            stage3_param_persistence_threshold=10_000,
            stage3_gather_16bit_weights_on_model_save=True,
            # True (DeepSpeed's default) replaces torch.nn.functional.linear for the whole process, and
            # so also changes the rounding of the frozen visual tokenizer, which is no part of the engine
            memory_efficient_linear=False,
        )
    if cfg.offload_optimizer and cfg.zero_stage > 0:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": not cpu}
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_batch * grad_accum * world_size,
        "gradient_clipping": clip_grad if clip_grad > 0 else 0.0,
        "zero_optimization": zero,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
    }
    precision = "fp32" if cpu else cfg.precision
    if precision == "fp16":
        ds["fp16"] = {
            "enabled": True,
            "loss_scale": 0,  # dynamic
            "initial_scale_power": cfg.initial_scale_power,
            "loss_scale_window": 1000,
            "hysteresis": 2,
            "min_loss_scale": 1,
        }
    elif precision == "bf16":
        ds["bf16"] = {"enabled": True}
    ds.update(cfg.extra_deepspeed)
    return ds


def promote_scalar_parameters(model: nn.Module) -> list[str]:
    """Makes 0-dim parameters 1-element vectors, keeping their 0-dim form in state dicts.

    DeepSpeed (0.19) broadcasts every parameter at ``initialize`` as ``p.data.view(torch.uint8)``, which
    fails for a 0-dim tensor — such as the learnable temperature ``logit_scale`` of retrieval and ITC.
    While DeepSpeed holds the model those parameters have shape (1,) (the code using them broadcasts
    either way); a state-dict hook turns them back into 0-dim tensors and a load pre-hook accepts both
    forms, so checkpoints, exports and unilm names keep their shapes.

    Returns:
        the names of the promoted parameters.
    """
    names = [n for n, p in model.named_parameters() if p.dim() == 0]
    if not names:
        return names
    for n in names:
        param = model.get_parameter(n)
        param.data = param.data.reshape(1)

    def to_scalar(module, state_dict, prefix, local_metadata):
        for n in names:
            value = state_dict.get(prefix + n)
            if value is not None and value.shape == (1,):
                state_dict[prefix + n] = value.reshape(())

    def from_scalar(module, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        for n in names:
            value = state_dict.get(prefix + n)
            if value is not None and value.dim() == 0:
                state_dict[prefix + n] = value.reshape(1)

    model.register_state_dict_post_hook(to_scalar)
    model.register_load_state_dict_pre_hook(from_scalar)
    log.info("0-dim parameters held as (1,) for DeepSpeed: %s", ", ".join(names))
    return names


class DeepSpeedStrategy(Strategy):
    """Runs the model through ``deepspeed.initialize``."""

    name = "deepspeed"

    def __init__(self, cfg: DistributedConfig) -> None:
        super().__init__(cfg)
        self.engine = None
        self._scalars: set[str] = set()

    def setup(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> nn.Module:
        import deepspeed

        init_process_group(self.cfg, self.device)
        if not torch.distributed.is_initialized():
            deepspeed.init_distributed(dist_backend="gloo" if self.device.type == "cpu" else "nccl")
        ds_cfg = deepspeed_config(
            self.cfg,
            self.micro_batch,
            self.grad_accum,
            self.world_size,
            self.clip_grad,
            self.device.type == "cpu",
        )
        self.ds_config = ds_cfg
        self._scalars = set(promote_scalar_parameters(model))
        if self.precision.fused_adamw:
            use_fused_adamw(optimizer)
        linear = torch.nn.functional.linear
        engine, ds_opt, _, _ = deepspeed.initialize(
            model=model.to(self.device), optimizer=optimizer, config=ds_cfg
        )
        if torch.nn.functional.linear is not linear:  # memory_efficient_linear forced on (extra_deepspeed)
            torch.nn.functional.linear = linear
            log.warning(
                "DeepSpeed replaced torch.nn.functional.linear process-wide (zero_optimization."
                "memory_efficient_linear); restored it, so that modules outside the engine (the frozen "
                "visual tokenizer) compute as under any other strategy"
            )
        self.engine = engine
        self.model = engine
        self.optimizer = ds_opt
        self._raw = engine.module
        return engine

    @property
    def module(self) -> nn.Module:
        return self._raw

    def autocast(self):
        # DeepSpeed casts the weights to fp16/bf16 itself; autocast casts the fp32 inputs (pixels) for
        # the matmuls and convolutions and keeps the norms and softmax in fp32.
        if self.amp_dtype is None:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)
        if not self.engine.is_gradient_accumulation_boundary():
            self.engine.step()

    def clip_and_step(self, max_norm: float) -> float:
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def zero_grad(self) -> None:
        self.engine.zero_grad()

    def set_lr(self, lr: float, step: int = 0) -> None:
        for g in self.engine.optimizer.param_groups:
            g["lr"] = group_lr(g, lr, step)

    def close(self) -> None:
        """Tears the process group down through ``deepspeed.comm``, which also drops the groups DeepSpeed
        cached (a later engine in the same process would otherwise be handed a destroyed group)."""
        if self.engine is None or not torch.distributed.is_initialized():
            return super().close()
        import deepspeed.comm

        torch.distributed.barrier()
        deepspeed.comm.destroy_process_group()

    def save(self, directory: str) -> None:
        # DeepSpeed records the shapes it holds, (1,) for promoted scalars: say which, for consolidation
        self.engine.save_checkpoint(directory, tag=DS_TAG, client_state={SCALARS_KEY: sorted(self._scalars)})

    def load(self, directory: str) -> None:
        path, _ = self.engine.load_checkpoint(directory, tag=DS_TAG)
        if path is None:
            raise FileNotFoundError(f"{directory}: no DeepSpeed checkpoint (tag {DS_TAG!r})")

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Gathers ZeRO-3 partitions (every rank must call this); other stages hold full weights."""
        if self.cfg.zero_stage < 3:
            return {k: v.detach().float().cpu() for k, v in self.module.state_dict().items()}
        import deepspeed

        out: dict[str, torch.Tensor] = {}
        for name, p in self.module.named_parameters():
            with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                out[name] = p.detach().float().cpu().clone()
            if name in self._scalars:  # held as (1,) for DeepSpeed (promote_scalar_parameters)
                out[name] = out[name].reshape(())
        for name, b in self.module.named_buffers():
            out[name] = b.detach().cpu().clone()
        return out


def consolidate_zero_checkpoint(checkpoint_dir: str) -> dict[str, torch.Tensor]:
    """fp32 state dict from a (ZeRO-2/3) DeepSpeed checkpoint directory written by mdm, in one process."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    if not os.path.isdir(os.path.join(checkpoint_dir, DS_TAG)):
        raise FileNotFoundError(f"{checkpoint_dir}: not a DeepSpeed checkpoint written by mdm (no {DS_TAG}/)")
    sd = get_fp32_state_dict_from_zero_checkpoint(checkpoint_dir, tag=DS_TAG)
    sd = {k: v.float() for k, v in sd.items()}
    for name in _scalar_parameters(checkpoint_dir):  # back to the model's own 0-dim shape
        if name in sd and sd[name].shape == (1,):
            sd[name] = sd[name].reshape(())
    return sd


def _scalar_parameters(checkpoint_dir: str) -> list[str]:
    """Names of the 0-dim parameters that :func:`promote_scalar_parameters` held as (1,) when the
    checkpoint was written (from its client state; empty for checkpoints written before it was recorded)."""
    import glob

    files = sorted(glob.glob(os.path.join(checkpoint_dir, DS_TAG, "*model_states.pt")))
    if not files:
        return []
    state = torch.load(files[0], map_location="cpu", mmap=True, weights_only=False)
    return list(state.get(SCALARS_KEY, []))
