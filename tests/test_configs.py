"""Every shipped YAML recipe is valid for every stage it configures (no typo waits for a cluster run)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from modeling.training.config import TrainConfig
from pipeline.cluster.orchestrate import STAGES, Paths, load_pipeline_config, stage_path_args
from pipeline.cluster.slurm import emit_slurm
from pipeline.core.config import flat_options, from_dict, leaf_fields, leaf_values, read_yaml_section
from stages.benchmark import BenchmarkConfig
from stages.dump import DumpConfig
from stages.export import ExportConfig
from stages.regenerate import RegenerateConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
CLASSES = {"regenerate": RegenerateConfig, "dump": DumpConfig, "train": TrainConfig, "export": ExportConfig,
           "benchmark": BenchmarkConfig}
PIPELINES = ["demo.yaml", "curve-smol-640.yaml", "curve-smol-960.yaml", "curve-smol-640-listening.yaml", "curve-smol-1828-listening.yaml", "curve-smol-1828-listening-1200.yaml", "curve-smol-1828-listening-sampled.yaml", "sampled-smol-1828-listening.yaml", "more-smol-listening.yaml",
             "curve-smol-listening-more-prompts.yaml", "curve-smol-listening-more-prompts-2400.yaml", "curve-smol-1828-listening-2400.yaml",
             "demo-gpu.yaml", "demo-asr-tiny.yaml",
             "demo-random.yaml", "demo-qwen3-asr.yaml", "demo-glm-asr.yaml", "qwen2-audio-7b.yaml"]


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
                   "temperature": 0.0, "dtype": "bf16"},
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
    cls = CLASSES[stage]
    values = flat_options(cls, read_yaml_section(path, stage, cls))  # train.yaml is in sections
    assert values, f"{path} sets nothing"
    got = leaf_values(from_dict(cls, values, str(path)))
    for key, value in values.items():
        assert _plain(got[key.replace("-", "_")]) == _plain(value), f"{path}: {key}"
    for name, (_, field) in leaf_fields(cls).items():
        if name not in values and field.init:
            default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
            assert got[name] == default, f"{path}: {name} changed without being set"
    for key, value in EXAMPLE_ANCHORS[stage].items():
        assert got[key] == value, f"{path}: {key} is {got[key]!r}, the recipe says {value!r}"
