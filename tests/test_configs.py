"""Every shipped YAML recipe is valid for every stage it configures (no typo waits for a cluster run)."""

from __future__ import annotations

from pathlib import Path

import pytest

from modeling.training.config import TrainConfig
from pipeline.config import from_dict, read_yaml_section
from pipeline.orchestrate import STAGES, Paths, load_pipeline_config, stage_path_args
from pipeline.slurm import emit_slurm
from stages.benchmark import BenchmarkConfig
from stages.dump import DumpConfig
from stages.export import ExportConfig
from stages.regenerate import RegenerateConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
CLASSES = {"regenerate": RegenerateConfig, "dump": DumpConfig, "train": TrainConfig, "export": ExportConfig,
           "benchmark": BenchmarkConfig}
PIPELINES = ["demo.yaml", "demo-random.yaml", "demo-qwen3-asr.yaml", "demo-glm-asr.yaml", "qwen2-audio-7b.yaml"]


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


@pytest.mark.parametrize("stage", ["regenerate", "dump", "benchmark", "train"])
def test_single_stage_examples_validate(stage):
    path = CONFIGS / f"{stage}.yaml"
    if not path.exists():
        pytest.skip(f"no {path.name}")
    values = read_yaml_section(path, stage)
    from_dict(CLASSES[stage], values, str(path))
