"""Run under torchrun by tests/test_dist_paths.py: several distributed jobs in the same two processes.

``python tests/dist_paths_worker.py PLAN.json``; the plan is a list of ``[port, job, *args]`` run in
order. Each job opens and closes its own process group, as the commands do, on a store of its own at
``port``: re-creating the default group on torchrun's agent store reuses the old group's keys (torch
restarts the group numbering after ``destroy_process_group``) and hangs now and then.

- ``["vqkd", OUT, *overrides]``: ``train_tokenizer`` on configs/tokenizer/vqkd_demo.yaml; every
  quantizer update (vectors, codes, codebook before/after, restarts) and the final tokenizer state of
  this rank go to ``OUT/rank<r>.pt``;
- ``["codes", OUT, *overrides]``: ``mdm pretrain``'s build path on configs/pretrain/test_tiny.yaml; the
  tokenizer input and the visual-token targets of every step go to ``OUT/rank<r>.pt``;
- ``["cli", *argv]``: ``mdm.cli.main(argv)``, which must return 0.
"""

import json
import os
import sys
from pathlib import Path

import torch

RANK = int(os.environ.get("RANK", 0))


def vqkd(out: str, *overrides: str) -> None:
    import mdm.tokenizers.train as T
    from mdm.config import load_config
    from mdm.tokenizers.config import TokenizerTrainConfig
    from mdm.tokenizers.quantizer import NormEMAQuantizer

    updates, built = [], []
    ema_update, build = NormEMAQuantizer._ema_update, T.build_for_training

    def recording_update(self, flat, codes, generator):
        before = {k: v.clone() for k, v in self.state_dict().items()}
        ema_update(self, flat, codes, generator)
        updates.append(
            {"flat": flat.clone(), "codes": codes.clone(), "before": before, "after": self.codebook.clone(),
             "restarts": self.last_restarts if int(self.steps) % self.restart_every == 0 else 0}
        )  # fmt: skip

    def keeping_build(*args, **kwargs):
        tok, teacher = build(*args, **kwargs)
        built.append(tok)
        return tok, teacher

    NormEMAQuantizer._ema_update, T.build_for_training = recording_update, keeping_build
    cfg = load_config(TokenizerTrainConfig, "configs/tokenizer/vqkd_demo.yaml", list(overrides))
    T.train_tokenizer(cfg, progress=False)
    NormEMAQuantizer._ema_update, T.build_for_training = ema_update, build
    Path(out).mkdir(parents=True, exist_ok=True)
    torch.save({"updates": updates, "state": built[0].state_dict()}, Path(out) / f"rank{RANK}.pt")


def codes(out: str, *overrides: str) -> None:
    from mdm.config import load_config
    from mdm.train.pretrain import PretrainConfig, build_run

    cfg = load_config(PretrainConfig, "configs/pretrain/test_tiny.yaml", list(overrides))
    trainer = build_run(cfg)
    prepare, seen = trainer.prepare, []

    def recording(batches):
        batches = prepare(batches)
        seen.append(
            {k: (b["tokenizer_image"].clone(), b["image_tokens"].clone()) for k, b in batches.items()
             if isinstance(b, dict) and b.get("image_tokens") is not None}
        )  # fmt: skip
        return batches

    trainer.prepare = recording
    trainer.fit()
    Path(out).mkdir(parents=True, exist_ok=True)
    torch.save(seen, Path(out) / f"rank{RANK}.pt")
    trainer.strategy.close()


def cli(*argv: str) -> None:
    from mdm.cli import main

    code = main(list(argv))
    if code != 0:
        raise SystemExit(f"mdm {' '.join(argv)}: exit {code}")


if __name__ == "__main__":
    torch.set_num_threads(1)
    jobs = {"vqkd": vqkd, "codes": codes, "cli": cli}
    for port, job, *args in json.loads(Path(sys.argv[1]).read_text()):
        os.environ.update(MASTER_PORT=str(port), TORCHELASTIC_USE_AGENT_STORE="False")
        jobs[job](*args)
    import torch.distributed as dist

    if dist.is_initialized():  # left open by mdm evaluate / predict
        dist.destroy_process_group()
