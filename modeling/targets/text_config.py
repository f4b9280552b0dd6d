"""The decoder's shape from a target's ``config.json``, read the way transformers reads it: one reader for
every family.

Released checkpoints list only the fields that differ from their config class's defaults (Qwen2-Audio-7B's
``text_config`` has no ``num_hidden_layers``, ``hidden_size`` or head counts), so reading raw JSON keys
either refuses them or guesses defaults by hand. Here the family's transformers config class builds the
config, which fills in exactly the defaults transformers loads the model with; a family only says which
class (:attr:`TargetFamily.config_class`) and, for a layout that nests it, which key holds it.

What is refused (:class:`TextConfigError`, a ValueError naming the file and the field): a config the
class itself refuses (a string or float where an int belongs), no ``text_config`` at all (the class would
silently build its default model), sizes that are not positive integers, heads that do not divide the
hidden size or each other, tie flags or vocabulary sizes that disagree between the top level (what
transformers reads) and ``text_config`` (what vLLM's inner model reads), and fields a family must find
in the file because transformers and vLLM default them differently.
"""

from __future__ import annotations

import copy
import importlib
from collections.abc import Mapping, Sequence
from typing import Any

TEXT_KEY = "text_config"
# what read_text_config returns, in this order (TargetFamily.text_config's keys)
SHAPE_KEYS = ("num_hidden_layers", "hidden_size", "vocab_size", "num_attention_heads", "num_key_value_heads",
              "head_dim", "intermediate_size", "rms_norm_eps", "rope_theta", "max_position_embeddings",
              "tie_word_embeddings")


class TextConfigError(ValueError):
    """A config.json whose decoder shape cannot be read unambiguously; the message names file and field."""


def config_class(spec: str) -> type:
    """A config class by ``"Name"`` (transformers) or ``"module:Name"``, imported on use: reading a config
    needs transformers, the rest of a family module does not."""
    module, _, name = spec.rpartition(":")
    return getattr(importlib.import_module(module or "transformers"), name)


def layout(config: Mapping[str, Any], class_spec: str, nested: Mapping[str, str],
           where: str) -> tuple[str, Mapping[str, Any], str]:
    """(class spec, the object holding ``text_config``, its JSON path prefix) for ``config``'s layout: the
    family's class, or for a layout marked by one of ``nested``'s keys (e.g. Qwen3-ASR's original
    ``thinker_config``) the class that reads that layout."""
    for key, spec in nested.items():
        if key in config:
            inner = config[key]
            if not isinstance(inner, Mapping):
                raise TextConfigError(f"{where}: {key} must be an object, got {type(inner).__name__}")
            return spec, inner, f"{key}."
    return class_spec, config, ""


def _positive_int(text: Any, name: str, where: str, prefix: str) -> int:
    value = getattr(text, name, None)
    # bool is an int subclass: true/false in a size field is a broken file, not 1/0
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise TextConfigError(f"{where}: {prefix}{TEXT_KEY}.{name} must be a positive integer, got {value!r}")
    return value


def _rope_theta(text: Any, where: str, prefix: str) -> float:
    params = getattr(text, "rope_parameters", None) or {}
    theta = params.get("rope_theta") if isinstance(params, Mapping) else None
    theta = theta if theta is not None else getattr(text, "rope_theta", None)
    if not isinstance(theta, (int, float)) or isinstance(theta, bool) or theta <= 0:
        raise TextConfigError(f"{where}: {prefix}{TEXT_KEY}.rope_theta must be a positive number, got {theta!r}")
    return float(theta)


def _given(raw_text: Mapping[str, Any], name: str) -> bool:
    """Whether the file itself sets ``name`` (rope_theta may sit in rope_parameters or rope_scaling)."""
    if name in raw_text:
        return True
    if name == "rope_theta":
        return any(isinstance(raw_text.get(k), Mapping) and "rope_theta" in raw_text[k]
                   for k in ("rope_parameters", "rope_scaling"))
    return False


def read_text_config(config: Mapping[str, Any], class_spec: str, *, where: str = "config.json",
                     nested: Mapping[str, str] | None = None, required: Sequence[str] = ()) -> dict[str, Any]:
    """The decoder's shape as the config class ``class_spec`` reads ``config`` (see the module docstring).

    ``nested``: {marker key: class spec} for layouts ``class_spec`` cannot read (see :func:`layout`).
    ``required``: text_config fields that must be in the file, not defaulted. Returns :data:`SHAPE_KEYS`.
    """
    if not isinstance(config, Mapping):
        raise TextConfigError(f"{where}: expected a JSON object, got {type(config).__name__}")
    class_spec, body, prefix = layout(config, class_spec, nested or {}, where)
    class_name = class_spec.rpartition(":")[2]
    raw_text = body.get(TEXT_KEY)
    if not isinstance(raw_text, Mapping):
        raise TextConfigError(f"{where}: no {prefix}{TEXT_KEY} object (the decoder's config); "
                              f"{class_name} would silently use its default model")
    for name in required:
        if not _given(raw_text, name):
            raise TextConfigError(f"{where}: {prefix}{TEXT_KEY}.{name} is missing: transformers and vLLM "
                                  "default it differently, so the file must say it")
    cls = config_class(class_spec)
    try:
        # from_dict of the whole file, as from_pretrained does; a deep copy because config classes write
        # into the sub-config dicts they are given
        built = cls.from_dict(copy.deepcopy(dict(config)))
    except Exception as err:  # the class's own validation (strict dataclass fields, rope checks)
        raise TextConfigError(f"{where}: {class_spec} refuses it: "
                              f"{' '.join(str(err).split())}") from None
    text = built.get_text_config()
    out: dict[str, Any] = {}
    for name in ("num_hidden_layers", "hidden_size", "vocab_size", "num_attention_heads", "intermediate_size",
                 "max_position_embeddings"):
        out[name] = _positive_int(text, name, where, prefix)
    heads, hidden = out["num_attention_heads"], out["hidden_size"]
    out["num_key_value_heads"] = (_positive_int(text, "num_key_value_heads", where, prefix)
                                  if getattr(text, "num_key_value_heads", None) is not None else heads)
    if heads % out["num_key_value_heads"]:
        raise TextConfigError(f"{where}: {prefix}{TEXT_KEY}.num_key_value_heads ({out['num_key_value_heads']}) "
                              f"does not divide num_attention_heads ({heads})")
    if getattr(text, "head_dim", None) is not None:  # Qwen3: explicit, never hidden // heads
        out["head_dim"] = _positive_int(text, "head_dim", where, prefix)
    elif hidden % heads:
        raise TextConfigError(f"{where}: {prefix}{TEXT_KEY}.hidden_size ({hidden}) is not divisible by "
                              f"num_attention_heads ({heads}) and no head_dim is given")
    else:
        out["head_dim"] = hidden // heads
    eps = getattr(text, "rms_norm_eps", None)
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or eps <= 0:
        raise TextConfigError(f"{where}: {prefix}{TEXT_KEY}.rms_norm_eps must be a positive number, got {eps!r}")
    out["rms_norm_eps"] = float(eps)
    out["rope_theta"] = _rope_theta(text, where, prefix)
    tie_text = bool(getattr(text, "tie_word_embeddings", False))
    # transformers ties the head by the top-level flag (the class's default where the file has none),
    # vLLM's inner model by text_config's: two values would give two different lm_heads
    tie_top = getattr(built, "tie_word_embeddings", None)
    if built is not text and tie_top is not None and bool(tie_top) != tie_text:
        raise TextConfigError(f"{where}: tie_word_embeddings is {bool(tie_top)} at the top level but {tie_text} in "
                              f"{prefix}{TEXT_KEY}: transformers and vLLM would build different lm_heads")
    out["tie_word_embeddings"] = tie_text
    top_vocab = getattr(built, "vocab_size", None) if built is not text else None
    if top_vocab is not None and top_vocab != out["vocab_size"]:
        raise TextConfigError(f"{where}: {prefix}vocab_size ({top_vocab!r}) disagrees with "
                              f"{prefix}{TEXT_KEY}.vocab_size ({out['vocab_size']})")
    return {k: out[k] for k in SHAPE_KEYS}
