"""Output buffers for decoded samples: numpy to decode into, torch to hand out, same memory.

In a DataLoader worker a tensor is copied into shared memory when it is sent to the main
process (one more pass over every byte: at H=4096 it took the worker path of SpecForge's layout
from ~140k to ~20k tokens/s here). Allocated in shared memory from the start, the decoded
sample is sent as a file descriptor and never copied.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import get_worker_info

_TORCH = {np.dtype(d): torch.from_numpy(np.empty(0, dtype=d)).dtype
          for d in ("uint8", "int8", "uint16", "int16", "int32", "int64", "float32")}


def empty_tensor(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor, in shared memory inside a DataLoader worker."""
    if get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * torch.empty(0, dtype=dtype).element_size()
    raw = torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage._new_shared(nbytes))
    return raw.view(dtype).view(shape)


def empty(shape: tuple[int, ...], dtype: np.dtype | str) -> tuple[np.ndarray, torch.Tensor]:
    """:func:`empty_tensor` of a numpy dtype, with the numpy array over the same bytes."""
    tensor = empty_tensor(shape, _TORCH[np.dtype(dtype)])
    return tensor.numpy(), tensor
