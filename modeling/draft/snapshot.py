"""The training run's draft snapshot: written at each checkpoint, read by export.

Layout of a training run (the trainer writes it; ``stages.export`` reads it)::

    RUN_DIR/run.json
    RUN_DIR/checkpoints/latest                      text: name of the newest step dir
    RUN_DIR/checkpoints/step-000500/COMMITTED       the step exists only once this exists
    RUN_DIR/checkpoints/step-000500/draft/model.safetensors   draft weights (export names)
    RUN_DIR/checkpoints/step-000500/draft/draft_config.json   DraftConfig, aux ids, target info
    RUN_DIR/checkpoints/step-000500/draft/vocab.safetensors   d2t / t2d (VocabMapping)
    RUN_DIR/checkpoints/step-000500/...             optimizer state (DeepSpeed), not read here

The snapshot is independent of DeepSpeed's sharded files, so exporting needs neither DeepSpeed
nor the optimizer state, and it keeps the trainer's dtype (fp32 master weights stay fp32 until
export casts them). ``embed_tokens`` is never stored: it is the target's table.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from modeling.draft.config import DraftConfig
from modeling.draft.vocab import VocabMapping
from pipeline.core.durable import atomic_replace_dir, atomic_write_json

log = logging.getLogger(__name__)

SNAPSHOT_DIR = "draft"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "draft_config.json"
VOCAB_FILE = "vocab.safetensors"
COMMITTED = "COMMITTED"
LATEST = "latest"
FORMAT = "audio-eagle3-draft-snapshot"
FORMAT_VERSION = 1
EMBED_KEY = "embed_tokens.weight"
_STEP_RE = re.compile(r"^step-(\d+)$")


class SnapshotError(ValueError):
    """A run directory or snapshot is missing, incomplete or inconsistent; the message says which."""


@dataclass
class DraftSnapshot:
    """A loaded snapshot: weights (export names, no embedding), shape, vocab and provenance."""

    state_dict: dict[str, torch.Tensor]
    draft_config: DraftConfig
    vocab: VocabMapping
    aux_layer_ids_output_convention: list[int]
    target_info: dict[str, Any] = field(default_factory=dict)
    step_dir: Path | None = None


def identity_vocab(vocab_size: int) -> VocabMapping:
    """The mapping of a full-vocab draft (draft id == target id)."""
    return VocabMapping(d2t=torch.zeros(vocab_size, dtype=torch.long), t2d=torch.ones(vocab_size, dtype=torch.bool))


def expected_shapes(cfg: DraftConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor an export of ``cfg`` holds (built on the meta device: no memory)."""
    from modeling.draft.model import Eagle3Draft

    with torch.device("meta"):
        draft = Eagle3Draft(cfg)
    return {k: tuple(v.shape) for k, v in draft.export_state_dict().items()}


def check_state_dict(state_dict: Mapping[str, torch.Tensor], cfg: DraftConfig, where: str) -> None:
    """Raise :class:`SnapshotError` unless ``state_dict`` has exactly the draft's tensors and shapes.

    ``d2t``/``t2d`` may be absent (the vocab file holds them).
    """
    expected = expected_shapes(cfg)
    optional = {"d2t", "t2d"}
    missing = sorted(set(expected) - set(state_dict) - optional)
    unexpected = sorted(set(state_dict) - set(expected))
    wrong = {k: (tuple(v.shape), expected[k]) for k, v in state_dict.items()
             if k in expected and tuple(v.shape) != expected[k]}
    if missing or unexpected or wrong:
        raise SnapshotError(f"{where}: draft weights do not match the draft config: missing {missing}, "
                            f"unexpected {unexpected}, wrong shapes (got, expected) {wrong}")


def _config_json(cfg: DraftConfig, aux_ids: list[int], target_info: Mapping[str, Any],
                 dtypes: set[str]) -> dict[str, Any]:
    fields = dataclasses.asdict(cfg)
    fields["aux_layer_ids"] = list(cfg.aux_layer_ids)
    return {"format": FORMAT, "version": FORMAT_VERSION, "draft_config": fields,
            "aux_layer_ids_output_convention": aux_ids, "target_info": dict(target_info),
            "dtypes": sorted(dtypes)}


def save_draft_snapshot(step_dir: str | Path, state_dict: Mapping[str, torch.Tensor], draft_config: DraftConfig,
                        vocab: VocabMapping | None, aux_layer_ids_output_convention: Sequence[int],
                        target_info: Mapping[str, Any]) -> Path:
    """Write ``step_dir/draft/`` atomically (temp dir + rename) and return its path.

    ``state_dict``: the draft's tensors under ``Eagle3Draft.export_state_dict`` names
    (``embed_tokens`` is dropped if present). ``vocab``: the draft vocab mapping, None for a
    full-vocab draft. ``aux_layer_ids_output_convention``: the target layers whose *outputs*
    the draft was trained on; must equal ``draft_config.aux_layer_ids`` (a mismatch means one
    side uses the other convention). ``target_info``: JSON-able provenance (path, hashes, sizes).
    """
    step_dir = Path(step_dir)
    aux = [int(i) for i in aux_layer_ids_output_convention]
    if tuple(aux) != tuple(draft_config.aux_layer_ids):
        raise SnapshotError(f"aux layer ids {aux} differ from the draft config's {list(draft_config.aux_layer_ids)} "
                            "(both must be in the output convention)")
    if vocab is None:
        if draft_config.draft_vocab_size != draft_config.vocab_size:
            raise SnapshotError(f"a draft vocab of {draft_config.draft_vocab_size} < {draft_config.vocab_size} "
                                "needs its VocabMapping")
        vocab = identity_vocab(draft_config.vocab_size)
    vocab.validate()
    if (vocab.d2t.numel(), vocab.t2d.numel()) != (draft_config.draft_vocab_size, draft_config.vocab_size):
        raise SnapshotError(f"vocab mapping sizes {vocab.d2t.numel()}/{vocab.t2d.numel()} do not match the draft "
                            f"config's {draft_config.draft_vocab_size}/{draft_config.vocab_size}")
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items() if k != EMBED_KEY}
    for name in ("d2t", "t2d"):
        if name in tensors and not torch.equal(tensors[name], getattr(vocab, name)):
            raise SnapshotError(f"the state dict's {name} differs from the vocab mapping")
        if draft_config.draft_vocab_size == draft_config.vocab_size:
            tensors.pop(name, None)  # identity mapping: export_state_dict leaves it out as well
    check_state_dict(tensors, draft_config, str(step_dir))
    step_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{SNAPSHOT_DIR}.tmp-", dir=step_dir))
    try:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        vocab.save(tmp / VOCAB_FILE)
        dtypes = {str(v.dtype).removeprefix("torch.") for v in tensors.values() if v.is_floating_point()}
        atomic_write_json(tmp / CONFIG_FILE, _config_json(draft_config, aux, target_info, dtypes))
        atomic_replace_dir(tmp, step_dir / SNAPSHOT_DIR)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return step_dir / SNAPSHOT_DIR


def load_draft_snapshot(step_dir: str | Path) -> DraftSnapshot:
    """Read and check ``step_dir/draft/``; raises :class:`SnapshotError` naming what is missing."""
    step_dir = Path(step_dir)
    root = step_dir / SNAPSHOT_DIR
    missing = [n for n in (WEIGHTS_FILE, CONFIG_FILE, VOCAB_FILE) if not (root / n).is_file()]
    if missing:
        raise SnapshotError(f"{root}: incomplete draft snapshot, missing {missing}")
    try:
        meta = json.loads((root / CONFIG_FILE).read_text())
    except ValueError as err:
        raise SnapshotError(f"{root / CONFIG_FILE}: not valid JSON ({err})") from None
    if meta.get("format") != FORMAT or meta.get("version") != FORMAT_VERSION:
        raise SnapshotError(f"{root / CONFIG_FILE}: format {meta.get('format')!r} v{meta.get('version')}, "
                            f"expected {FORMAT!r} v{FORMAT_VERSION}")
    cfg = DraftConfig(**meta["draft_config"])
    vocab = VocabMapping.load(root / VOCAB_FILE)
    state_dict = load_file(str(root / WEIGHTS_FILE))
    check_state_dict(state_dict, cfg, str(root))
    return DraftSnapshot(state_dict, cfg, vocab, [int(i) for i in meta["aux_layer_ids_output_convention"]],
                         dict(meta.get("target_info") or {}), step_dir)


def _steps(checkpoints: Path) -> tuple[dict[int, Path], list[str]]:
    """(committed step number -> dir, names of step dirs without a COMMITTED marker)."""
    committed: dict[int, Path] = {}
    uncommitted: list[str] = []
    for child in sorted(checkpoints.iterdir()) if checkpoints.is_dir() else []:
        match = _STEP_RE.match(child.name)
        if not match or not child.is_dir():
            continue
        if (child / COMMITTED).exists():
            committed[int(match.group(1))] = child
        else:
            uncommitted.append(child.name)
    return committed, uncommitted


def find_step(run_dir: str | Path, step: int | None = None) -> Path:
    """The committed step dir of a run: ``step`` if given, else the newest committed one.

    A step dir without ``COMMITTED`` (a checkpoint cut short by a crash) never counts. Raises
    :class:`SnapshotError` listing the committed steps when the wanted one is not there.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise SnapshotError(f"run directory {run_dir} does not exist")
    checkpoints = run_dir / "checkpoints"
    committed, uncommitted = _steps(checkpoints)
    note = f" (ignored, not committed: {uncommitted})" if uncommitted else ""
    if not committed:
        raise SnapshotError(f"{run_dir}: no committed checkpoint under {checkpoints}{note}")
    if step is None:
        newest = max(committed)
        latest_file = checkpoints / LATEST
        if latest_file.is_file() and latest_file.read_text().strip() != committed[newest].name:
            # the marker is written before `latest` is updated: a crash in between leaves it behind
            log.warning("%s names %r but the newest committed step is %s; using the latter",
                        latest_file, latest_file.read_text().strip(), committed[newest].name)
        return committed[newest]
    if step not in committed:
        raise SnapshotError(f"{run_dir}: no committed step {step}; committed steps: {sorted(committed)}{note}")
    return committed[step]
