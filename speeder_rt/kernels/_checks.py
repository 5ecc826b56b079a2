"""Argument checks shared by the kernels' public functions (run before any launch), and the target's limits."""
from __future__ import annotations

import os

import torch

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# Shared memory one block may use on sm_90 (H100 / H200): 227 KiB. Configs are pruned and checked against it.
SM90_SMEM_LIMIT = 232448


def _backport_interpreter_loop_bounds() -> None:
    """Triton < 3.7's interpreter turns a runtime scalar (a 1-element array) into a loop bound with ``int(array)``,
    which numpy >= 2.4 refuses ("only 0-dimensional arrays can be converted to Python scalars"), so every kernel
    loop ``range(lo, hi, BLOCK)`` over runtime bounds fails under TRITON_INTERPRET=1 with Triton 3.6 (the GPU image's
    version) and numpy 2.4 / 2.5; compiled kernels are not affected. Triton 3.7 squeezes the array first
    (triton-lang/triton#9172); this applies that one change to the interpreter of older versions. It goes when the
    Triton floor in setup.py reaches 3.7."""
    import triton
    from triton.runtime import interpreter

    if tuple(int(part) for part in triton.__version__.split(".")[:2]) >= (3, 7):
        return
    patch_tensor = interpreter._patch_lang_tensor

    def patch_tensor_with_squeezed_index(tensor, scope) -> None:
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    interpreter._patch_lang_tensor = patch_tensor_with_squeezed_index


if INTERPRET:
    _backport_interpreter_loop_bounds()


def shape(t: torch.Tensor) -> list[int]:
    return list(t.shape)


def check_tensors_on_one_device(named: dict[str, torch.Tensor], anchor: str) -> None:
    """Every value is a tensor on ``named[anchor]``'s device, which is CUDA (or any under TRITON_INTERPRET=1);
    otherwise a ValueError naming the argument and its shape."""
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    device = named[anchor].device
    for name, t in named.items():
        if t.device != device:
            raise ValueError(f"{name} (shape {shape(t)}) is on {t.device} but {anchor} is on {device}")
    if device.type != "cuda" and not INTERPRET:
        raise ValueError(f"{anchor} (shape {shape(named[anchor])}) is on {device}; the kernels need CUDA tensors or "
                         "TRITON_INTERPRET=1")


def unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when its last dimension is contiguous (or it is a scalar), else a contiguous copy: the
    kernels address the last dimension with unit stride and take every other stride as given, so e.g.
    transposed [B, L, H, D] attention views are used in place."""
    return t if t.dim() == 0 or t.stride(-1) == 1 else t.contiguous()
