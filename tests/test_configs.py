"""Config machinery: strict loading, helpful errors, overrides, presets — and every shipped YAML loads."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from mdm.config import ConfigError, dump_yaml, from_dict, load_config, parse_overrides
from mdm.models import ModelConfig, list_models
from mdm.registry import Registry

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Inner:
    depth: int = 2
    rate: float = 0.1
    mode: Literal["a", "b"] = "a"


@dataclass
class Outer:
    name: str = "x"
    inner: Inner = field(default_factory=Inner)
    tags: list[str] = field(default_factory=list)
    betas: tuple[float, float] = (0.9, 0.99)
    extra: dict[str, int] = field(default_factory=dict)
    maybe: int | None = None


def _write(tmp_path, text, name="c.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_unknown_key_names_key_file_and_closest(tmp_path):
    p = _write(tmp_path, "inner:\n  deptth: 3\n")
    with pytest.raises(ConfigError) as e:
        load_config(Outer, p)
    msg = str(e.value)
    assert "inner.deptth" in msg and str(p) in msg and "did you mean 'inner.depth'" in msg


def test_override_unknown_key_is_reported_as_command_line():
    with pytest.raises(
        ConfigError, match=r"command line: unknown key 'inner\.rat'; did you mean 'inner\.rate'"
    ):
        load_config(Outer, None, ["inner.rat=0.5"])


def test_types_are_checked_and_coerced(tmp_path):
    cfg = load_config(
        Outer,
        None,
        ["inner.depth=4", "inner.rate=1e-4", "tags=[a,b]", "betas=[0.8,0.9]", "extra.k=3", "maybe=null"],
    )
    assert cfg.inner.depth == 4 and cfg.inner.rate == pytest.approx(1e-4) and cfg.tags == ["a", "b"]
    assert cfg.betas == (0.8, 0.9) and cfg.extra == {"k": 3} and cfg.maybe is None
    with pytest.raises(ConfigError, match="expected an integer"):
        load_config(Outer, None, ["inner.depth=two"])
    with pytest.raises(ConfigError, match="not one of"):
        load_config(Outer, None, ["inner.mode=c"])
    with pytest.raises(ConfigError, match="is a value, not a section"):
        load_config(Outer, None, ["name.x=1"])


def test_extends_merges_mappings(tmp_path):
    _write(tmp_path, "name: base\ninner:\n  depth: 7\n  rate: 0.5\n", "base.yaml")
    p = _write(tmp_path, "extends: base.yaml\ninner:\n  rate: 0.25\n")
    cfg = load_config(Outer, p)
    assert (cfg.name, cfg.inner.depth, cfg.inner.rate) == ("base", 7, 0.25)


def test_round_trip_through_yaml(tmp_path):
    cfg = load_config(Outer, None, ["inner.depth=5", "tags=[q]"])
    p = _write(tmp_path, dump_yaml(cfg))
    assert load_config(Outer, p) == cfg


def test_model_config_starts_from_its_preset():
    cfg = from_dict(ModelConfig, {"arch": "beit3_base", "depth": 4})
    assert (cfg.embed_dim, cfg.depth, cfg.shared_attention, cfg.subln) == (768, 4, False, True)
    cfg = from_dict(ModelConfig, {"arch": "vlmo_large"})
    assert (cfg.embed_dim, cfg.depth, cfg.vl_ffn_layers) == (1024, 24, 3)
    with pytest.raises(KeyError, match="beit3_base"):
        from_dict(ModelConfig, {"arch": "beit3_bse"})
    with pytest.raises(ConfigError, match="not divisible"):
        from_dict(ModelConfig, {"arch": "vlmo_tiny", "num_heads": 3})


def test_parse_overrides_nested():
    assert parse_overrides(["a.b.c=1", "a.d=x"]) == {"a": {"b": {"c": 1}, "d": "x"}}
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["nokey"])


def test_registry_suggests_names():
    reg: Registry = Registry("thing")
    reg.register("alpha")(object)
    with pytest.raises(KeyError, match="did you mean 'alpha'"):
        reg.get("alpah")
    assert list_models()  # model registry is populated


def _schema_for(path: Path):
    """The schema a shipped config is written for, from its folder."""
    import importlib

    schemas = {
        "model": ("mdm.models.config", "ModelConfig"),
        "pretrain": ("mdm.train.pretrain", "PretrainConfig"),
        "finetune": ("mdm.tasks.config", "FinetuneConfig"),
        "tokenizer": ("mdm.tokenizers.config", "TokenizerTrainConfig"),
    }
    mod, name = schemas[path.parent.name]
    return getattr(importlib.import_module(mod), name)


SHIPPED = sorted(p for p in (ROOT / "configs").rglob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=[str(p.relative_to(ROOT)) for p in SHIPPED])
def test_every_shipped_config_loads(path):
    text = path.read_text()
    assert text.startswith("#") and "mdm " in text.splitlines()[0], "first line must show the command"
    load_config(_schema_for(path), path)
