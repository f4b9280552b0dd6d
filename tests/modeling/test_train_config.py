"""TrainConfig's sections: flat and sectioned YAML, flat flags, draft_config as a mapping, and the
run identity of a flat run directory of an earlier release."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import pytest

from modeling.training.config import RESUMABLE_CHANGES, TrainConfig
from modeling.training.setup import TrainSetupError, check_run_dir
from pipeline.core.config import ConfigError, from_dict, leaf_values, parse_config

FLAT = {"store": "s", "target": "t", "output": "o", "lr": 0.002, "zero_stage": 3, "draft_vocab_size": 64,
        "draft_config": {"intermediate_size": 96}}
SECTIONED = {"data": {"store": "s", "target": "t"}, "checkpointing": {"output": "o"}, "optimizer": {"lr": 0.002},
             "launch": {"zero_stage": 3}, "draft": {"draft_vocab_size": 64, "draft_config": {"intermediate_size": 96}}}


def parse(argv, tmp_path=None, yaml_text=None):
    if yaml_text is not None:
        (tmp_path / "train.yaml").write_text(yaml_text)
        argv = ["--config", str(tmp_path / "train.yaml"), *argv]
    return parse_config(TrainConfig, argv, prog="train", description="", section="train")


def old_identity(flat: dict) -> str:
    """The identity an earlier release (flat TrainConfig, draft_config a JSON string) computed."""
    values = {k: v for k, v in flat.items() if k not in RESUMABLE_CHANGES}
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:16]


def test_flat_sectioned_and_flags_build_the_same_config(tmp_path):
    flat, nested = from_dict(TrainConfig, FLAT, "flat"), from_dict(TrainConfig, SECTIONED, "sectioned")
    flags = parse(["--store", "s", "--target", "t", "--output", "o", "--lr", "0.002", "--zero-stage", "3",
                   "--draft-vocab-size", "64", "--draft-config", '{"intermediate_size": 96}'])
    assert flat == nested == flags and flat.optimizer.lr == 0.002 and flat.draft.draft_config == {"intermediate_size": 96}
    assert flat.identity() == nested.identity() == flags.identity()
    assert from_dict(TrainConfig, {**FLAT, "lr": 0.003}, "x").identity() != flat.identity()
    assert from_dict(TrainConfig, {**FLAT, "nproc": 4}, "x").identity() == flat.identity()  # resumable


def test_flags_override_a_sectioned_yaml_and_a_yaml_mapping_equals_the_json_flag(tmp_path):
    text = ("data: {store: s, target: t}\ncheckpointing: {output: o}\noptimizer: {lr: 0.5, grad_accum: 2}\n"
            "draft:\n  draft_config:\n    intermediate_size: 96\n")
    cfg = parse(["--lr", "0.25"], tmp_path, text)
    assert (cfg.optimizer.lr, cfg.optimizer.grad_accum, cfg.draft.draft_config) == (0.25, 2, {"intermediate_size": 96})


def test_mistakes_name_the_file_and_option():
    with pytest.raises(ConfigError, match=r"x\.yaml: unknown option 'lrr' in section 'optimizer'"):
        from_dict(TrainConfig, {**FLAT, "optimizer": {"lrr": 1}}, "x.yaml")
    with pytest.raises(ConfigError, match=r"option 'lr' is given twice"):
        from_dict(TrainConfig, {**FLAT, "optimizer": {"lr": 1}}, "x.yaml")
    with pytest.raises(ConfigError, match=r"x\.yaml: draft: draft_config: --draft-config is not valid JSON"):
        from_dict(TrainConfig, {**FLAT, "draft_config": "{oops"}, "x.yaml")
    with pytest.raises(ConfigError, match="--lr must be positive"):
        from_dict(TrainConfig, {**FLAT, "lr": -1}, "x.yaml")


def test_a_flat_run_dir_of_the_previous_release_resumes_and_a_changed_option_is_named(tmp_path):
    out = tmp_path / "run"
    cfg = from_dict(TrainConfig, {**FLAT, "output": str(out)}, "x")
    old_flat = {**leaf_values(cfg), "draft_config": '{"intermediate_size": 96}'}  # how run.json held it
    assert old_identity(old_flat) == cfg.identity()
    out.mkdir()
    (out / "run.json").write_text(json.dumps({"identity": old_identity(old_flat), "config": old_flat, "world_size": 1}))
    assert check_run_dir(cfg, 1)["config"] == old_flat
    changed = dataclasses.replace(cfg, optimizer=dataclasses.replace(cfg.optimizer, lr=0.004))
    with pytest.raises(TrainSetupError, match=r"holds a run with other settings \(lr: 0.002 -> 0.004\)"):
        check_run_dir(changed, 1)
