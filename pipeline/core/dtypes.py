"""The one spelling of compute and storage dtypes: ``fp32``, ``bf16``, ``fp16`` (and ``auto`` where a
stage may let the engine choose).

Every config field, CLI flag and manifest uses these names. The long names of earlier releases
(``float32``, ``bfloat16``, ``float16``) are still read, with a warning naming the new spelling;
they will stop being accepted in the release after next. Engines and file formats that want
their own names (vLLM's ``dtype``, Hugging Face's ``torch_dtype``) get them from
:func:`long_name` at the boundary, so the project's configs never spell them.
"""

from __future__ import annotations

import warnings
from typing import Any

DTYPES = ("fp32", "bf16", "fp16")
AUTO = "auto"
# the long spellings (torch/numpy/vLLM names) and what they are now written as
DEPRECATED = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "torch.float32": "fp32",
              "torch.bfloat16": "bf16", "torch.float16": "fp16"}
LONG_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


class DtypeError(ValueError):
    """A dtype spelled in none of the accepted ways; the message names where and the choices."""


def parse_dtype(value: Any, where: str, allowed: tuple[str, ...] = (*DTYPES, AUTO)) -> str:
    """``value`` in the project's spelling; an old long spelling is converted with a FutureWarning
    that names ``where`` and the new spelling."""
    text = str(value).strip()
    if text in DEPRECATED:
        new = DEPRECATED[text]
        warnings.warn(f"{where}: dtype {text!r} is the old spelling; write {new!r} (the old one is read for "
                      "one more release)", FutureWarning, stacklevel=2)
        text = new
    if text not in allowed:
        raise DtypeError(f"{where}: dtype {value!r} is not one of {list(allowed)}")
    return text


def from_engine(name: str | None) -> str | None:
    """An engine's reported dtype (``torch.bfloat16``, ``float32``) in the project's spelling."""
    if name is None:
        return None
    text = str(name).strip()
    return text if text in DTYPES else DEPRECATED.get(text, text)


def long_name(name: str) -> str:
    """What vLLM and Hugging Face configs call ``name`` (``auto`` stays ``auto``)."""
    return LONG_NAMES.get(name, name)


def torch_dtype(name: str) -> Any:
    """The torch dtype of a project spelling (``auto`` is not one)."""
    import torch

    if name not in DTYPES:
        raise DtypeError(f"dtype {name!r} is not one of {list(DTYPES)}")
    return getattr(torch, LONG_NAMES[name])
