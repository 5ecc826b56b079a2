"""The run-config schema: every unknown key, wrong type and out-of-range value at any depth is one message naming
the key path, the value and what is allowed, raised before any data is built or file written; CLIs exit 2."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest
import yaml

from speeder_rt.data.sequences import SplitConfig
from speeder_rt.model.backbone import BackboneConfig, LoraSettings
from speeder_rt.model.mpo import MPOStage
from speeder_rt.model.speeder import SpeederConfig
from speeder_rt.train.config import RunConfig, load_run_config, run_config_from_dict
from speeder_rt.utils.schema import ConfigError, PositiveInt, check, from_dict

ROOT = Path(__file__).resolve().parent.parent
STAGES = [{"name": "text", "modalities": ["text"]}, {"name": "text+image", "modalities": ["text", "image"]}]

# (the config's sections, the message after "<file>: "), the cases first, then every section at depth.
CASES = [
    ({"seed": "abc"}, "seed: expected an integer >= 0, got 'abc'"),
    ({"train": {"batch_size": "sixty-four"}}, "train.batch_size: expected an integer >= 1, got 'sixty-four'"),
    ({"train": {"batch_size": 0}}, "train.batch_size: expected an integer >= 1, got 0"),
    ({"train": {"batch_size": 32.7}}, "train.batch_size: expected an integer >= 1, got 32.7"),
    ({"data": {"split": {"histroy_len": 5}}},
     "data.split: unknown key 'histroy_len' (did you mean 'history_len'?); allowed: history_len, num_candidates, "
     "max_train_samples_per_user, kcore, min_interactions, short_users, seed"),
    ({"mpo_defaults": {"warmup_step": 5}},
     "mpo_defaults: unknown key 'warmup_step' (did you mean 'warmup_steps'?); allowed: epochs, lr, warmup_steps"),
    ({"sed": 1},
     "unknown key 'sed' (did you mean 'seed'?); allowed: out_dir, seed, data, model, mpo, mpo_defaults, train, "
     "text_baseline"),
    ({"out_dir": 3}, "out_dir: expected a string, got 3"),
    ({"data": {"source": "csv"}},
     "data.source: 'csv' is not one of synthetic, movielens[:DIR], csv:FILE, parquet:FILE, amazon:REVIEWS[,META]"),
    ({"data": {"split": 5}},
     "data.split: expected a mapping with keys history_len, num_candidates, max_train_samples_per_user, kcore, min_interactions, "
     "short_users, seed, got 5"),
    ({"data": {"split": {"num_candidates": 1}}}, "data.split.num_candidates: expected an integer >= 2, got 1"),
    ({"data": {"split": {"short_users": "keep"}}}, "data.split.short_users: expected one of 'error', 'drop', got 'keep'"),
    ({"data": {"split": {"history_len": 60}}}, "data.split.history_len: 60 exceeds model.max_history (50)"),
    ({"data": {"synthetic": {"n_itmes": 100}}},
     "data.synthetic: unknown key 'n_itmes' (did you mean 'n_items'?); allowed: n_items, n_users, n_clusters, "
     "latent_dim, text_dim, image_dim, min_seq_len, max_seq_len, p_stay, tau, zipf_a, sigma_item, text_noise, "
     "image_noise, image_missing, seed"),
    ({"data": {"synthetic": {"n_items": 50}}},
     "data.synthetic.n_items: 50 is too small: 20 candidates and max_seq_len 30 need at least 60"),
    ({"data": {"synthetic": {"p_stay": 1.5}}}, "data.synthetic.p_stay: expected a number >= 0 and <= 1, got 1.5"),
    ({"data": {"sasrec": {"epochs": 0}}}, "data.sasrec.epochs: expected an integer >= 1, got 0"),
    ({"data": {"sasrec": {"dropout": 1.0}}}, "data.sasrec.dropout: expected a number >= 0 and < 1, got 1.0"),
    ({"data": {"sasrec": {"hidden": 30, "num_heads": 4}}}, "data.sasrec.num_heads: 4 does not divide hidden 30"),
    ({"data": {"text_features": "clip"}}, "data.text_features: expected one of 'auto', 'minilm', 'none', got 'clip'"),
    ({"data": {"collab_features": "yes"}}, "data.collab_features: expected true or false, got 'yes'"),
    ({"mpo_defaults": {"lr": -1}}, "mpo_defaults.lr: expected a number > 0, got -1"),
    ({"mpo_defaults": {"epochs": 1.5}}, "mpo_defaults.epochs: expected an integer >= 0, got 1.5"),
    ({"mpo": [STAGES[0], {**STAGES[1], "lr": "1e-3"}]},
     "mpo[1].lr: expected a number > 0, got '1e-3' (a string: YAML reads 1e-3 as text, write 1.0e-3)"),
    ({"mpo": [STAGES[0], {**STAGES[1], "warmup": 3}]},
     "mpo[1]: unknown key 'warmup' (did you mean 'warmup_steps'?); allowed: name, modalities, epochs, lr, trainable, "
     "warmup_steps"),
    ({"mpo": [{"name": "text"}]}, "mpo[0]: missing required key 'modalities'"),
    ({"mpo": [STAGES[0], {**STAGES[1], "epochs": -1}]}, "mpo[1].epochs: expected an integer >= 0, got -1"),
    ({"mpo": [STAGES[0], {"name": "video", "modalities": ["text", "video"]}]},
     "mpo[1].modalities: unknown modality 'video' (stage 'video'); the model has ['text', 'image']"),
    ({"mpo": [{**STAGES[0], "trainable": ["decoder"]}]},
     "mpo[0].trainable: unknown trainable set 'decoder' (stage 'text'); known: ['experts', 'gate', 'head', 'spae', "
     "'lora', 'backbone'] and expert:<modality>"),
    ({"mpo": []}, "mpo: the schedule has no stages"),
    ({"mpo": {"name": "text"}}, "mpo: expected a list of mappings or null, got {'name': 'text'}"),
    ({"model": {"d_expert": 0}}, "model.d_expert: expected an integer >= 1, got 0"),
    ({"model": {"modalities": ["text", "audio"]}},
     "model.modalities: ['audio'] have no features (data gives ['text', 'collab', 'image']): configure "
     "data.text_features / data.image_features / data.collab_features, or drop them"),
    ({"model": {"attn_backend": "cuda"}},
     "model: attn_backend must be one of ['reference', 'sdpa', 'eager', 'flash', 'triton'], got 'cuda'"),
    ({"model": {"backbone": {"hidden": 96}}},
     "model.backbone: unknown key 'hidden' (did you mean 'hidden_size'?); allowed: shape, arch, hidden_size, "
     "num_layers, num_heads, num_kv_heads, intermediate_size, vocab_size, max_position_embeddings, pretrained, "
     "gguf_file, dtype, lora, seed"),
    ({"model": {"backbone": {"shape": "gpt5"}}},
     "model.backbone.shape: unknown shape 'gpt5'; known: tiny, smollm2-135m, qwen2-0.5b, qwen2-1.5b"),
    ({"model": {"backbone": {"dtype": "int8"}}},
     "model.backbone.dtype: 'int8' is not one of float32, fp32, bfloat16, bf16, float16, fp16"),
    ({"model": {"backbone": {"arch": "gpt2"}}}, "model.backbone.arch: expected one of 'llama', 'qwen2', got 'gpt2'"),
    ({"model": {"backbone": {"num_heads": 3}}}, "model.backbone.num_heads: 3 does not divide hidden_size 64"),
    ({"model": {"backbone": {"lora": {"rnak": 4}}}},
     "model.backbone.lora: unknown key 'rnak' (did you mean 'rank'?); allowed: rank, alpha, dropout, target_modules"),
    ({"model": {"backbone": {"lora": {"rank": 0}}}}, "model.backbone.lora.rank: expected an integer >= 1, got 0"),
    ({"model": {"backbone": {"lora": {"target_modules": "q_proj"}}}},
     "model.backbone.lora.target_modules: expected a list of strings, got 'q_proj'"),
    ({"model": {"backbone": {"lora": {"target_modules": ["q_proj", 7]}}}},
     "model.backbone.lora.target_modules[1]: expected a string, got 7"),
    ({"model": {"template": {"prefx": "Items:"}}},
     "model.template: unknown key 'prefx' (did you mean 'prefix'?); allowed: prefix, middle, suffix, fixed_ids"),
    ({"model": {"template": {"fixed_ids": {"prefix": [1], "middle": [2], "suffix": [3], "pred": [-4]}}}},
     "model.template.fixed_ids.pred[0]: expected an integer >= 0, got -4"),
    ({"model": {"template": {"fixed_ids": {"prefix": [1]}}}},
     "model.template.fixed_ids: needs exactly the keys prefix, middle, suffix, pred; got prefix"),
    ({"model": {"template": {"fixed_ids": {"prefix": [1], "middle": [2], "suffix": [3], "pred": [600]}}}},
     "model.template: fixed_ids reach 600, beyond backbone.vocab_size 512"),
    ({"train": {"lr": 0.1}},
     "train: unknown key 'lr'; allowed: batch_size, grad_accumulation, parallel, eval_batch_size, weight_decay, "
     "grad_clip, max_train_samples_per_epoch, checkpoint_every, device, progress, num_threads, deterministic, "
     "autocast, max_step_seconds"),
    ({"train": {"device": "gpu"}}, "train.device: 'gpu' is not auto or a torch device (cpu, cuda, cuda:1)"),
    ({"train": {"grad_clip": 0}}, "train.grad_clip: expected a number > 0, got 0"),
    ({"train": {"weight_decay": float("nan")}}, "train.weight_decay: expected a number >= 0, got nan"),
    ({"train": {"max_train_samples_per_epoch": 0}},
     "train.max_train_samples_per_epoch: expected an integer >= 1 or null, got 0"),
    ({"text_baseline": {"eval_limit": 0}}, "text_baseline.eval_limit: expected an integer >= 1 or null, got 0"),
    ({"text_baseline": {"epoch": 2}},
     "text_baseline: unknown key 'epoch' (did you mean 'epochs'?); allowed: epochs, lr, max_title_tokens, "
     "max_new_tokens, eval_limit"),
]


def write_config(tmp_path: Path, sections: dict) -> Path:
    """A small synthetic run with ``sections`` merged in (model modalities text + image, so no SASRec)."""
    raw = {"out_dir": str(tmp_path / "out"), "data": {"collab_features": False},
           "model": {"backbone": {"shape": "tiny"}, "modalities": ["text", "image"]}}
    for key, value in sections.items():
        raw[key] = {**raw[key], **value} if isinstance(raw.get(key), dict) and isinstance(value, dict) else value
    if "modalities" in sections.get("model", {}) and "audio" in sections["model"]["modalities"]:
        raw["data"] = {}  # the default data: text, collab and image features
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


@pytest.mark.parametrize("sections, message", CASES, ids=[m.split(":")[0] + f"-{i}" for i, (_, m) in enumerate(CASES)])
def test_train_cli_reports_the_key_path_and_writes_nothing(tmp_path, capsys, sections, message):
    from speeder_rt.train.__main__ import main

    path = write_config(tmp_path, sections)
    assert main(["--config", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.err == f"error: {path}: {message}\n" and captured.out == ""
    assert sorted(os.listdir(tmp_path)) == ["run.yaml"]  # no <out_dir>/items, nothing at all


def test_demo_cli_reports_config_and_data_errors_and_writes_nothing(tmp_path, capsys):
    from speeder_rt.demo import main

    path = write_config(tmp_path, {"train": {"batch_size": 0}})
    with pytest.raises(SystemExit) as info:
        main(["--config", str(path), "--models", "popularity"])
    assert info.value.code == 2
    assert capsys.readouterr().err == f"error: {path}: train.batch_size: expected an integer >= 1, got 0\n"
    path = write_config(tmp_path, {})
    with pytest.raises(SystemExit) as info:  # the --data override is checked with the rest: image has no features
        main(["--config", str(path), "--data", f"csv:{tmp_path / 'x.csv'}"])
    assert info.value.code == 2
    assert capsys.readouterr().err == (
        f"error: {path} with --data csv:{tmp_path / 'x.csv'}: model.modalities: ['image'] have no features (data gives "
        "['text']): configure "
        "data.text_features / data.image_features / data.collab_features, or drop them\n")
    with pytest.raises(SystemExit) as info:
        main(["--config", str(path), "--data", f"csv:{tmp_path / 'x.csv'}", "--models", "popularity"])
    assert info.value.code == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'x.csv'}: file not found\n"
    assert sorted(os.listdir(tmp_path)) == ["run.yaml"]


@pytest.mark.slow
@pytest.mark.parametrize("module", ["speeder_rt.train", "speeder_rt.demo"])
def test_cli_processes_exit_2_without_traceback(tmp_path, module):
    path = write_config(tmp_path, {"data": {"split": {"histroy_len": 5}}})
    proc = subprocess.run([sys.executable, "-m", module, "--config", str(path)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.splitlines()[-1].startswith(f"error: {path}: data.split: unknown key 'histroy_len'")
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert sorted(os.listdir(tmp_path)) == ["run.yaml"]


def test_yaml_and_top_level_errors(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train: {batch_size: 4\n")
    with pytest.raises(ValueError, match=r"bad\.yaml: line 2 invalid YAML"):
        load_run_config(path)
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError) as info:
        load_run_config(path)
    assert str(info.value) == f"{path}: the top level must be a mapping of sections, got list"
    with pytest.raises(ValueError, match=r"nowhere\.yaml: config file not found"):
        load_run_config(tmp_path / "nowhere.yaml")


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")))
def test_every_shipped_config_loads_and_round_trips_through_json(name):
    """Checkpoints record ``to_dict()`` as JSON; reading it back gives the same config."""
    cfg = load_run_config(ROOT / "configs" / name)
    again = run_config_from_dict(json.loads(json.dumps(cfg.to_dict())), "checkpoint: config")
    assert again == cfg and again.to_dict() == cfg.to_dict()


def test_sections_given_in_part_keep_their_defaults_and_seeds_follow_the_run():
    cfg = run_config_from_dict({"seed": 7, "data": {"split": {"history_len": 5}, "sasrec": {"hidden": 32}},
                                "mpo_defaults": {"lr": 0.01}, "train": None})
    assert cfg.data.split == SplitConfig(history_len=5, short_users="drop", seed=7)  # the run's default: drop
    assert (cfg.data.sasrec.hidden, cfg.data.sasrec.epochs, cfg.data.sasrec.seed) == (32, 20, 7)
    assert cfg.mpo_defaults == {"epochs": 1, "lr": 0.01, "warmup_steps": 20}
    assert cfg.train == RunConfig().train  # an empty section: its defaults
    pinned = run_config_from_dict({"seed": 7, "data": {"split": {"seed": 3}}})
    assert (pinned.data.split.seed, pinned.data.sasrec.seed) == (3, 7)
    floats = run_config_from_dict({"mpo": [{"name": "t", "modalities": ["text"], "lr": 1}]})
    assert floats.mpo[0].lr == 1.0 and isinstance(floats.mpo[0].lr, float)


def test_objects_built_in_code_are_checked_the_same_way():
    with pytest.raises(ConfigError) as info:
        SplitConfig(history_len=0)
    assert str(info.value) == "SplitConfig.history_len: expected an integer >= 1, got 0"
    with pytest.raises(ConfigError) as info:
        MPOStage("s", ["text"], lr=0)
    assert str(info.value) == "MPOStage.lr: expected a number > 0, got 0"
    with pytest.raises(ConfigError) as info:
        BackboneConfig(lora={"rank": 2, "alpha": True})
    assert str(info.value) == "BackboneConfig.lora.alpha: expected an integer >= 1, got true"
    cfg = SpeederConfig(backbone={"shape": "tiny", "lora": {"rank": 2}}, template={"prefix": "Items:"})
    assert cfg.backbone == BackboneConfig(shape="tiny", lora=LoraSettings(rank=2))
    assert cfg.template.prefix == "Items:" and cfg.template.fixed_ids["pred"] == [10]


def test_a_new_setting_is_one_line():
    """How the next keys (train.parallel, train.grad_accumulation, train.deterministic) will be declared."""

    @dataclass
    class Parallel:
        parallel: Literal["auto", "ddp", "fsdp"] = "auto"
        grad_accumulation: PositiveInt = 1
        deterministic: bool = False

        def __post_init__(self) -> None:
            check(self)

    assert from_dict(Parallel, {"parallel": "ddp", "grad_accumulation": 4}) == Parallel("ddp", 4)
    for raw, message in [({"parallel": "zero3"}, "train: parallel: expected one of 'auto', 'ddp', 'fsdp', got 'zero3'"),
                         ({"grad_accumulation": 0}, "train: grad_accumulation: expected an integer >= 1, got 0"),
                         ({"deterministic": 1}, "train: deterministic: expected true or false, got 1")]:
        with pytest.raises(ConfigError) as info:
            from_dict(Parallel, raw, "train")
        assert str(info.value) == message


def test_config_errors_pickle():
    import pickle

    err = ConfigError("expected an integer >= 1, got 0", ("train", "batch_size"), "run.yaml")
    again = pickle.loads(pickle.dumps(err))
    assert str(again) == str(err) == "run.yaml: train.batch_size: expected an integer >= 1, got 0"
    assert isinstance(again, ValueError) and (again.keys, again.where) == (("train", "batch_size"), "run.yaml")


def test_process_settings_set_the_thread_count_and_the_kernels_determinism():
    import torch

    from speeder_rt.kernels import deterministic_kernels, use_deterministic_kernels

    threads = torch.get_num_threads()
    try:
        run_config_from_dict({"train": {"num_threads": 1, "deterministic": True}}).train.apply_process_settings()
        assert torch.get_num_threads() == 1 and deterministic_kernels()
        run_config_from_dict({}).train.apply_process_settings()  # defaults: threads untouched, autotuning back
        assert torch.get_num_threads() == 1 and not deterministic_kernels()
    finally:
        torch.set_num_threads(threads)
        use_deterministic_kernels(False)
    with pytest.raises(ConfigError, match=r"train\.num_threads"):
        run_config_from_dict({"train": {"num_threads": 0}})
    with pytest.raises(ConfigError, match=r"train\.deterministic"):
        run_config_from_dict({"train": {"deterministic": "yes"}})
