"""Every shipped YAML recipe is valid for every stage it configures (no typo waits for a cluster run)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from modeling.training.config import TrainConfig
from pipeline.cluster.orchestrate import STAGES, Paths, load_pipeline_config, stage_path_args
from pipeline.cluster.slurm import emit_slurm
from pipeline.core.config import from_dict, read_yaml_section
from stages.benchmark import BenchmarkConfig
from stages.dump import DumpConfig
from stages.export import ExportConfig
from stages.regenerate import RegenerateConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
CLASSES = {"regenerate": RegenerateConfig, "dump": DumpConfig, "train": TrainConfig, "export": ExportConfig,
           "benchmark": BenchmarkConfig}
PIPELINES = ["demo.yaml", "demo-asr-tiny.yaml", "demo-random.yaml", "demo-qwen3-asr.yaml", "demo-glm-asr.yaml", "qwen2-audio-7b.yaml"]


def path_values(stage: str, cfg, paths: Paths) -> dict:
    args = stage_path_args(stage, cfg, paths)
    return {args[i].lstrip("-").replace("-", "_"): args[i + 1] for i in range(0, len(args), 2)}


@pytest.mark.parametrize("name", PIPELINES)
def test_pipeline_recipes_validate(name, tmp_path):
    cfg, raw = load_pipeline_config(CONFIGS / name)
    paths = Paths(Path(cfg.workdir))
    for stage in STAGES:
        values = {**raw.get(stage, {}), **path_values(stage, cfg, paths)}
        from_dict(CLASSES[stage], values, f"{name}:{stage}")
    emit_slurm(str(CONFIGS / name), tmp_path)


# a few values each per-stage example must hold (the Qwen2-Audio-7B recipe the README points at)
EXAMPLE_ANCHORS = {
    "regenerate": {"target": "checkpoints/Qwen2-Audio-7B-Instruct", "num_shards": 64, "max_new_tokens": 512,
                   "temperature": 0.0, "dtype": "bfloat16"},
    "dump": {"target": "checkpoints/Qwen2-Audio-7B-Instruct", "num_shards": 64, "max_length": 4096,
             "aux_layers": "auto", "last_hidden": "loss", "device": "cuda"},
    "benchmark": {"target": "checkpoints/Qwen2-Audio-7B-Instruct", "num_spec_tokens": 4, "temperature": 0.0,
                  "max_num_seqs": 1},
    "train": {"target": "checkpoints/Qwen2-Audio-7B-Instruct", "zero_stage": 2, "ttt_length": 7,
              "draft_vocab_size": 32000, "loss_decay": 0.8},
}


def _plain(value):
    return list(value) if isinstance(value, (list, tuple)) else value


@pytest.mark.parametrize("stage", ["regenerate", "dump", "benchmark", "train"])
def test_single_stage_examples_validate(stage):
    """configs/<stage>.yaml exists, every key it sets arrives in the stage's config with its value,
    every key it leaves out keeps the dataclass default, and the recipe's anchor values hold."""
    path = CONFIGS / f"{stage}.yaml"
    assert path.is_file(), f"{path} is missing (the docs and the README point at it)"
    values = read_yaml_section(path, stage)
    assert values, f"{path} sets nothing"
    cfg = from_dict(CLASSES[stage], values, str(path))
    for key, value in values.items():
        assert _plain(getattr(cfg, key.replace("-", "_"))) == _plain(value), f"{path}: {key}"
    for field in dataclasses.fields(cfg):
        if field.name not in values and field.init:
            default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
            assert getattr(cfg, field.name) == default, f"{path}: {field.name} changed without being set"
    for key, value in EXAMPLE_ANCHORS[stage].items():
        assert getattr(cfg, key) == value, f"{path}: {key} is {getattr(cfg, key)!r}, the recipe says {value!r}"
