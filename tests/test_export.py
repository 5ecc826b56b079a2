"""Export (ONNX, AOTInductor, TensorRT), parity reports, Triton repositories, the CLI and the Recommender runtime."""
import json
import re
import shutil

import numpy as np
import pytest
import torch
from bad_requests import BAD_REQUESTS

from speeder_rt.export import __main__ as cli
from speeder_rt.export import onnx_engine, trt_engine
from speeder_rt.export.exporter import export_checkpoint, load_speeder
from speeder_rt.export.graph import ParityCase
from speeder_rt.export.items import read_item_tokens
from speeder_rt.runtime import Recommender
from speeder_rt.train.config import run_config_from_dict
from speeder_rt.train.data import prepare
from speeder_rt.train.trainer import Trainer

RANGES = dict(max_batch=4, max_history=8, max_candidates=20, topk=5)  # the model's max_history is 12


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A briefly trained tiny Speeder with LoRA (the export merges it): the run's best/ model directory."""
    tmp = tmp_path_factory.mktemp("run")
    cfg = run_config_from_dict({
        "out_dir": str(tmp),
        "data": {"source": "synthetic", "synthetic": {"n_items": 120, "n_users": 80, "seed": 1},
                 "split": {"short_users": "drop"}, "collab_features": False},
        "model": {"backbone": {"shape": "tiny", "lora": {"rank": 4}}, "modalities": ["text", "image"], "d_expert": 32,
                  "max_history": 12},
        "mpo": [{"name": "text", "modalities": ["text"], "epochs": 1, "lr": 0.003}],
        "train": {"batch_size": 32, "max_train_samples_per_epoch": 64, "progress": False},
    })
    trainer = Trainer("speeder", cfg, *prepare(cfg, log=lambda *_: None), log=lambda *_: None)
    trainer.run()
    return trainer.out / "best"


@pytest.fixture(scope="module")
def model(ckpt):
    return load_speeder(ckpt)


@pytest.fixture(scope="module")
def onnx_dir(ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx") / "export"
    export_checkpoint(ckpt, "onnx", out, log=lambda *_: None, **RANGES)
    return out


@pytest.fixture(scope="module")
def aoti_dir(ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("aoti") / "export"
    export_checkpoint(ckpt, "aoti", out, device="cpu", log=lambda *_: None, **RANGES)
    return out


def reference_scores(model, histories, candidates):
    table = model.item_token_table()
    width = max(map(len, histories))
    h = torch.tensor([list(r) + [-1] * (width - len(r)) for r in histories])
    with torch.no_grad():
        return model(h, torch.tensor([len(r) for r in histories]), torch.tensor(candidates), item_tokens=table).numpy()


def reference_topk(model, history, k):
    with torch.no_grad():  # one row at a time: no padding in the reference's own history exclusion
        ids, scores = model.topk(torch.tensor([history]), torch.tensor([len(history)]), k, model.item_token_table())
    return ids[0].numpy(), scores[0].numpy()


def read_json(path):
    return json.loads(path.read_text())


# -- ONNX ------------------------------------------------------------------------------------------
def test_onnx_export_passes_parity_over_the_ranges_and_the_full_checker(onnx_dir):
    import onnx

    parity = read_json(onnx_dir / "parity.json")
    assert parity["passed"] and parity["atol"] == 1e-4
    shapes = {(c["batch"], c["history"], c["candidates"]) for c in parity["scores"]["cases"]}
    assert {(1, 1, 1), (4, 8, 20)} <= shapes
    assert any(len(set(c["history_lengths"])) > 1 for c in parity["scores"]["cases"])  # ragged rows
    assert parity["scores"]["max_abs_error"] < 1e-4 and parity["scores"]["top1_agreement"] == 1.0
    assert parity["topk"]["k"] == 5 and parity["topk"]["passed"]
    meta = read_json(onnx_dir / "export.json")
    assert meta["engine"] == "onnx" and meta["num_items"] == 120 and meta["model_kind"] == "speeder"
    assert meta["ranges"] == {"max_batch": 4, "max_history": 8, "max_candidates": 20}
    assert {"torch", "transformers", "onnx", "onnxruntime"} <= set(meta["versions"])
    for graph in meta["graphs"].values():
        onnx.checker.check_model(str(onnx_dir / graph["file"]), full_check=True)
        proto = onnx.load(str(onnx_dir / graph["file"]), load_external_data=False)
        for value, spec in zip([*proto.graph.input, *proto.graph.output], graph["inputs"] + graph["outputs"]):
            dims = [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
            assert (value.name, dims) == (spec["name"], spec["shape"])


def parse_pbtxt(text):
    """A strict parser for the protobuf text-format subset the exporter writes: fields -> lists of values."""
    tokens = re.findall(r'"[^"]*"|-?\d+|[A-Za-z_][A-Za-z0-9_]*|[{}\[\]:,]|\S', text)
    pos = 0

    def take(expected=None):
        nonlocal pos
        tok = tokens[pos]
        if expected is not None and tok != expected:
            raise ValueError(f"expected {expected!r}, got {tok!r} at token {pos}")
        pos += 1
        return tok

    def value():
        tok = take()
        if tok == "{":
            return message("}")
        if tok.startswith('"'):
            return tok[1:-1]
        if re.fullmatch(r"-?\d+", tok):
            return int(tok)
        if re.fullmatch(r"[A-Z_][A-Z0-9_]*", tok):
            return tok  # an enum
        raise ValueError(f"bad value {tok!r}")

    def message(end):
        fields = {}
        while pos < len(tokens) and tokens[pos] != end:
            name = take()
            if not re.fullmatch(r"[a-z_]+", name):
                raise ValueError(f"bad field name {name!r}")
            if tokens[pos] == ":":
                take(":")
            if tokens[pos] == "[":
                take("[")
                items = []
                while tokens[pos] != "]":
                    items.append(value())
                    if tokens[pos] == ",":
                        take(",")
                take("]")
                fields.setdefault(name, []).extend(items)
            else:
                fields.setdefault(name, []).append(value())
        if end != "eof":
            take(end)
        return fields

    return message("eof")


def test_triton_config_parses_and_matches_the_onnx_graphs(onnx_dir):
    import onnx

    meta = read_json(onnx_dir / "export.json")
    for graph, triton_name in (("scores", "speeder"), ("topk", "speeder_topk")):
        text = (onnx_dir / "model_repository" / triton_name / "config.pbtxt").read_text()
        cfg = parse_pbtxt(text)
        assert cfg["name"] == [triton_name] and cfg["platform"] == ["onnxruntime_onnx"]
        assert cfg["max_batch_size"] == [4] and cfg["dynamic_batching"] == [{"max_queue_delay_microseconds": [2000]}]
        assert cfg["instance_group"] == [{"count": [1], "kind": ["KIND_CPU"]}]
        assert meta["graphs"][graph]["file"] == f"model_repository/{triton_name}/1/model.onnx"
        proto = onnx.load(str(onnx_dir / meta["graphs"][graph]["file"]), load_external_data=False)
        types = {onnx.TensorProto.INT64: "TYPE_INT64", onnx.TensorProto.BOOL: "TYPE_BOOL", onnx.TensorProto.FLOAT: "TYPE_FP32"}
        defaults = {t.name for t in proto.graph.initializer}
        assert "item_tokens" in defaults  # the table input has the export-time table as its default
        requested = [v for v in proto.graph.input if v.name not in defaults]  # what a request carries
        for kind, values in (("input", requested), ("output", proto.graph.output)):
            want = [(v.name, types[v.type.tensor_type.elem_type],
                     [d.dim_value if d.HasField("dim_value") else -1 for d in v.type.tensor_type.shape.dim][1:])
                    for v in values]
            got = [(t["name"][0], t["data_type"][0], t["dims"]) for t in cfg[kind]]
            assert got == want
        try:  # the real schema, where tritonclient is installed (the 'serve' extra)
            from google.protobuf import text_format
            from tritonclient.grpc import model_config_pb2
        except ImportError:
            continue
        text_format.Parse(text, model_config_pb2.ModelConfig())
    topk_cfg = parse_pbtxt((onnx_dir / "model_repository" / "speeder_topk" / "config.pbtxt").read_text())
    assert [t["dims"] for t in topk_cfg["output"]] == [[5], [5]]


def test_pbtxt_parser_is_strict():
    with pytest.raises((ValueError, IndexError)):
        parse_pbtxt('name: "x"\ninput [ { name: "a" dims: [ -1 }\n')
    with pytest.raises(ValueError):
        parse_pbtxt('Name: "x"')


# -- AOTInductor -------------------------------------------------------------------------------------
@pytest.mark.slow
def test_aoti_export_reloads_and_passes_parity(aoti_dir):
    parity = read_json(aoti_dir / "parity.json")
    assert parity["passed"] and parity["scores"]["max_abs_error"] < 1e-4 and parity["topk"]["passed"]
    meta = read_json(aoti_dir / "export.json")
    assert meta["engine"] == "aoti" and meta["triton_repository"] is None
    assert sorted(p.name for p in aoti_dir.iterdir()) == ["export.json", "items", "model_repository_python",
                                                          "parity.json", "scores.pt2", "topk.pt2"]
    package = torch._inductor.aoti_load_package(str(aoti_dir / "scores.pt2"))  # plain tensors in, flat outputs
    table = torch.from_numpy(read_item_tokens(aoti_dir).tokens)
    out = package(torch.tensor([[3, 4, -1]]), torch.tensor([[True, True, False]]), torch.tensor([[1, 2]]), table)
    assert out.shape == (1, 2) and out.dtype == torch.float32


# -- Recommender -------------------------------------------------------------------------------------
HISTORIES = [[3, 17, 5], [8], [0, 1, 2, 3, 4, 5, 6, 7], [44, 0], [9, 9, 10], [119]]  # 6 users > max batch 4
CANDIDATES = np.random.default_rng(0).integers(0, 120, size=(6, 7))


def test_recommender_threads_set_onnx_runtimes_threads_and_keep_the_scores(onnx_dir):
    """``threads``: what the Python backend passes (one process per instance): ORT's intra-op threads, no
    spin-waiting, the same scores."""
    one = Recommender.load(onnx_dir, threads=1)
    for session in (one.runner._scores, one.runner._topk):
        options = session.get_session_options()
        assert (options.intra_op_num_threads, options.inter_op_num_threads) == (1, 1)
        assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    default = Recommender.load(onnx_dir)
    np.testing.assert_array_equal(one.recommend(HISTORIES, CANDIDATES), default.recommend(HISTORIES, CANDIDATES))
    np.testing.assert_array_equal(one.topk(HISTORIES, k=3)[0], default.topk(HISTORIES, k=3)[0])
    with pytest.raises(ValueError, match="threads must be >= 1, got 0"):
        Recommender.load(onnx_dir, threads=0)


@pytest.mark.parametrize("engine", ["onnx", pytest.param("aoti", marks=pytest.mark.slow)])
def test_recommender_serves_the_export_like_the_pytorch_model(engine, model, request):
    rec = Recommender.load(request.getfixturevalue(f"{engine}_dir"))
    assert rec.engine == engine and rec.max_topk == 5
    scores = rec.recommend(HISTORIES, CANDIDATES)
    np.testing.assert_allclose(scores, reference_scores(model, HISTORIES, CANDIDATES), rtol=1e-4, atol=1e-4)
    padded = torch.tensor([r + [-1] * (8 - len(r)) for r in HISTORIES])  # tensors padded with negative ids
    np.testing.assert_array_equal(rec.recommend(padded, torch.from_numpy(CANDIDATES)), scores)
    ids, top = rec.topk(HISTORIES, k=3)
    assert ids.shape == top.shape == (6, 3) and ids.dtype == np.int64 and top.dtype == np.float32
    for row, history in enumerate(HISTORIES):
        want_ids, want_scores = reference_topk(model, history, 3)
        np.testing.assert_array_equal(ids[row], want_ids)
        np.testing.assert_allclose(top[row], want_scores, rtol=1e-4, atol=1e-4)
        assert not set(ids[row]) & set(history)  # seen items are excluded (item 0 with padding too)


def test_recommender_from_a_checkpoint_runs_pytorch(ckpt, model):
    rec = Recommender.load(ckpt, max_topk=4)
    assert rec.engine == "torch" and rec.max_topk == 4
    np.testing.assert_allclose(rec.recommend(HISTORIES, CANDIDATES), reference_scores(model, HISTORIES, CANDIDATES),
                               rtol=1e-4, atol=1e-4)
    assert np.array_equal(rec.topk([[3, 17, 5]], k=4)[0][0], reference_topk(model, [3, 17, 5], 4)[0])


@pytest.mark.parametrize("history, candidates, message", BAD_REQUESTS)
def test_recommender_rejects_invalid_requests(onnx_dir, history, candidates, message):
    rec = Recommender.load(onnx_dir)
    with pytest.raises(ValueError, match=message):
        rec.recommend(history, candidates)


def test_recommender_topk_k_and_load_errors(onnx_dir, tmp_path):
    rec = Recommender.load(onnx_dir)
    with pytest.raises(ValueError, match=r"^k: 6 is outside 1..max_topk=5$"):
        rec.topk([[1]], k=6)
    with pytest.raises(ValueError, match="neither an export directory .* nor a model directory"):
        Recommender.load(tmp_path)
    with pytest.raises(ValueError, match=r"missing: not found \(expected a model directory"):
        Recommender.load(tmp_path / "missing")


# -- CLI ---------------------------------------------------------------------------------------------
def run_cli(capsys, *args):
    code = cli.main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def leftovers(parent):
    return sorted(p.name for p in parent.iterdir())


def test_cli_refuses_an_existing_out_without_force(ckpt, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep").write_text("x")
    code, text = run_cli(capsys, "--checkpoint", ckpt, "--engine", "onnx", "--out", out)
    assert code == 2 and "already exists (pass --force" in text
    assert leftovers(out) == ["keep"]


@pytest.mark.parametrize("flags, message", [
    (["--max-history", "13"], "--max-history 13 exceeds the model's max_history=12"),
    (["--max-candidates", "0"], "--max-candidates must be >= 1"),
    (["--max-history", "0"], "--max-history must be >= 1"),
    (["--max-batch", "0"], "--max-batch must be >= 1"),
    (["--topk", "121"], "--topk 121 exceeds the catalog size 120"),
])
def test_cli_bad_ranges_exit_2_and_write_nothing(ckpt, tmp_path, capsys, flags, message):
    code, text = run_cli(capsys, "--checkpoint", ckpt, "--engine", "onnx", "--out", tmp_path / "out", *flags)
    assert code == 2 and message in text
    assert leftovers(tmp_path) == []


def test_cli_checkpoint_errors_exit_2(ckpt, tmp_path, capsys):
    code, text = run_cli(capsys, "--checkpoint", tmp_path / "missing", "--engine", "onnx", "--out", tmp_path / "o")
    assert code == 2 and "missing: not found" in text
    corrupt = tmp_path / "corrupt"
    shutil.copytree(ckpt, corrupt)
    weights = corrupt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    code, text = run_cli(capsys, "--checkpoint", corrupt, "--engine", "onnx", "--out", tmp_path / "o")
    assert code == 2 and "model.safetensors: tensor" in text and "(file truncated)" in text
    baseline = tmp_path / "baseline"
    shutil.copytree(ckpt, baseline)
    config = json.loads((baseline / "config.json").read_text())
    (baseline / "config.json").write_text(json.dumps({**config, "model_kind": "text_baseline"}))
    code, text = run_cli(capsys, "--checkpoint", baseline, "--engine", "onnx", "--out", tmp_path / "o")
    assert code == 2 and "only Speeder models export" in text
    assert not (tmp_path / "o").exists()


def test_cli_trt_without_tensorrt_says_what_to_install_before_reading_the_checkpoint(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(trt_engine, "available", lambda: False)
    code, text = run_cli(capsys, "--checkpoint", tmp_path / "missing", "--engine", "trt", "--out", tmp_path / "o")
    assert code == 2 and "pip install tensorrt" in text and "onnx, aoti" in text
    assert "not found" not in text and leftovers(tmp_path) == []


def _failing_parity(monkeypatch):
    import speeder_rt.export.exporter as export

    real = export.check_parity

    def fail(*args, **kwargs):
        report = real(*args, **kwargs)
        report.scores[0] = ParityCase(1, 1, 1, [1], max_abs_error=9.0, max_rel_error=9.0, passed=False)
        return report

    monkeypatch.setattr(export, "check_parity", fail)


def test_failed_parity_exits_1_shows_the_numbers_and_leaves_nothing(ckpt, tmp_path, capsys, monkeypatch):
    _failing_parity(monkeypatch)
    code, text = run_cli(capsys, "--checkpoint", ckpt, "--engine", "onnx", "--out", tmp_path / "out", "--topk", "0",
                         "--max-batch", "2", "--max-history", "4", "--max-candidates", "3")
    assert code == 1 and "max_abs=9.000e+00" in text and "FAIL" in text and "nothing written" in text
    assert leftovers(tmp_path) == []


def test_allow_mismatch_keeps_the_export_with_external_data(ckpt, model, tmp_path, capsys, monkeypatch):
    _failing_parity(monkeypatch)
    monkeypatch.setattr(onnx_engine, "EXTERNAL_DATA_BYTES", 0)  # exercise the > 2 GB layout on a tiny model
    out = tmp_path / "out"
    code, text = run_cli(capsys, "--checkpoint", ckpt, "--engine", "onnx", "--out", out, "--topk", "0",
                         "--max-batch", "2", "--max-history", "4", "--max-candidates", "3", "--allow-mismatch")
    assert code == 0 and "kept because of --allow-mismatch" in text
    assert read_json(out / "parity.json")["passed"] is False and read_json(out / "export.json")["topk"] == 0
    version_dir = out / "model_repository" / "speeder" / "1"
    assert sorted(p.name for p in version_dir.iterdir()) == ["model.onnx", "model.onnx.data", "model.onnx.items"]
    assert not (out / "model_repository" / "speeder_topk").exists()
    rec = Recommender.load(out)
    np.testing.assert_allclose(rec.recommend([[5, 6], [7]], [[1, 2, 3], [4, 5, 6]]),
                               reference_scores(model, [[5, 6], [7]], [[1, 2, 3], [4, 5, 6]]), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="no top-k graph"):
        rec.topk([[1]], k=1)
    code, text = run_cli(capsys, "--checkpoint", ckpt, "--engine", "onnx", "--out", out, "--force", "--topk", "0",
                         "--max-batch", "2", "--max-history", "4", "--max-candidates", "3")
    assert code == 1 and (out / "parity.json").exists()  # a failed --force leaves the old export in place
    assert leftovers(tmp_path) == ["out"]


# -- TensorRT ----------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not trt_engine.available(), reason="tensorrt is not installed (pip install tensorrt on a CUDA machine)")
def test_trt_export_builds_plans_and_serves(ckpt, model, tmp_path):
    out = tmp_path / "trt"
    export_checkpoint(ckpt, "trt", out, log=print, **RANGES)
    assert read_json(out / "parity.json")["passed"]
    cfg = parse_pbtxt((out / "model_repository" / "speeder" / "config.pbtxt").read_text())
    assert cfg["platform"] == ["tensorrt_plan"] and (out / "model_repository" / "speeder" / "1" / "model.plan").is_file()
    rec = Recommender.load(out)
    np.testing.assert_allclose(rec.recommend(HISTORIES, CANDIDATES), reference_scores(model, HISTORIES, CANDIDATES),
                               rtol=1e-3, atol=1e-3)
