"""Export a trained draft into the checkpoint format serving engines load.

    python -m stages.export --run RUN_DIR [--step N] --output DRAFT_DIR [--engine vllm|sglang] [--dtype bf16]

Reads the draft snapshot of a committed training step (:mod:`modeling.draft.snapshot`) and writes
DRAFT_DIR with:

- ``config.json``: ``LlamaForCausalLMEagle3`` with ``draft_vocab_size``, ``target_hidden_size``,
  ``norm_before_residual`` and ``eagle_config.eagle_aux_hidden_state_layer_ids`` in the chosen
  engine's convention (vLLM names the *input* of layer i, SGLang the *output*: vLLM ids = SGLang
  ids + 1; see :func:`modeling.draft.config.aux_ids_for_engine`). The file for one engine is
  wrong by one layer for the other, so export once per engine.
- ``model.safetensors``: ``fc``, ``midlayer.*``, ``norm``, ``lm_head`` in ``--dtype``, ``d2t``
  (int64) when the draft vocab is smaller than the target's, never ``embed_tokens`` (the engine
  shares the target's); no ``d2t`` for a full-vocab draft, since vLLM then has no parameter for it
  and refuses the checkpoint. ``t2d`` only with ``--include-t2d``.
- ``export_info.json``: source run and step, the target's identity, both conventions' aux ids.

The directory is built under a temporary name and renamed into place, so DRAFT_DIR is either the
previous export or the complete new one.
"""

from __future__ import annotations

import glob
import logging
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import save_file

from modeling.draft.config import aux_ids_for_engine
from modeling.draft.snapshot import DraftSnapshot, find_step, load_draft_snapshot
from pipeline.core.cli import stage_main
from pipeline.core.config import dtype_opt, opt, require
from pipeline.core.durable import atomic_replace_dir, atomic_write_json, sha256_file
from pipeline.core.resources import ResourceMeter

log = logging.getLogger("stages.export")

DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
HF_DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
INFO_FILE = "export_info.json"


@dataclass(kw_only=True)
class ExportConfig:
    """Options of the export stage (``export:`` section of a pipeline YAML)."""

    run: str = opt("", "training run directory (holds checkpoints/step-*/draft)")
    step: int | None = opt(None, "training step to export (default: the newest committed step)")
    output: str = opt("", "output draft directory (replaced atomically if it exists)")
    engine: Literal["vllm", "sglang"] = opt("vllm", "engine whose aux-layer id convention config.json uses")
    dtype: str = dtype_opt("bf16", "dtype of the exported weights", ("bf16", "fp16", "fp32"))
    include_t2d: bool = opt(False, "also write the t2d mask (vLLM ignores it; some tools read it)")

    def __post_init__(self) -> None:
        require(bool(self.run), "--run is required")
        require(bool(self.output), "--output is required")
        require(self.step is None or self.step >= 0, f"--step must be >= 0, got {self.step}")


def serving_tensors(snap: DraftSnapshot, dtype: torch.dtype, include_t2d: bool = False) -> dict[str, torch.Tensor]:
    """The tensors of ``model.safetensors``: floats cast to ``dtype``, the vocab mapping as engines expect."""
    cfg = snap.draft_config
    out = {k: v.to(dtype).contiguous() for k, v in snap.state_dict.items()
           if k not in ("d2t", "t2d", "embed_tokens.weight")}
    if cfg.draft_vocab_size != cfg.vocab_size:
        # the vocab file is the one source of truth for the mapping (the weights file may lack it)
        out["d2t"] = snap.vocab.d2t.to(torch.long).contiguous()
        if include_t2d:
            out["t2d"] = snap.vocab.t2d.to(torch.bool).contiguous()
    return out


def serving_config(snap: DraftSnapshot, engine: Literal["vllm", "sglang"], dtype: str) -> dict[str, Any]:
    """``config.json`` for ``engine``, from the snapshot's output-convention aux ids."""
    config = snap.draft_config.to_hf_config(snap.aux_layer_ids_output_convention, convention_engine=engine)
    config["torch_dtype"] = HF_DTYPE_NAMES[dtype]
    return config


def export_info(cfg: ExportConfig, snap: DraftSnapshot, step_dir: Path, weights_sha256: str) -> dict[str, Any]:
    """Provenance written next to the checkpoint."""
    aux = snap.aux_layer_ids_output_convention
    draft = snap.draft_config
    return {
        "source": {"run": str(Path(cfg.run).resolve()), "step_dir": str(step_dir.resolve()), "step_name": step_dir.name},
        "target": snap.target_info,
        "engine": cfg.engine,
        "dtype": cfg.dtype,
        "aux_layer_ids": {"output_convention": list(aux), "vllm": aux_ids_for_engine(aux, "vllm"),
                          "sglang": aux_ids_for_engine(aux, "sglang"), "written": aux_ids_for_engine(aux, cfg.engine)},
        "draft_vocab_size": draft.draft_vocab_size,
        "vocab_size": draft.vocab_size,
        "has_d2t": draft.draft_vocab_size != draft.vocab_size,
        "model_safetensors_sha256": weights_sha256,
        "exported_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def export(cfg: ExportConfig) -> Path:
    """Write the serving checkpoint; returns the output directory. Raises :class:`SnapshotError`."""
    meter = ResourceMeter().__enter__()  # stopped before the info file is written; a failure ends the process
    step_dir = find_step(cfg.run, cfg.step)
    snap = load_draft_snapshot(step_dir)
    out = Path(cfg.output).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(f".{glob.escape(out.name)}.tmp-*"):  # what a killed export left
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        save_file(serving_tensors(snap, DTYPES[cfg.dtype], cfg.include_t2d), str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        atomic_write_json(tmp / "config.json", serving_config(snap, cfg.engine, cfg.dtype))
        meter.stop()
        info = export_info(cfg, snap, step_dir, sha256_file(tmp / "model.safetensors"))
        atomic_write_json(tmp / INFO_FILE, {**info, "resources": meter.result()})
        # mkdtemp (and safetensors) make files private; a served checkpoint is usually shared
        tmp.chmod(0o755)
        for path in tmp.iterdir():
            path.chmod(0o644)
        atomic_replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("exported %s (%s) -> %s for %s, aux layers %s", step_dir, cfg.dtype, out, cfg.engine,
             aux_ids_for_engine(snap.aux_layer_ids_output_convention, cfg.engine))
    return out


def is_complete(output: str | Path) -> bool:
    """An export is in place (its info file is written inside the temp dir before the rename)."""
    return (Path(output) / INFO_FILE).is_file()


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; exit statuses as in :mod:`pipeline.core.cli`."""
    return stage_main("python -m stages.export", ExportConfig, "export",
                      "Export a trained EAGLE-3 draft for vLLM or SGLang.", argv, export,
                      input_errors=(ValueError, OSError))  # SnapshotError, a corrupt vocab file, a missing run


if __name__ == "__main__":
    sys.exit(main())
