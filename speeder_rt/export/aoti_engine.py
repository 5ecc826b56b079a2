"""AOTInductor export: ``torch.export`` -> ``aoti_compile_and_package`` (``.pt2``) -> ``aoti_load_package``.

Each graph is its own package (``scores.pt2``, ``topk.pt2``, ``query.pt2`` with an ANN index) with plain tensor
inputs and a flat list of outputs, so C++ loads it with ``torch::inductor::AOTIModelPackageLoader(path)`` and calls ``run({history_ids,
history_mask, candidate_ids})``. A package is compiled for one device type (the export's ``--device``).
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from speeder_rt.export.format import Ranges
from speeder_rt.export.module_runner import ModuleRunner


def export_aoti(graph: nn.Module, args: tuple[torch.Tensor, ...], ranges: Ranges, topk: bool, path: Path) -> None:
    """Compile ``graph`` into the package ``path`` (``.pt2``)."""
    from speeder_rt.export.graph import export_program  # the model: only to export, not to load a package

    program = export_program(graph, args, ranges, topk)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch._inductor.aoti_compile_and_package(program, package_path=str(path))


class AotiRunner(ModuleRunner):
    """The AOTInductor packages, loaded; inputs are moved to the package's device."""

    def __init__(self, scores_path: Path, topk_path: Path | None, topk_k: int, device: str = "cpu",
                 query_path: Path | None = None) -> None:
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"this AOTInductor package was compiled for {device}; no CUDA device is available here")
        topk = torch._inductor.aoti_load_package(str(topk_path)) if topk_path is not None else None
        query = torch._inductor.aoti_load_package(str(query_path)) if query_path is not None else None
        super().__init__(torch._inductor.aoti_load_package(str(scores_path)), topk, topk_k, device, query)
