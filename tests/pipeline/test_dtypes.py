"""One dtype spelling (fp32/bf16/fp16): old long names still read, with a warning naming the new one."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import yaml

from pipeline.core.config import ConfigError, from_dict
from pipeline.core.dtypes import DTYPES, from_engine, long_name, parse_dtype
from stages.dump import DumpConfig
from stages.regenerate import RegenerateConfig

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.mark.parametrize(("old", "new"), [("float32", "fp32"), ("bfloat16", "bf16"), ("float16", "fp16")])
def test_old_spelling_is_read_with_a_warning_naming_the_new_one(old, new):
    with pytest.warns(FutureWarning, match=f"write '{new}'"):
        cfg = from_dict(RegenerateConfig, {"target": "t", "input": "i", "output": "o", "dtype": old}, "run.yaml")
    assert cfg.dtype == new and long_name(new) == old and from_engine(f"torch.{old}") == new


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
