"""The ops' registration with ``torch.library`` and their kernel launches.

Each op's host code (allocations + launches) is registered as ``torch.ops.speeder_triton.<name>`` with
``torch.library.triton_op`` and its launches go through ``torch.library.wrap_triton``: torch.compile and
torch.export then trace through the op instead of breaking the graph, and Inductor / AOTInductor can carry the
kernels themselves. The op's fake (meta) implementation is its own body, which on FakeTensors only allocates.

Under ``TRITON_INTERPRET=1`` the kernels are interpreted Python, which cannot be traced: the op is then an opaque
``torch.library.custom_op`` with the same body as its fake implementation, launches on FakeTensors are skipped
(only the outputs' shapes, dtypes and strides matter there), and torch.compile / torch.export keep the op as one
node that runs eagerly.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch._subclasses.fake_tensor import is_fake

from speeder_rt.kernels._checks import INTERPRET

NAMESPACE = "speeder_triton"

__all__ = ["NAMESPACE", "launch", "register_op"]


def register_op(name: str, fn: Callable):
    """``fn`` (type-annotated, functional: it allocates its outputs) as ``torch.ops.speeder_triton.<name>``."""
    qualname = f"{NAMESPACE}::{name}"
    if INTERPRET:
        op = torch.library.custom_op(qualname, fn, mutates_args=())
        op.register_fake(fn)
        return op
    return torch.library.triton_op(qualname, fn, mutates_args=())


def launch(kernel, grid, args: Sequence, meta: dict, configs: Sequence | None = None, prune: Callable | None = None,
           deterministic: bool = False) -> None:
    """``kernel[grid](*args, **meta)`` through ``wrap_triton``.

    For an autotuned kernel with ``deterministic``: no autotuning, but the first of ``configs`` that ``prune`` (the
    autotuner's own early pruner, if it has one) keeps for these arguments, launched on the kernel's ``@triton.jit``
    function; the config, and with it every summation order, is then a function of the shapes alone.
    """
    if INTERPRET and any(is_fake(a) for a in args if isinstance(a, torch.Tensor)):
        return
    if deterministic and configs is not None:
        kept = list(configs) if prune is None else prune(list(configs), dict(zip(kernel.arg_names, args)), **meta)
        config = kept[0]
        kernel = kernel.fn
        meta = {**meta, **config.all_kwargs()}
    torch.library.wrap_triton(kernel)[grid](*args, **meta)
