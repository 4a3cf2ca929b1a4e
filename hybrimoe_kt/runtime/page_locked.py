"""Host buffers page-locked for CUDA, of exactly the requested size.

``page_locked_buffer(nbytes)`` allocates ordinary host memory (a numpy array, page aligned) and
registers it with the CUDA driver (``cudaHostRegister``), so host-to-device copies from it are real DMA
(``copy_(..., non_blocking=True)`` returns before the bytes have moved) and ``Tensor.is_pinned()`` is
true for tensors over it. The registration is undone when the last view of the buffer is freed.

torch's own pinned allocator (``pin_memory=True``) rounds an allocation up to a power of two, which can
cost almost twice the bytes for one large tensor; a registered buffer costs its size plus at most one
page for the alignment.
"""

from __future__ import annotations

import mmap
import weakref

import numpy as np
import torch

PAGE = mmap.PAGESIZE
HOST_REGISTER_PORTABLE = 1  # cudaHostRegisterPortable: pinned for every CUDA context of the process


def _unregister(cudart: object, ptr: int) -> None:
    err = int(cudart.cudaHostUnregister(ptr))  # type: ignore[attr-defined]
    if err != 0:
        raise RuntimeError(f"cudaHostUnregister of the host buffer at {ptr:#x} failed with cudaError {err}")


def page_locked_buffer(nbytes: int) -> np.ndarray:
    """A writeable uint8 ``[nbytes]`` host buffer, page-locked for CUDA while any view of it lives."""
    if nbytes < 1:
        raise ValueError(f"a page-locked buffer needs at least one byte, got {nbytes}")
    if not torch.cuda.is_available():
        raise RuntimeError("page-locked (pinned) host memory needs CUDA, which is not available here "
                           "(torch.cuda.is_available() is False); the CPU stand-in uses pageable memory")
    cudart = torch.cuda.cudart()
    owner = np.empty(nbytes + PAGE, dtype=np.uint8)
    start = -owner.ctypes.data % PAGE
    buf = owner[start: start + nbytes]  # every view of buf keeps owner alive (numpy's base)
    ptr = buf.ctypes.data
    err = int(cudart.cudaHostRegister(ptr, nbytes, HOST_REGISTER_PORTABLE))
    if err != 0:
        raise RuntimeError(f"cudaHostRegister of {nbytes} host bytes failed with cudaError {err} (an "
                           f"earlier asynchronous CUDA error shows up here too)")
    done = weakref.finalize(owner, _unregister, cudart, ptr)  # runs before numpy frees owner's memory
    done.atexit = False  # at exit the process's memory goes with it; CUDA may already be shut down
    return buf
