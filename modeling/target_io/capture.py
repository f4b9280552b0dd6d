"""Capture EAGLE-3 training inputs from an unmodified transformers audio LLM, by forward hooks.

Where the hooks go and how the model is called are the target family's (:mod:`modeling.targets`):
its ``decoder(model)`` (the module whose ``.layers`` are hooked and whose ``inputs_embeds`` are the
merged audio + text embeddings), ``inner_forward`` (the model without its lm_head) and
``audio_inputs`` (the audio keyword arguments).

One padded forward per batch gives, per sample and sliced to its real length:

- ``aux_hidden`` [S, 3, H]: the residual stream at the outputs of three decoder layers. Ids are
  in the "output of layer i" convention (SGLang, SpecForge), i.e. HF ``hidden_states[i + 1]``;
  vLLM and SafeAILab EAGLE number the same tensors ``i + 1`` ("input of layer i + 1"), so both
  lists are returned by :func:`aux_layer_ids` and recorded in the store.
- ``last_hidden`` [n, H]: the final post-norm state (HF ``hidden_states[-1]``), only where the
  next token carries loss (the TTT target at t is the target's distribution for token t+1), or
  at every position with ``last_hidden="all"``.
- ``audio_embeds`` [n_audio, H]: the projector output as merged into ``inputs_embeds``, taken
  from what reaches the language model (a pre-hook), not recomputed.

The forward calls the inner model, so the 156k-vocab ``lm_head`` (about 5 TFLOP for 4k tokens of
a 7B model, ~9% of the forward, and a 2.5 GB fp32 logits tensor) never runs.
The forward is not cut short after the last aux layer: the final norm needs every layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from pipeline.data.records import RecordError
from pipeline.data.samples import PreparedSample
from storage.sample import CapturedSample

NUM_AUX_LAYERS = 3  # EAGLE-3's fc is Linear(3H -> H); engines expect exactly three ids
LastHidden = Literal["loss", "all"]


def default_aux_layers(num_layers: int) -> list[int]:
    """EAGLE-3's default in the output convention: ``[1, L//2 - 1, L - 4]`` ([1, 15, 28] at L=32)."""
    return [1, num_layers // 2 - 1, num_layers - 4]


def aux_layer_ids(num_layers: int, spec: str | Sequence[int] = "auto") -> tuple[list[int], list[int]]:
    """Resolve ``--aux-layers`` (``auto`` or ``i,j,k`` in the output convention).

    Returns ``(output_convention_ids, input_convention_ids)``; the second is the first plus one
    (vLLM's ``eagle_aux_hidden_state_layer_ids``). Raises ValueError for ids that are not three
    strictly increasing layers in ``0 .. L-2``: the output of the last layer is excluded because
    HF's ``hidden_states[L]`` is the post-norm state, and vLLM has no layer ``L`` to read input of.
    """
    if isinstance(spec, str):
        text = spec.strip()
        if text == "auto":
            ids = default_aux_layers(num_layers)
        else:
            try:
                ids = [int(p) for p in text.split(",") if p.strip()]
            except ValueError:
                raise ValueError(f"--aux-layers must be 'auto' or comma-separated integers, got {spec!r}") from None
    else:
        ids = [int(i) for i in spec]
    if len(ids) != NUM_AUX_LAYERS:
        raise ValueError(f"--aux-layers needs {NUM_AUX_LAYERS} layer ids, got {ids}")
    if any(b <= a for a, b in zip(ids, ids[1:], strict=False)) or ids[0] < 0 or ids[-1] > num_layers - 2:
        raise ValueError(f"--aux-layers {ids}: need strictly increasing ids in 0..{num_layers - 2} "
                         f"(output convention, target has {num_layers} layers)")
    return ids, [i + 1 for i in ids]


def load_target_model(target_dir: str | Path, dtype: str = "bf16", device: str = "cpu") -> Any:
    """The target's stock transformers model (its family's class), eval, frozen."""
    from modeling.targets import family_of

    return family_of(target_dir).load_model(target_dir, dtype, device)


@dataclass
class ModelInputs:
    """One right-padded batch as the model takes it: ids, attention mask and the family's audio kwargs."""

    input_ids: torch.Tensor  # [B, T] int64
    attention_mask: torch.Tensor  # [B, T] 1 = real token
    audio: dict[str, torch.Tensor]  # e.g. input_features + its mask, for every clip of the batch in order

    def to(self, device: torch.device | str) -> ModelInputs:
        return ModelInputs(self.input_ids.to(device), self.attention_mask.to(device),
                           {k: v.to(device) for k, v in self.audio.items()})


def collate(samples: Sequence[PreparedSample], family: Any, feature_extractor: Any, pad_token_id: int) -> ModelInputs:
    """Right-pad ids (so real positions keep RoPE positions 0..S-1) and featurize every clip."""
    width = max(s.length for s in samples)
    ids = np.full((len(samples), width), pad_token_id, dtype=np.int64)
    mask = np.zeros((len(samples), width), dtype=np.int64)
    for b, s in enumerate(samples):
        ids[b, : s.length] = s.encoded.input_ids
        mask[b, : s.length] = 1
    clips = [w for s in samples for w in s.waveforms]
    # a text-only batch passes no audio kwargs, or the audio tower runs on nothing
    audio = {k: torch.from_numpy(v) for k, v in family.audio_inputs(feature_extractor, clips).items()} if clips else {}
    return ModelInputs(torch.from_numpy(ids), torch.from_numpy(mask), audio)


def check_audio_spans(sample: PreparedSample, min_tokens: int) -> None:
    """Raise RecordError for a clip shorter than ``min_tokens`` audio tokens (the family's minimum)."""
    for i, (start, end) in enumerate(sample.encoded.audio_spans):
        if end - start < min_tokens:
            raise RecordError("audio", f"clip {i + 1} gives {end - start} audio token(s); at least "
                                       f"{min_tokens} are needed")


def loss_positions(loss_mask: torch.Tensor) -> torch.Tensor:
    """Positions t whose next token carries loss (``loss_mask[t + 1] == 1``), int64."""
    return torch.nonzero(loss_mask[1:] != 0).flatten()


class TargetCapture:
    """Forward hooks on a loaded target; ``capture(samples)`` runs one batch.

    Use as a context manager (or call :meth:`close`) so the hooks leave the model afterwards.
    """

    def __init__(self, model: Any, family: Any, feature_extractor: Any, *, aux_layers: Sequence[int],
                 pad_token_id: int, audio_token_id: int, last_hidden: LastHidden = "loss"):
        self.model = model
        self.family = family
        self.feature_extractor = feature_extractor
        self.aux_layers = list(aux_layers)
        self.last_hidden = last_hidden
        self.pad_token_id = pad_token_id
        if pad_token_id == audio_token_id:
            raise ValueError("the pad id must not be the audio token id (padding would count as audio)")
        # stored tensors must be half precision (CapturedSample); an fp32 target is stored as bf16
        self.store_dtype = model.dtype if model.dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
        lm = family.decoder(model)
        self._acts: dict[str, torch.Tensor] = {}
        self._hooks = [lm.register_forward_pre_hook(self._grab_embeds, with_kwargs=True)]
        for k, layer_id in enumerate(self.aux_layers):
            self._hooks.append(lm.layers[layer_id].register_forward_hook(partial(self._grab_layer, k)))

    def _grab_embeds(self, module: Any, args: tuple, kwargs: dict[str, Any]) -> None:
        self._acts["embeds"] = kwargs["inputs_embeds"]

    def _grab_layer(self, k: int, module: Any, args: tuple, output: Any) -> None:
        self._acts[f"aux{k}"] = output[0] if isinstance(output, tuple) else output

    @property
    def device(self) -> torch.device:
        return self.model.device

    @torch.inference_mode()
    def forward(self, inputs: ModelInputs) -> dict[str, torch.Tensor]:
        """Padded activations: ``embeds``, ``aux0..`` [B, T, H] and ``last`` (post-norm) [B, T, H]."""
        self._acts.clear()
        try:
            last = self.family.inner_forward(self.model, inputs.input_ids, inputs.attention_mask, **inputs.audio)
            acts = {**self._acts, "last": last}
        finally:
            self._acts.clear()
        missing = [k for k in ("embeds", *(f"aux{k}" for k in range(len(self.aux_layers)))) if k not in acts]
        if missing:
            raise RuntimeError(f"capture hooks did not fire for {missing}: model layout not as expected")
        return acts

    def capture(self, samples: Sequence[PreparedSample]) -> list[CapturedSample]:
        """One forward over ``samples``; one :class:`CapturedSample` each, in the given order."""
        for sample in samples:
            check_audio_spans(sample, self.family.min_audio_tokens)
        inputs = collate(samples, self.family, self.feature_extractor, self.pad_token_id).to(self.device)
        acts = self.forward(inputs)
        return [self._sample(s, b, acts) for b, s in enumerate(samples)]

    def _sample(self, sample: PreparedSample, b: int, acts: dict[str, torch.Tensor]) -> CapturedSample:
        n, enc, rec = sample.length, sample.encoded, sample.record
        loss_mask = torch.from_numpy(enc.loss_mask.astype(np.int64))
        positions = loss_positions(loss_mask) if self.last_hidden == "loss" else torch.arange(n)
        aux = torch.stack([acts[f"aux{k}"][b, :n] for k in range(len(self.aux_layers))], dim=1)
        last = acts["last"][b, positions.to(self.device)]
        embeds = acts["embeds"][b]
        spans = [(int(s), int(e)) for s, e in enc.audio_spans]
        audio = torch.cat([embeds[s:e] for s, e in spans]) if spans else embeds[:0]
        meta = {"source": rec.source, "index": rec.index, "line": rec.line, "num_tokens": n,
                "num_loss_tokens": int(loss_mask.sum()), "num_last": int(positions.numel()),
                "num_audio_tokens": int(audio.shape[0]), "audio_spans": spans}
        return CapturedSample(
            id=rec.id, source_hash=rec.source_hash, input_ids=torch.from_numpy(enc.input_ids.astype(np.int64)),
            loss_mask=loss_mask, aux_hidden=self._to_cpu(aux), last_hidden=self._to_cpu(last),
            last_hidden_positions=positions, audio_embeds=self._to_cpu(audio), audio_spans=spans, meta=meta)

    def _to_cpu(self, t: torch.Tensor) -> torch.Tensor:
        # always a copy: a view would keep the whole padded batch alive in the writer's queue
        return t.to("cpu", self.store_dtype, copy=True)

    def close(self) -> None:
        """Remove the hooks; the model is as loaded."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    def __enter__(self) -> TargetCapture:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def plan_batches(lengths: Sequence[int], batch_tokens: int) -> list[list[int]]:
    """Group sample positions into forwards of at most ``batch_tokens`` padded tokens.

    Longest first, so a batch's padded size is ``len(batch) * its first length`` and an
    out-of-memory shows up in the first forward; a sample longer than the budget runs alone.
    Ties keep input order, so the plan is a pure function of the lengths (resume relies on it).
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    for i in order:
        if batches and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= batch_tokens:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches
