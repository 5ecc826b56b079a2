"""Model directories (speeder_rt.model.pretrained): no loader runs code from a file, every safetensors file is checked,
save -> load is exact, eval reads only the directory, and old pickled checkpoints convert (speeder_rt.convert)."""
import copy
import json
import os
import pickle
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from speeder_rt import convert as convert_cli
from speeder_rt.eval import __main__ as eval_cli
from speeder_rt.export import __main__ as export_cli
from speeder_rt.model import SpeederModel
from speeder_rt.runtime import Recommender
from speeder_rt.train import __main__ as train_cli
from speeder_rt.train.config import run_config_from_dict
from speeder_rt.train.data import prepare
from speeder_rt.train.resume import load_named_optimizer_state, named_optimizer_state
from speeder_rt.train.trainer import Trainer
from speeder_rt.utils.readers import read_safetensors

RUN = {
    "out_dir": "runs/demo",  # relative, as in configs/demo.yaml: resolved against the training directory
    "data": {"source": "synthetic", "synthetic": {"n_items": 120, "n_users": 80, "seed": 1},
             "split": {"short_users": "drop"}, "sasrec": {"epochs": 2, "eval_every": 1}},
    "model": {"backbone": {"shape": "tiny", "lora": {"rank": 4}}, "modalities": ["text", "collab"], "d_expert": 32,
              "max_history": 12},
    "mpo": [{"name": "text", "modalities": ["text"], "epochs": 1, "lr": 0.003},
            {"name": "text+collab", "modalities": ["text", "collab"], "epochs": 1, "lr": 0.003, "warmup_steps": 2}],
    "train": {"batch_size": 32, "max_train_samples_per_epoch": 64, "progress": False},
}


def text_only(out_dir: Path):
    """RUN with text features only and one MPO stage (no SASRec to train), writing into ``out_dir``."""
    return run_config_from_dict({**RUN, "out_dir": str(out_dir), "model": {**RUN["model"], "modalities": ["text"]},
                                 "mpo": RUN["mpo"][:1]})


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A short Speeder run (SASRec collab features, LoRA kept) trained in its own directory: (that dir, best/)."""
    home = tmp_path_factory.mktemp("train_home")
    cwd = os.getcwd()
    os.chdir(home)
    try:
        cfg = run_config_from_dict(RUN)
        trainer = Trainer("speeder", cfg, *prepare(cfg, log=lambda *_: None), log=lambda *_: None)
        trainer.run()
    finally:
        os.chdir(cwd)
    return home, home / "runs" / "demo" / "speeder" / "best"


@pytest.fixture(scope="module")
def best(run):
    return run[1]


class Payload:
    """Unpickling it creates ``marker``: a stand-in for a command an attacker's pickle would run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


@pytest.fixture(params=["pickle", "torch.save"])
def evil(request, tmp_path):
    """(a code-carrying checkpoint file, the marker file its payload creates when unpickled)."""
    marker = tmp_path / "payload_ran"
    path = tmp_path / "best.pt"
    if request.param == "pickle":
        path.write_bytes(pickle.dumps({"kind": "speeder", "model": Payload(marker)}))
    else:
        torch.save({"kind": "speeder", "model": Payload(marker)}, path)
    control = tmp_path / "control"  # the payload is live: plain unpickling does run it
    if request.param == "pickle":
        pickle.loads(pickle.dumps({"model": Payload(control)}))
    else:
        torch.save({"model": Payload(control)}, tmp_path / "control.pt")
        torch.load(tmp_path / "control.pt", weights_only=False)
    assert control.exists()
    return path, marker


def refused(text: str, path: Path) -> bool:
    return (f"{path}: a pickled checkpoint" in text and "never unpickles" in text
            and f"python -m speeder_rt.convert {path} NEW_DIR --trust-pickle" in text)


# -- no loader runs code from a file --------------------------------------------------------------------------
def test_every_loader_refuses_a_code_carrying_pickle_unread(evil, tmp_path, tmp_path_factory, capsys):
    from speeder_rt.baselines.text_item import TextItemBaseline

    path, marker = evil
    for call in (SpeederModel.from_pretrained, TextItemBaseline.from_pretrained, Recommender.load):
        with pytest.raises(ValueError) as e:
            call(path)
        assert refused(str(e.value), path), e.value
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(RUN))
    cfg = text_only(tmp_path_factory.mktemp("run"))
    trainer = Trainer("speeder", cfg, *prepare(cfg, log=lambda *_: None), log=lambda *_: None)
    with pytest.raises(ValueError) as e:
        trainer.resume(path)
    assert refused(str(e.value), path)
    for cli, argv in ((eval_cli, ["--checkpoint", path]), (export_cli, ["--checkpoint", path, "--engine", "onnx",
                                                                        "--out", tmp_path / "export"]),
                      (train_cli, ["--config", config, "--resume", path])):
        assert cli.main([str(a) for a in argv]) == 2
        assert refused(capsys.readouterr().err, path)
    assert convert_cli.main([str(path), str(tmp_path / "converted")]) == 2  # no --trust-pickle: not opened
    assert "pass --trust-pickle only for a file you" in capsys.readouterr().err
    assert convert_cli.main([str(path), str(tmp_path / "converted"), "--trust-pickle"]) == 2
    assert "needs code to unpickle, which no speeder_rt checkpoint does; refused" in capsys.readouterr().err
    assert not marker.exists()
    written = {p.name for p in tmp_path.iterdir()} - {"best.pt", "run.yaml", "control", "control.pt"}
    assert written == set()  # no export, no converted directory, no marker


def test_other_paths_get_clear_errors(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match=r"notes\.txt: a file, not a model directory"):
        SpeederModel.from_pretrained(tmp_path / "notes.txt")
    with pytest.raises(ValueError, match=r"nowhere: not found \(expected a model directory"):
        SpeederModel.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(ValueError, match=r"not a model directory \(no config.json"):
        SpeederModel.from_pretrained(tmp_path)


# -- checked safetensors ---------------------------------------------------------------------------------------
def rewrite_header(file: Path, edit) -> None:
    """Apply ``edit`` to the parsed header of a safetensors file and write it back over the same body."""
    raw = file.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    edit(header)
    new = json.dumps(header).encode()
    file.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n :])


def first_cut(file: Path, cut: int) -> str:
    """The first tensor (in file order) whose bytes are lost when the last ``cut`` bytes are."""
    raw = file.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    header.pop("__metadata__", None)
    body = len(raw) - 8 - n - cut
    return min((k for k in header if header[k]["data_offsets"][1] > body), key=lambda k: header[k]["data_offsets"][0])


def corrupt(kind: str, file: Path) -> str:
    """Corrupt ``file`` in one way; returns the message the loader must give (after the file name)."""
    if kind in ("dtype", "missing", "extra"):
        tensors = load_file(file)
        if kind == "dtype":
            tensors["head.weight"] = tensors["head.weight"].double()
            message = "tensor 'head.weight' has dtype F64, expected F32"
        elif kind == "missing":
            del tensors["head.bias"]
            message = "tensor 'head.bias' missing"
        else:
            tensors["extra.weight"] = torch.ones(3)
            message = "unexpected tensor 'extra.weight'"
        save_file(tensors, str(file))
        return message
    if kind == "truncated":
        name = first_cut(file, 7)
        file.write_bytes(file.read_bytes()[:-7])
        return f"tensor {name!r} ends at byte"
    if kind == "lying_shape":
        rewrite_header(file, lambda h: h["head.weight"].update(shape=[64, 32]))
        return "tensor 'head.weight': shape [64, 32] of F32 is 8192 bytes but its data_offsets"
    if kind == "lying_offsets":  # a header whose offsets overlap the previous tensor
        def edit(h):
            start, end = h["head.weight"]["data_offsets"]
            h["head.weight"]["data_offsets"] = [start - 4, end - 4]
        rewrite_header(file, edit)
        return "tensor 'head.weight' (data_offsets"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["dtype", "missing", "extra", "truncated", "lying_shape", "lying_offsets"])
def test_a_corrupt_model_safetensors_is_an_error_naming_file_and_tensor(best, tmp_path, kind):
    copied = tmp_path / "model"
    shutil.copytree(best, copied)
    file = copied / "model.safetensors"
    message = corrupt(kind, file)
    with pytest.raises(ValueError) as e:
        SpeederModel.from_pretrained(copied)
    assert str(e.value).startswith(f"{file}: {message}"), e.value


@pytest.mark.parametrize("kind, message", [
    ("dtype", "tensor 'text.features' has dtype F32, expected F16"),
    ("short", "tensor 'text.features' has shape [119, 64], expected [120, *]"),
])
def test_the_item_table_is_read_with_the_same_checks(best, tmp_path, kind, message):
    copied = tmp_path / "model"
    shutil.copytree(best, copied)
    file = copied / "items" / "features.safetensors"
    tensors = load_file(file)
    tensors["text.features"] = tensors["text.features"].float() if kind == "dtype" else tensors["text.features"][:-1]
    save_file(tensors, str(file))
    with pytest.raises(ValueError) as e:
        SpeederModel.from_pretrained(copied)
    assert str(e.value) == f"{file}: {message}"


def test_reader_reads_every_supported_dtype_exactly(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {"f32": torch.randn(3, 5, generator=g), "bf16": torch.randn(7, generator=g).bfloat16(),
               "f16": torch.randn(2, 2, generator=g).half(), "i64": torch.randint(-9, 9, (4,), generator=g),
               "bool": torch.rand(6, generator=g) > 0.5, "u8": torch.randint(0, 255, (5,), generator=g).to(torch.uint8),
               "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 4)}
    save_file(tensors, str(tmp_path / "t.safetensors"))
    for mmap in (True, False):
        back = read_safetensors(tmp_path / "t.safetensors", mmap=mmap)
        assert set(back) == set(tensors)
        for name, t in tensors.items():
            assert back[name].dtype == t.dtype and torch.equal(back[name], t), name


# -- save -> load ------------------------------------------------------------------------------------------------
def test_round_trip_is_exact_and_features_are_stored_once(best, tmp_path):
    model = SpeederModel.from_pretrained(best)
    assert model.cfg.backbone.lora is not None  # LoRA kept
    weights = read_safetensors(best / "model.safetensors")
    assert not [n for n in weights if n.startswith("features_") or n == "available"]
    config = json.loads((best / "config.json").read_text())
    assert config["model_kind"] == "speeder" and config["format_version"] == 1 and config["lora"] == "kept"
    assert config["item_table_recipe"]["seed"] == 0 and config["package_version"]
    assert Path(config["run_config"]["out_dir"]).resolve() == best.parent.parent.resolve()  # recorded absolute
    rng = torch.get_rng_state()
    model.save_pretrained(tmp_path / "again")
    again = SpeederModel.from_pretrained(tmp_path / "again")
    assert torch.equal(torch.get_rng_state(), rng)  # loading leaves the caller's RNG alone
    a, b = model.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    h, hl = torch.tensor([[3, 17, 5, -1], [8, 0, 1, 2]]), torch.tensor([3, 4])
    c = torch.tensor([[1, 2, 3], [4, 5, 6]])
    with torch.no_grad():
        assert torch.equal(model(h, hl, c), again(h, hl, c))
        merged_dir = model.save_pretrained(tmp_path / "merged", merge_lora=True)
        merged = SpeederModel.from_pretrained(merged_dir)
        assert merged.cfg.backbone.lora is None and json.loads((merged_dir / "config.json").read_text())["lora"] == "merged"
        torch.testing.assert_close(merged(h, hl, c), model(h, hl, c), rtol=1e-5, atol=1e-5)


def test_saving_refuses_feature_buffers_that_left_the_item_table(best, tmp_path):
    model = SpeederModel.from_pretrained(best)
    with torch.no_grad():
        model.features_text[0] += 1
    with pytest.raises(ValueError, match="buffer 'features_text' differs from the model's item table"):
        model.save_pretrained(tmp_path / "m")
    assert not (tmp_path / "m").exists() and list(tmp_path.iterdir()) == []


# -- eval reads only the directory ----------------------------------------------------------------------------
def test_eval_from_another_directory_writes_nothing_there_and_trains_nothing(run, tmp_path, monkeypatch, capsys):
    home, best = run
    import speeder_rt.baselines.sasrec as sasrec
    import speeder_rt.data.features as features

    def forbidden(*_, **__):
        raise AssertionError("eval rebuilt features")

    monkeypatch.setattr(sasrec, "train_sasrec", forbidden)
    monkeypatch.setattr(features, "add_text_features", forbidden)
    monkeypatch.setattr(Trainer, "run", forbidden)
    shutil.rmtree(home / "runs" / "demo" / "items")  # the run's feature cache: eval must not need it
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert eval_cli.main(["--checkpoint", str(best)]) == 0
    out = capsys.readouterr().out
    assert "speeder on test (20 candidates, " in out and "NDCG@10" in out
    assert list(elsewhere.iterdir()) == []
    assert not (home / "runs" / "demo" / "items").exists()
    metrics = json.loads((best.parent / "best_metrics_test.json").read_text())
    assert metrics["checkpoint"] == str(best.resolve()) and set(metrics["metrics"]) >= {"HR@1", "NDCG@10"}


def test_eval_refuses_data_that_no_longer_fits_the_item_table(best, tmp_path, capsys):
    copied = tmp_path / "model"
    shutil.copytree(best, copied)
    config = json.loads((copied / "config.json").read_text())
    config["run_config"]["data"]["synthetic"]["n_items"] = 110
    (copied / "config.json").write_text(json.dumps(config))
    assert eval_cli.main(["--checkpoint", str(copied), "--out", str(tmp_path / "m.json")]) == 2
    assert "the data no longer fits the model's item table (110 items in the data, 120 in the table)" in \
        capsys.readouterr().err
    assert not (tmp_path / "m.json").exists()


# -- the resume state's format ---------------------------------------------------------------------------------
def test_optimizer_state_layout_is_torch_distributed_checkpoints(best):
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    model = SpeederModel.from_pretrained(best).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    h, hl, c = torch.tensor([[3, 17, 5]]), torch.tensor([3]), torch.tensor([[1, 2, 3]])
    for _ in range(2):
        model.loss(h, hl, c, torch.tensor([0])).backward()
        optimizer.step()
        optimizer.zero_grad()
    ours, theirs = named_optimizer_state(model, optimizer), get_optimizer_state_dict(model, optimizer)
    assert ours["param_groups"] == theirs["param_groups"]
    assert ours["state"].keys() == theirs["state"].keys()
    for name, values in ours["state"].items():
        assert all(torch.equal(v, theirs["state"][name][k]) for k, v in values.items()), name
    fresh = torch.optim.AdamW(params, lr=1e-3)
    load_named_optimizer_state(model, fresh, theirs, "test")  # a gathered distributed state loads as our own
    a, b = fresh.state_dict(), optimizer.state_dict()
    assert a["param_groups"] == b["param_groups"]
    assert all(torch.equal(a["state"][i][k], v) for i, s in b["state"].items() for k, v in s.items())
    with pytest.raises(ValueError, match="optimizer group 0 holds .* first difference at position 0"):
        load_named_optimizer_state(model, torch.optim.AdamW(params[1:], lr=1e-3), theirs, "test")


# -- converting an old pickled checkpoint -----------------------------------------------------------------------
def old_checkpoint(trainer: Trainer, path: Path) -> None:
    """What speeder_rt's trainer used to write as last.pt (torch.save of plain containers and tensors)."""
    torch.save({"kind": trainer.kind, "config": trainer.cfg.to_dict(), "model": trainer.model.state_dict(),
                "progress": vars(trainer.progress).copy(), "table_dir": str(Path(trainer.cfg.out_dir) / "items"),
                "optimizer": trainer.optimizer.state_dict(), "scheduler": trainer.scheduler.state_dict(),
                "rng": torch.get_rng_state(), "cuda_rng": None}, path)


def test_a_converted_last_pt_resumes_bit_for_bit(tmp_path, capsys):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = text_only(tmp_path / "a")
        data = prepare(cfg, log=lambda *_: None)
        a = Trainer("speeder", cfg, *data, log=lambda *_: None)
        a.run()
        b = Trainer("speeder", copy.deepcopy(cfg), *data, log=lambda *_: None)
        b.cfg.train.checkpoint_every = 1
        b.run(stop_after_steps=1)
        old_checkpoint(b, tmp_path / "last.pt")
        assert convert_cli.main([str(tmp_path / "last.pt"), str(tmp_path / "last"), "--trust-pickle"]) == 0
        out = capsys.readouterr().out
        assert "unpickling" in out and "with torch.load(weights_only=True)" in out and "with resume state" in out
        c = Trainer("speeder", cfg, *data, log=lambda *_: None)
        c.resume(tmp_path / "last")
        c.run()
    finally:
        torch.set_num_threads(threads)
    sa, sc = a.model.state_dict(), c.model.state_dict()
    assert all(torch.equal(sa[k], sc[k]) for k in sa)
    assert convert_cli.main([str(tmp_path / "last.pt"), str(tmp_path / "last"), "--trust-pickle"]) == 2
    assert "already exists (pass --force" in capsys.readouterr().err
    np.testing.assert_equal(sorted(p.name for p in (tmp_path / "last").iterdir()),
                            sorted(["config.json", "model.safetensors", "items", "backbone", "resume.json",
                                    "resume.safetensors"]))
