"""Typed configs: defaults < YAML < flags; unknown keys and bad values fail with a clear message."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import pytest

from pipeline.core.config import ConfigError, config_hash, from_dict, opt, parse_config, require


@dataclass(kw_only=True)
class DemoConfig:
    target: str = opt("", "target model directory")
    max_new_tokens: int = opt(512, "tokens generated per turn")
    temperature: float = opt(0.0, "sampling temperature")
    device: Literal["cpu", "cuda"] = opt("cpu", "where the model runs")
    server: list[str] = opt([], "vLLM server URLs", repeatable=True)
    shard_index: int | None = opt(None, "shard to run")
    quiet: bool = opt(False, "less output")

    def __post_init__(self) -> None:
        require(self.max_new_tokens > 0, f"max_new_tokens must be > 0, got {self.max_new_tokens}")


def parse(argv):
    return parse_config(DemoConfig, argv, prog="demo", description="demo", section="demo")


def test_precedence_defaults_yaml_flags(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("demo:\n  max_new_tokens: 64\n  temperature: 0.5\n  server: [http://a:1]\nother: {x: 1}\n")
    cfg = parse(["--config", str(cfg_file), "--temperature", "0.7", "--quiet"])
    assert cfg.max_new_tokens == 64 and cfg.temperature == 0.7 and cfg.quiet is True
    assert cfg.server == ["http://a:1"] and cfg.device == "cpu" and cfg.shard_index is None
    cfg = parse(["--server", "http://a:1", "--server", "http://b:2", "--shard-index", "3"])
    assert cfg.server == ["http://a:1", "http://b:2"] and cfg.shard_index == 3


def test_flat_yaml_and_unknown_key(tmp_path, capsys):
    flat = tmp_path / "flat.yaml"
    flat.write_text("max_new_tokens: 8\n")
    assert parse(["--config", str(flat)]).max_new_tokens == 8
    other = tmp_path / "other.yaml"  # a pipeline file without this stage's section: defaults
    other.write_text("workdir: w\ntrain: {lr: 1}\n")
    assert parse(["--config", str(other)]).max_new_tokens == 512
    bad = tmp_path / "bad.yaml"
    bad.write_text("max_new_tokenz: 8\n")
    with pytest.raises(SystemExit):
        parse(["--config", str(bad)])
    err = capsys.readouterr().err
    assert "unknown option 'max_new_tokenz'" in err and str(bad) in err


@pytest.mark.parametrize("values,message", [
    ({"max_new_tokens": "many"}, "expected an integer"),
    ({"max_new_tokens": 1.5}, "expected an integer"),
    ({"max_new_tokens": 0}, "must be > 0"),
    ({"device": "tpu"}, "not one of"),
    ({"quiet": "maybe"}, "expected true or false"),
])
def test_bad_values(values, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(DemoConfig, values, "x.yaml")


def test_hash_changes_with_values():
    a = from_dict(DemoConfig, {}, "-")
    b = from_dict(DemoConfig, {"max_new_tokens": 7}, "-")
    assert config_hash(a) != config_hash(b)
    assert config_hash(a, exclude=("max_new_tokens",)) == config_hash(b, exclude=("max_new_tokens",))
