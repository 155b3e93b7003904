"""The Python API as people type it: ``import mdm`` is fast and loads no torch; sub-packages and the
top-level shortcuts are attributes that import on first use. Checked in fresh interpreters, so that
nothing imported by the test session makes an attribute exist by accident."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMPORT_BOUND_S = 1.0  # the bound on this machine (2 shared cores)


def _python(code: str, *flags: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, *flags, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=300,
    )


def _import_time_us(stderr: str, module: str) -> int:
    """Cumulative microseconds of ``module`` in ``-X importtime`` output."""
    for line in stderr.splitlines():
        parts = [p.strip() for p in line.removeprefix("import time:").split("|")]
        if len(parts) == 3 and parts[2] == module:
            return int(parts[1])
    raise AssertionError(f"{module} not in -X importtime output:\n{stderr[-2000:]}")


def test_import_mdm_is_fast_and_lazy():
    code = """
        import sys, time
        t = time.perf_counter()
        import mdm
        wall = time.perf_counter() - t
        heavy = sorted(m for m in ("torch", "numpy", "webdataset", "mdm.models", "mdm.data") if m in sys.modules)
        print(wall, *heavy)
    """
    out = _python(code, "-X", "importtime")
    assert out.returncode == 0, out.stderr
    wall, *heavy = out.stdout.split()
    assert heavy == [], f"import mdm imported {heavy}"
    cumulative_s = _import_time_us(out.stderr, "mdm") / 1e6
    # a quarter of the bound: a loaded machine must not make this flaky, a torch import (~1 s) still fails it
    assert cumulative_s < IMPORT_BOUND_S / 4 and float(wall) < IMPORT_BOUND_S / 4, (cumulative_s, wall)


def test_the_public_names_resolve_in_a_fresh_interpreter(tmp_path):
    code = f"""
        import json, sys
        import mdm

        out = {{"all": sorted(mdm.__all__), "dir": dir(mdm)}}
        out["list_models"] = mdm.models.list_models()
        out["same_list"] = mdm.list_models() == mdm.models.list_models()
        out["torch_after_models"] = "torch" in sys.modules
        model = mdm.create_model("vlmo_tiny", depth=1)
        mdm.save_pretrained(model, {str(tmp_path / "m")!r})
        loaded = mdm.from_pretrained({str(tmp_path / "m")!r})
        out["round_trip"] = all(
            (a == b).all().item() for a, b in zip(model.state_dict().values(), loaded.state_dict().values())
        )
        out["resolved"] = {{name: type(getattr(mdm, name)).__name__ for name in mdm.__all__}}
        out["deep"] = [
            callable(mdm.tokenizers.load),
            callable(mdm.train.pretrain.main),
            callable(mdm.train.consolidate.main),
            callable(mdm.data.streams.build_pretrain_stream),
            callable(mdm.data.shard_reader.iter_tar_samples),
            callable(mdm.export.unilm.mdm_to_torchscale),
            callable(mdm.launch.cli.main),
            callable(mdm.tasks.build_task),
            callable(mdm.objectives.build_pretrain_model),
            callable(mdm.distributed.build_strategy),
            callable(mdm.config.load_config),
            mdm.load_config is mdm.config.load_config,
            mdm.from_pretrained is mdm.models.io.from_pretrained,
        ]
        from pathlib import Path
        out["modules"] = {{}}  # every module of these packages, found without a list to keep up to date
        for pkg in ("data", "export", "launch", "train"):
            files = Path(getattr(mdm, pkg).__path__[0]).glob("*.py")
            stems = [f.stem for f in files if not f.stem.startswith("_")]
            out["modules"][pkg] = sorted(type(getattr(getattr(mdm, pkg), s)).__name__ for s in stems)
        try:
            mdm.modles
        except AttributeError as e:
            out["typo"] = str(e)
        print(json.dumps(out))
    """
    run = _python(code)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.splitlines()[-1])
    subpackages = {"config", "data", "distributed", "export", "launch", "models", "objectives", "registry",
                   "tasks", "tokenizers", "train"}  # fmt: skip
    shortcuts = {"create_model", "list_models", "from_pretrained", "save_pretrained", "load_config"}
    assert set(out["all"]) == {"__version__"} | subpackages | shortcuts
    assert set(out["all"]) <= set(out["dir"])
    assert "vlmo_tiny" in out["list_models"] and out["same_list"] and out["torch_after_models"]
    assert out["round_trip"]
    assert {n for n, t in out["resolved"].items() if t == "module"} == subpackages
    assert all(out["resolved"][n] == "function" for n in shortcuts)
    assert all(out["deep"]), out["deep"]
    assert all(kinds and set(kinds) == {"module"} for kinds in out["modules"].values()), out["modules"]
    assert out["typo"] == "module 'mdm' has no attribute 'modles'; did you mean mdm.models?"
