"""The scripts in ``launch/`` start real process groups on localhost (loopback only, gloo, CPU).

``MDM`` is replaced by a small program that joins the process group, all-reduces and records its rank,
world size and the arguments it received, so the test checks the launchers themselves: rendezvous
across "nodes", environment, and that ``<command> --config ... overrides`` arrive unchanged.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT, free_port

pytestmark = pytest.mark.dist

WORKER = """
import json, os, sys
import torch, torch.distributed as dist
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
total = torch.tensor([float(rank + 1)])
dist.all_reduce(total)
names = [None] * world
dist.all_gather_object(names, os.environ.get("GROUP_RANK", "?"))
with open(os.path.join(os.environ["OUT_DIR"], f"rank{rank}.json"), "w") as f:
    json.dump({"rank": rank, "world": world, "sum": total.item(), "argv": sys.argv[1:], "nodes": names}, f)
dist.destroy_process_group()
"""
ARGS = ["pretrain", "--config", "configs/x.yaml", "model.depth=2", "optim.lr=1e-4"]


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    env = dict(os.environ, OUT_DIR=str(tmp_path), OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    env.update(MDM=f"{sys.executable} {worker}", TORCHRUN=f"{sys.executable} -m torch.distributed.run")
    env.update(extra)
    return env


def _results(tmp_path: Path, world: int) -> list[dict]:
    out = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]
    for r, rec in enumerate(out):
        assert rec["rank"] == r and rec["world"] == world
        assert rec["sum"] == world * (world + 1) / 2  # every rank took part in the all-reduce
        assert rec["argv"] == ARGS
    return out


def _wait(procs: list[subprocess.Popen], timeout: int = 120) -> None:
    for p in procs:
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        assert p.returncode == 0, f"launcher failed ({p.returncode}):\n{out[-3000:]}\n{err[-3000:]}"


def test_torchrun_two_nodes_on_localhost(tmp_path):
    """Two `launch/torchrun.sh` invocations (NODE_RANK 0 and 1, one process each) form one group."""
    port = str(free_port())
    procs = [
        subprocess.Popen(
            [str(ROOT / "launch" / "torchrun.sh"), *ARGS],
            env=_env(
                tmp_path,
                NNODES="2",
                NODE_RANK=str(rank),
                NPROC_PER_NODE="1",
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=port,
            ),  # fmt: skip
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for rank in (0, 1)
    ]
    _wait(procs)
    results = _results(tmp_path, 2)
    assert sorted(results[0]["nodes"]) == ["0", "1"]  # the two processes ran on different "nodes"


def _stub(path: Path, body: str) -> None:
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def test_slurm_template_two_nodes_with_c10d_rendezvous(tmp_path):
    """`launch/slurm.sbatch` under stand-ins for srun/scontrol: srun starts one torchrun per "node"
    (SLURM_NNODES copies), which meet at the c10d rendezvous on the head node."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _stub(bin_dir / "scontrol", "echo 127.0.0.1\necho 127.0.0.2\n")
    # drop srun's own options, then run the task once per node in parallel, like srun --ntasks-per-node=1
    _stub(bin_dir / "srun", 'while [[ "$1" == --* ]]; do shift; done\n'
          'for i in $(seq 1 "$SLURM_NNODES"); do "$@" & done\n'
          'status=0; for job in $(jobs -p); do wait "$job" || status=1; done; exit $status\n')  # fmt: skip
    env = _env(
        tmp_path, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_NODELIST="node[1-2]", SLURM_NNODES="2",
        SLURM_JOB_ID="4242", GPUS_PER_NODE="1", RDZV_PORT=str(free_port()),
    )  # fmt: skip
    proc = subprocess.Popen(
        ["bash", str(ROOT / "launch" / "slurm.sbatch"), *ARGS],
        env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    _wait([proc])
    results = _results(tmp_path, 2)
    assert sorted(results[0]["nodes"]) == ["0", "1"]


@pytest.mark.slow
def test_deepspeed_launcher_with_hostfile(tmp_path):
    """`launch/deepspeed.sh` with a one-host hostfile (2 slots) runs 2 ranks through deepspeed's runner."""
    pytest.importorskip("deepspeed")
    hostfile = tmp_path / "hosts"
    hostfile.write_text("localhost slots=2\n")
    deepspeed = Path(sys.executable).parent / "deepspeed"
    if not deepspeed.exists():
        pytest.skip("the deepspeed launcher script is not installed next to this Python")
    env = _env(
        tmp_path, HOSTFILE=str(hostfile), DEEPSPEED=str(deepspeed), MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()), DS_ARGS="--no_ssh_check", DS_ACCELERATOR="cpu",
        PATH=f"{deepspeed.parent}:{os.environ['PATH']}",
    )  # fmt: skip
    proc = subprocess.Popen(
        [str(ROOT / "launch" / "deepspeed.sh"), *ARGS],
        env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    _wait([proc])
    _results(tmp_path, 2)


def test_scripts_print_usage():
    for script in ("torchrun.sh", "deepspeed.sh"):
        out = subprocess.run(
            [str(ROOT / "launch" / script), "--help"], capture_output=True, text=True, check=True
        )
        assert "pretrain|finetune" in out.stdout


@pytest.mark.slow
def test_torchrun_two_nodes_runs_a_tiny_mdm_pretrain(tmp_path):
    """The real command: `mdm pretrain` on tiny shards, 2 "nodes" × 1 process through launch/torchrun.sh."""
    from tests.pretrain_fixtures import build_world, pretrain_overrides

    world = build_world(tmp_path / "world")
    out = tmp_path / "run"
    args = [
        "pretrain",
        "--config",
        "configs/pretrain/test_tiny.yaml",
        *pretrain_overrides(world, out, steps=2),
    ]
    args += ["train.ckpt_every=0", "distributed.strategy=ddp", "logging.every=1"]
    port = str(free_port())
    procs = [
        subprocess.Popen(
            [str(ROOT / "launch" / "torchrun.sh"), *args],
            env=_env(
                tmp_path,
                MDM=f"{sys.executable} -m mdm.cli",
                NNODES="2",
                NODE_RANK=str(rank),
                NPROC_PER_NODE="1",
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=port,
            ),  # fmt: skip
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for rank in (0, 1)
    ]
    _wait(procs, timeout=300)
    meta = json.loads((out / "checkpoints" / "step-00000002" / "meta.json").read_text())
    assert meta["world_size"] == 2 and meta["strategy"] == "ddp"
    assert (out / "model" / "model.safetensors").is_file()
