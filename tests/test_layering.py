"""The package's layering, computed from the real imports (the AST of every module of speeder_rt):

- no cycle among speeder_rt's subpackages (a subpackage depends on another when one of its modules imports one of
  the other's). Command-line entry points (``__main__`` modules, ``speeder_rt/*.py``) sit above every package and
  are nodes of their own: nothing imports them. Imports under ``if TYPE_CHECKING:`` run only in the type checker
  and are left out;
- ``kernels`` imports nothing of speeder_rt above it (only itself and the compiled ``_C``);
- the runtime loads an ONNX export (with its ANN index, where faiss is installed) without the training stack:
  neither transformers, PyTorch nor ``speeder_rt.model`` is imported (a fresh interpreter, so nothing else has
  loaded them).
"""
import ast
import importlib.util
import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "speeder_rt"


def _node(module: str, path: Path) -> str:
    """The graph node of a module: its subpackage, or the module itself for an entry point."""
    parts = module.split(".")
    if path.name == "__main__.py" or (path.parent == PACKAGE and path.name != "__init__.py"):
        return module
    return parts[1] if len(parts) > 1 else "speeder_rt"


def _imports(tree: ast.AST) -> list[str]:
    """speeder_rt modules imported anywhere in ``tree`` (module level or inside functions), less TYPE_CHECKING
    blocks; ``from speeder_rt import x`` counts as ``speeder_rt.x``."""
    found: list[str] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.extend(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.extend([f"{node.module}.{a.name}" for a in node.names] if node.module == "speeder_rt"
                         else [node.module])
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return [name for name in found if name == "speeder_rt" or name.startswith("speeder_rt.")]


def import_graph() -> dict[str, set[str]]:
    """node -> the nodes it imports (itself left out)."""
    graph: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
        source = _node(module, path)
        targets = graph.setdefault(source, set())
        for name in _imports(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            parts = name.split(".")
            target = parts[1] if len(parts) > 1 else "speeder_rt"
            if target != source:
                targets.add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle_and_accepts_a_dag():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_the_graph_is_read_from_the_real_imports():
    graph = import_graph()
    assert {"model", "kernels", "export", "runtime", "train", "serve"} <= set(graph)
    assert "kernels" in graph["model"] and "export" in graph["runtime"] and "runtime" in graph["serve"]


def test_no_cycle_among_the_subpackages():
    graph = import_graph()
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


def test_kernels_import_nothing_above_them():
    assert import_graph()["kernels"] <= {"_C"}


def test_an_onnx_export_loads_without_the_training_stack(tmp_path):
    pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    from speeder_rt.export.format import (
        ENGINE_REPOSITORY,
        EXPORT_JSON,
        FORMAT_VERSION,
        VERSION_KEY,
        Ranges,
        artifact_files,
        io_specs,
    )
    from speeder_rt.export.items import write_item_tokens

    # A stand-in scoring graph with the export's inputs and outputs: scores = candidate_ids as float. What is under
    # test is what loading imports, not the graph.
    inputs = [helper.make_tensor_value_info("history_ids", TensorProto.INT64, ["batch", "history"]),
              helper.make_tensor_value_info("history_mask", TensorProto.BOOL, ["batch", "history"]),
              helper.make_tensor_value_info("candidate_ids", TensorProto.INT64, ["batch", "candidates"]),
              helper.make_tensor_value_info("item_tokens", TensorProto.FLOAT, ["num_items", 3])]  # unused here
    output = helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", "candidates"])
    graph = helper.make_graph([helper.make_node("Cast", ["candidate_ids"], ["scores"], to=TensorProto.FLOAT)],
                              "scores", inputs, [output])
    files = artifact_files("onnx", topk=False)
    (tmp_path / files["scores"]).parent.mkdir(parents=True)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / files["scores"])
    meta = {VERSION_KEY: FORMAT_VERSION, "engine": "onnx", "device": "cpu", "num_items": 50, "topk": 0,
            "ranges": asdict(Ranges(8, 5, 4)), "triton_repository": ENGINE_REPOSITORY,
            "graphs": {name: {"file": files[name], **spec} for name, spec in io_specs(0).items()}}
    (tmp_path / EXPORT_JSON).write_text(json.dumps(meta))
    tokens = np.random.default_rng(0).standard_normal((50, 3)).astype(np.float32)
    index = None  # with faiss: an ANN index in the version too, which loading reads (speeder_rt.catalog.ann)
    if importlib.util.find_spec("faiss"):
        from speeder_rt.catalog import ItemIndex

        index = ItemIndex.build(tokens, "exact")
    write_item_tokens(tmp_path, tokens, version=1, index=index)
    probe = ("import json, sys\n"
             "from speeder_rt.runtime import Recommender\n"
             "rec = Recommender.load(sys.argv[1])\n"
             "scores = rec.recommend([[1, 2], [3]], [[4, 5], [6, 7]]).tolist()\n"
             "print(json.dumps({'scores': scores, 'index': rec.index is not None, 'loaded': [m for m in "
             "('transformers', 'torch', 'speeder_rt.model', 'speeder_rt.export.exporter') if m in sys.modules]}))\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(PACKAGE.parent), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", probe, str(tmp_path)], capture_output=True, text=True, env=env,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["scores"] == [[4.0, 5.0], [6.0, 7.0]]  # the export really ran
    assert result["index"] == (index is not None)
    assert result["loaded"] == []


def test_export_json_reads_the_version_key_and_the_legacy_one(tmp_path):
    from speeder_rt.export.format import EXPORT_JSON, FORMAT_VERSION, LEGACY_VERSION_KEY, VERSION_KEY, read_export_json

    for key in (VERSION_KEY, LEGACY_VERSION_KEY):
        (tmp_path / EXPORT_JSON).write_text(json.dumps({key: FORMAT_VERSION, "engine": "onnx"}))
        assert read_export_json(tmp_path)["engine"] == "onnx"
    (tmp_path / EXPORT_JSON).write_text(json.dumps({VERSION_KEY: FORMAT_VERSION + 1, "engine": "onnx"}))
    with pytest.raises(ValueError, match=f"unknown export format {FORMAT_VERSION + 1} / engine 'onnx'"):
        read_export_json(tmp_path)
    (tmp_path / EXPORT_JSON).unlink()
    with pytest.raises(ValueError, match="not an export directory"):
        read_export_json(tmp_path)
