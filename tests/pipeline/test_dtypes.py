"""One dtype spelling (fp32/bf16/fp16): old long names still read, with a warning naming the new one."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import warnings
from pathlib import Path

import pytest
import yaml

from pipeline.core.config import ConfigError, config_hash, from_dict
from pipeline.core.dtypes import DTYPES, from_engine, long_name, parse_dtype
from stages.dump import DumpConfig
from stages.regenerate import RegenerateConfig

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.mark.parametrize(("old", "new"), [("float32", "fp32"), ("bfloat16", "bf16"), ("float16", "fp16")])
def test_old_spelling_is_read_with_a_warning_naming_the_new_one(old, new):
    with pytest.warns(FutureWarning, match=f"write '{new}'"):
        cfg = from_dict(RegenerateConfig, {"target": "t", "input": "i", "output": "o", "dtype": old}, "run.yaml")
    assert cfg.dtype == new and long_name(new) == old and from_engine(f"torch.{old}") == new


def test_a_stage_1_run_of_the_long_spelling_release_keeps_its_config_hash():
    """Stage 1's manifest hashes its config (dtype included): a run begun as ``dtype: float32`` must
    resume under ``fp32``, so the hash is computed from the long name, as that release did."""
    from stages.regenerate import RUNTIME_OPTIONS

    values = {"target": "t", "input": "i", "output": "o", "dtype": "fp32"}
    cfg = from_dict(RegenerateConfig, values, "run.yaml")
    old = {k: ("float32" if k == "dtype" else v) for k, v in dataclasses.asdict(cfg).items() if k not in RUNTIME_OPTIONS}
    assert config_hash(cfg, exclude=RUNTIME_OPTIONS) == hashlib.sha256(
        json.dumps(old, sort_keys=True, default=str).encode()).hexdigest()[:16]


def test_new_spelling_is_silent_and_outside_choices_fail_naming_file_and_key():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert [parse_dtype(d, "x") for d in DTYPES] == list(DTYPES)
    with pytest.raises(ConfigError, match=r"dump\.yaml: dtype: dtype 'fp16' is not one of \['bf16', 'fp32'\]"):
        from_dict(DumpConfig, {"target": "t", "input": "i", "store": "s", "dtype": "fp16"}, "dump.yaml")


def _dtype_values(node):
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("dtype", "precision"):
                yield value
            yield from _dtype_values(value)


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_use_the_one_spelling(path):
    values = list(_dtype_values(yaml.safe_load(path.read_text())))
    assert all(v in (*DTYPES, "auto") for v in values), f"{path.name}: {values}"
