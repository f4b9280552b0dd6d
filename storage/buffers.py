"""Output buffers for decoded samples: numpy to decode into, torch to hand out, same memory.

Two costs of a fresh buffer per sample, measured at H=4096 (a 1,100-token sample is ~30 MB):

- Page faults. glibc serves allocations over 32 MiB (and many smaller ones, once trimmed) with a
  fresh mmap, and the kernel zeroes every 4 KiB page on first touch: reading the ``none`` codec
  into fresh memory ran at ~57k tokens per CPU-second vs ~104k into reused memory (one thread,
  busy 2-core machine). So in the main process buffers of 1 MiB and more come from a pool: a
  buffer goes back to it when the last tensor or array over it is freed (no caller ever sees
  memory that is still in use), and is handed out again already faulted in and often in cache.
- In a DataLoader worker a tensor is copied into shared memory when it is sent to the main
  process (one more pass over every byte: it took the worker path of SpecForge's layout from
  ~140k to ~20k tokens/s here). There the buffer is allocated in shared memory from the start,
  and the decoded sample is sent as a file descriptor, never copied.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import torch
from torch.utils.data import get_worker_info

_TORCH = {np.dtype(d): torch.from_numpy(np.empty(0, dtype=d)).dtype
          for d in ("uint8", "int8", "uint16", "int16", "int32", "int64", "float32")}
POOL_MIN_BYTES = 1 << 20  # smaller buffers come from malloc's bins, already cheap
POOL_MAX_BYTES = 1 << 28  # idle memory the pool keeps at most: a few 2,000-token samples at H=4096


class _Pool:
    """Idle buffers by power-of-two size class."""

    def __init__(self) -> None:
        self.free: dict[int, list[np.ndarray]] = {}
        self.idle = 0
        self.lock = threading.Lock()

    def take(self, nbytes: int) -> np.ndarray:
        size = 1 << (nbytes - 1).bit_length()
        with self.lock:
            idle = self.free.get(size)
            if idle:
                self.idle -= size
                return idle.pop()
        return np.empty(size, dtype=np.uint8)

    def give(self, mem: np.ndarray) -> None:
        with self.lock:
            if self.idle + mem.nbytes <= POOL_MAX_BYTES:
                self.free.setdefault(mem.nbytes, []).append(mem)
                self.idle += mem.nbytes


_POOL = _Pool()


class _Lease:
    """Exposes one pooled buffer to numpy; numpy arrays (and the tensors over them) keep it
    alive, and it returns the buffer to the pool when the last of them is gone."""

    def __init__(self, mem: np.ndarray):
        self.mem = mem
        self.__array_interface__: dict[str, Any] = {
            "shape": (mem.nbytes,), "typestr": "|u1", "data": (mem.ctypes.data, False), "version": 3}

    def __del__(self) -> None:
        if _POOL is not None:  # None while the interpreter shuts down
            _POOL.give(self.mem)


def empty_tensor(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor, in shared memory inside a DataLoader worker."""
    if get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * torch.empty(0, dtype=dtype).element_size()
    raw = torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage._new_shared(nbytes))
    return raw.view(dtype).view(shape)


def empty(shape: tuple[int, ...], dtype: np.dtype | str) -> tuple[np.ndarray, torch.Tensor]:
    """An uninitialised array and the tensor over the same bytes: pooled in the main process
    (from 1 MiB), in shared memory inside a DataLoader worker."""
    dt = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
    if nbytes < POOL_MIN_BYTES or get_worker_info() is not None:
        tensor = empty_tensor(shape, _TORCH[dt])
        return tensor.numpy(), tensor
    arr = np.asarray(_Lease(_POOL.take(nbytes)))[:nbytes].view(dt).reshape(shape)
    return arr, torch.from_numpy(arr)
