"""Distributed training on torchrun (speeder_rt.train.distributed): CPU, gloo, 2 ranks, a tiny shape.

Three torchrun jobs of tests/distributed_worker.py (the train CLI with recording hooks) and in-process
single-process references of the same configs (the same global batch, grad_accumulation 1):

- DDP and FSDP2 Speeder runs (both MPO stages, the warm-up phase, the backbone trained, 2 micro-batches per rank,
  an epoch whose last batch of 2 samples leaves each rank an empty micro-batch) and an FSDP2 text-baseline run;
- an FSDP2 run whose rank 1 kills itself (SIGKILL) after step 7, inside the warm-up;
- the resume of that run's last/ on 2 ranks; a single-process resume of it runs in-process;
- in one job, an FSDP2 run that diverges (both ranks exit 1 at the same step) and one whose rank 1 alone gets SIGTERM
  after step 9 (every rank stops after step 10, exit 143), then that run's resume.

Tolerance against the single process: a distributed step sums the same terms in another order (per-rank GEMMs
over fewer rows, then the all-reduce), each gradient element changing by fp32 rounding (~1e-7 relative). The loss
of every step is compared at rtol 1e-5 (measured: 2e-7). AdamW divides each gradient by its running RMS, so an
element whose gradient nearly cancels moves by a visible part of one lr step (3e-3): after these 11 steps the
weights differ by up to 1.1e-5 (measured), compared at atol 5e-5, rtol 1e-4. Metrics are compared exactly:
evaluation shards whole batches, so each score is computed as in one process.
"""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from speeder_rt.eval.protocol import evaluate
from speeder_rt.train.config import run_config_from_dict
from speeder_rt.train.data import prepare
from speeder_rt.train.distributed import World, check_batch, eval_rows, micro_batches
from speeder_rt.train.kinds import load_model
from speeder_rt.train.resume import read_resume_state
from speeder_rt.train.trainer import Trainer
from speeder_rt.utils import io
from speeder_rt.utils.schema import ConfigError

WORKER = Path(__file__).with_name("distributed_worker.py")
LOSS_RTOL = 1e-5
WEIGHT_ATOL, WEIGHT_RTOL = 5e-5, 1e-4
# 98 samples per epoch in global batches of 32: 32, 32, 32, 2 (the last gives each rank one sample: one of its two
# micro-batches is empty). 80 validation users in eval batches of 32: rank 0 scores one batch, rank 1 two.
TRAIN = {"batch_size": 32, "max_train_samples_per_epoch": 98, "eval_batch_size": 32, "grad_accumulation": 2,
         "checkpoint_every": 3, "progress": False}
SPEEDER = {
    "data": {"source": "synthetic", "synthetic": {"n_items": 120, "n_users": 80, "seed": 1},
             "split": {"short_users": "drop"}, "collab_features": False},
    "model": {"backbone": {"shape": "tiny"}, "modalities": ["text", "image"], "d_expert": 32},
    "mpo": [{"name": "text", "modalities": ["text"], "epochs": 1, "lr": 0.003,
             "trainable": ["experts", "gate", "head", "spae", "backbone"]},
            {"name": "text+image", "modalities": ["text", "image"], "epochs": 1, "lr": 0.003, "warmup_steps": 3,
             "trainable": ["gate", "head", "backbone"]}],
}
TEXT = {**SPEEDER, "model": {**SPEEDER["model"], "modalities": ["text"]}, "mpo": None,
        "text_baseline": {"epochs": 1, "lr": 0.003, "max_title_tokens": 8, "max_new_tokens": 6, "eval_limit": 40}}
# (name, model kind, config, train.parallel); the kill job is the fsdp run again in another directory
RUNS = [("ddp", "speeder", SPEEDER, "ddp"), ("fsdp", "speeder", SPEEDER, "fsdp"), ("text", "text_baseline", TEXT, "fsdp")]
KILL_RANK, KILL_STEP, LAST_BEFORE_KILL = 1, 7, 6  # checkpoints every 3 steps: last/ holds step 6
TERM_RANK, TERM_STEP = 1, 9  # the ranks agree on the stop in step 10, stage 1's third of 4 (no multiple of 3)


def config(base: dict, out_dir: Path, **train) -> dict:
    return {**base, "out_dir": str(out_dir), "train": {**TRAIN, **train}}


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("distributed")


@pytest.fixture(scope="module")
def launch(home):
    """``launch(out, *runs, kill=None)``: one 2-rank torchrun job of the worker (runs: (argument list, ...));
    returns (exit status, seconds, output). Every process it started is killed by PID at teardown."""
    started: list[subprocess.Popen] = []
    outs: list[Path] = []

    def run(out: Path, *runs: list[str], kill: str | None = None, timeout: float = 150):
        out.mkdir(parents=True)
        outs.append(out)
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                   "--monitor-interval", "0.1", str(WORKER), str(out), *(["--kill", kill] if kill else [])]
        for args in runs:
            command += ["--", *args]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        start = time.perf_counter()
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                cwd=home, start_new_session=True)
        started.append(proc)
        output, _ = proc.communicate(timeout=timeout)
        return proc.returncode, time.perf_counter() - start, output

    yield run
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    for out in outs:  # the ranks run in sessions of their own
        for pid in (int(p.name) for p in (out / "pids").glob("*")):
            try:
                if "distributed_worker" in Path(f"/proc/{pid}/cmdline").read_text():
                    os.kill(pid, signal.SIGKILL)
            except (FileNotFoundError, ProcessLookupError):
                pass


def write_config(path: Path, raw: dict) -> str:
    path.write_text(yaml.safe_dump(raw))
    return str(path)


@pytest.fixture(scope="module")
def distributed_runs(home, launch):
    """The three runs of RUNS in one torchrun job: {name: (out_dir, rank results [rank0, rank1])}."""
    args = [["--config", write_config(home / f"{name}.yaml", config(base, home / name, parallel=parallel)),
             "--model", kind] for name, kind, base, parallel in RUNS]
    status, _, output = launch(home / "job", *args)
    assert status == 0, output[-6000:]
    results = {}
    for i, (name, *_) in enumerate(RUNS):
        ranks = [json.loads((home / "job" / f"{i}.rank{r}.json").read_text()) for r in (0, 1)]
        for r, rank in enumerate(ranks):
            rank["tensors"] = load_file(home / "job" / f"{i}.rank{r}.safetensors")
        results[name] = (home / name, ranks)
    return results


def record(trainer_kind: str, raw: dict):
    """Train in this process on one intra-op thread; (trainer, losses, write targets outside temp dirs)."""
    losses, writes = [], []
    step, workspace = Trainer.train_step, io._workspace

    def recording_step(self, samples, batch):
        losses.append(step(self, samples, batch))
        return losses[-1]

    def recording_workspace(target):
        writes.append(str(target))
        return workspace(target)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    Trainer.train_step, io._workspace = recording_step, recording_workspace
    try:
        cfg = run_config_from_dict(raw)
        trainer = Trainer(trainer_kind, cfg, *prepare(cfg, log=lambda *_: None), log=lambda *_: None)
        trainer.run()
    finally:
        Trainer.train_step, io._workspace = step, workspace
        torch.set_num_threads(threads)
    return trainer, losses, top_level(writes)


def top_level(writes: list[str]) -> list[str]:
    return [w for w in writes if ".tmp" not in w]


@pytest.fixture(scope="module")
def single(home):
    """Single-process references: {speeder, text_baseline: (trainer, losses, writes)}; same global batch."""
    return {kind: record(kind, config(base, home / f"single_{kind}", grad_accumulation=1))
            for kind, base in (("speeder", SPEEDER), ("text_baseline", TEXT))}


def assert_same_checkpoint(got: Path, want: Path) -> None:
    """Two last/ directories hold bit-identical weights, optimizer state and RNG states (every rank's)."""
    for file in ("model.safetensors", "resume.safetensors"):
        a, b = load_file(got / file), load_file(want / file)
        assert a.keys() == b.keys()
        for n in b:
            assert torch.equal(a[n], b[n]), (file, n)


def assert_weights_close(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=WEIGHT_ATOL, rtol=WEIGHT_RTOL, msg=name)


# -- pure helpers ---------------------------------------------------------------------------------------------------
def test_shards_cover_every_sample_once():
    worlds = [World(torch.device("cpu"), rank, 3) for rank in range(3)]
    batch = np.arange(100, 164)
    parts = [m for w in worlds for m in micro_batches(w, batch, 2)]
    assert [len(m) for m in parts] == [11, 11, 11, 10, 11, 10]  # 22, 21, 21 per rank
    assert np.array_equal(np.concatenate(parts), batch)
    rows = [eval_rows(w, 90, 16) for w in worlds]  # 6 batches: 2 per rank, the last one short
    assert [(r.start, r.stop) for r in rows] == [(0, 32), (32, 64), (64, 90)]
    assert [(r.start, r.stop) for r in (eval_rows(w, 20, 16) for w in worlds)] == [(0, 0), (0, 16), (16, 20)]


def test_global_batch_must_cut_into_equal_micro_batches():
    with pytest.raises(ValueError, match=r"train\.batch_size 33 is the global batch; it must be a multiple of world "
                                         r"size 2 x train\.grad_accumulation 1 = 2"):
        check_batch(World(torch.device("cpu"), 0, 2), 33, 1)
    with pytest.raises(ValueError, match=r"world size 1 x train\.grad_accumulation 3 = 3"):
        check_batch(World(torch.device("cpu")), 32, 3)


@pytest.mark.parametrize("key, value, message", [
    ("parallel", "deepspeed", r"train\.parallel"), ("grad_accumulation", 0, r"train\.grad_accumulation")])
def test_config_refuses_unknown_parallel_and_accumulation(key, value, message):
    with pytest.raises(ConfigError, match=message):
        run_config_from_dict({"train": {key: value}})


def test_gathering_helpers_are_exact(distributed_runs, home):
    ranks = [json.loads((home / "job" / f"collectives.rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["rows"] for r in ranks] == [[0, 32], [32, 50]]
    values = np.random.default_rng(0).integers(0, 7, size=50)
    for rank in ranks:
        assert rank["gathered"] == values.tolist()
        assert rank["means"] == rank["expected"]  # bit for bit, on every rank


# -- one training over two ranks --------------------------------------------------------------------------------
def test_ddp_ranks_hold_bit_identical_weights(distributed_runs):
    rank0, rank1 = (r["tensors"] for r in distributed_runs["ddp"][1])
    assert rank0.keys() == rank1.keys()
    for n in rank0:
        assert torch.equal(rank0[n], rank1[n]), n


@pytest.mark.parametrize("name", [name for name, *_ in RUNS])
def test_losses_and_weights_match_the_single_process_run(distributed_runs, single, name):
    kind = dict((n, k) for n, k, *_ in RUNS)[name]
    out, ranks = distributed_runs[name]
    trainer, losses, _ = single[kind]
    assert ranks[0]["losses"] == ranks[1]["losses"]  # every rank reports the global batch's loss
    np.testing.assert_allclose(ranks[0]["losses"], losses, rtol=LOSS_RTOL)
    written = load_file(out / kind / "last" / "model.safetensors")  # gathered to full tensors on rank 0
    want = {n: t for n, t in trainer.model.state_dict().items() if n in written}
    assert_weights_close(written, want)


@pytest.mark.parametrize("name", [name for name, *_ in RUNS])
def test_validation_metrics_equal_single_process_metrics_of_the_same_weights(distributed_runs, name):
    kind = dict((n, k) for n, k, *_ in RUNS)[name]
    out, ranks = distributed_runs[name]
    assert ranks[0]["metrics"] == ranks[1]["metrics"]
    model = load_model(out / kind / "last")  # single process, CPU: the files eval and export read
    cfg = run_config_from_dict(yaml.safe_load((out.parent / f"{name}.yaml").read_text()))
    data, _ = prepare(cfg, log=lambda *_: None)
    if kind == "speeder":
        metrics = evaluate(model, data, "valid", batch_size=cfg.train.eval_batch_size)
    else:
        metrics = model.evaluate(data, "valid", limit=cfg.text_baseline.eval_limit, progress=False)
    assert ranks[0]["metrics"] == metrics


def test_rank_0_writes_each_file_once_as_a_single_process_does(distributed_runs, single):
    for name, kind, *_ in RUNS:
        out, ranks = distributed_runs[name]
        assert ranks[1]["writes"] == []
        single_out = Path(single[kind][0].cfg.out_dir)
        want = [w.replace(str(single_out), str(out)) for w in single[kind][2]]
        assert top_level(ranks[0]["writes"]) == want
        assert want.count(str(out / "items")) == 1


# -- a killed rank, resume ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def killed(home, launch, distributed_runs):
    """The fsdp run with rank 1 killed after step KILL_STEP: (its out dir, exit status, seconds from the kill to
    the job's exit, output)."""
    out = home / "killed"
    args = ["--config", write_config(home / "killed.yaml", config(SPEEDER, out, parallel="fsdp"))]
    status, _, output = launch(home / "kill_job", args, kill=f"{KILL_RANK}:{KILL_STEP}")
    ended = time.time()
    killed_at = float((home / "kill_job" / "killed_at").read_text())
    return out, status, ended - killed_at, output


def test_a_killed_rank_ends_the_job_and_leaves_the_last_checkpoint_intact(killed):
    out, status, after_kill, output = killed
    assert status != 0, output[-3000:]
    assert after_kill < 30, after_kill
    assert "SIGKILL" in output
    assert sorted(os.listdir(out / "speeder")) == ["best", "last"]  # no temporary or half-written directory
    assert read_resume_state(out / "speeder" / "last").progress["global_step"] == LAST_BEFORE_KILL
    load_model(out / "speeder" / "last")  # every file complete and checked


def test_resume_on_the_same_world_size_reproduces_the_uninterrupted_run_bit_for_bit(home, launch, killed,
                                                                                     distributed_runs):
    out = home / "resumed"
    shutil.copytree(killed[0], out)  # the other resume test reads the killed run's checkpoint too
    cfg = write_config(home / "resumed.yaml", config(SPEEDER, out, parallel="fsdp"))
    status, _, output = launch(home / "resume_job", ["--config", cfg, "--resume", str(out / "speeder" / "last")])
    assert status == 0, output[-6000:]
    assert f"resumed from {out / 'speeder' / 'last'} at phase 1, epoch 0, step 2 (global step 6)" in output
    assert_same_checkpoint(out / "speeder" / "last", distributed_runs["fsdp"][0] / "speeder" / "last")
    resumed = json.loads((home / "resume_job" / "0.rank0.json").read_text())
    assert resumed["metrics"] == distributed_runs["fsdp"][1][0]["metrics"]


def test_resume_on_another_world_size_works_and_says_so(home, killed, distributed_runs):
    out = home / "resumed_single"
    shutil.copytree(killed[0], out)
    cfg = run_config_from_dict(config(SPEEDER, out, grad_accumulation=1))
    lines = []
    trainer = Trainer("speeder", cfg, *prepare(cfg, log=lambda *_: None), log=lines.append)
    trainer.resume(out / "speeder" / "last")
    trainer.run()
    assert any("checkpointed with world size 2, resuming with 1" in line for line in lines), lines
    uninterrupted = load_file(distributed_runs["fsdp"][0] / "speeder" / "last" / "model.safetensors")
    assert_weights_close(load_file(out / "speeder" / "last" / "model.safetensors"), uninterrupted)


# -- divergence and preemption: every rank stops at the same step ------------------------------------------------
@pytest.fixture(scope="module")
def stopped(home, launch):
    """One torchrun job of two fsdp runs: "diverged" (stage 1's lr 1e20: its warm-up's second step is NaN) and
    "preempted" (rank 1 alone gets SIGTERM after step TERM_STEP); (the job's exit status, output)."""
    diverged = config(SPEEDER, home / "diverged", parallel="fsdp")
    diverged["mpo"] = [diverged["mpo"][0], {**diverged["mpo"][1], "lr": 1e20}]
    runs = [["--config", write_config(home / f"{name}.yaml", raw)] for name, raw in
            (("diverged", diverged), ("preempted", config(SPEEDER, home / "preempted", parallel="fsdp")))]
    status, _, output = launch(home / "stop_job", *runs, kill=f"{TERM_RANK}:{TERM_STEP}:SIGTERM")
    return status, output


def statuses(job: Path, run: int) -> list[str]:
    return [(job / f"{run}.status.rank{r}").read_text() for r in (0, 1)]


def test_divergence_on_two_ranks_stops_both_at_the_step_with_one_line(home, stopped):
    _, output = stopped
    assert statuses(home / "stop_job", 0) == ["1", "1"], output[-6000:]
    last = home / "diverged" / "speeder" / "last"
    lines = [line for line in output.splitlines() if "training diverged" in line]
    assert len(lines) == 1, lines  # rank 0 alone prints
    found = re.match(r"error: training diverged in stage 1 \(text\+image, warmup\), epoch 0, step (\d) \(global step "
                     rf"(\d)\): loss \S+, grad norm \S+, learning rate 1e\+20; the step was not applied and "
                     rf"{re.escape(str(last))} holds global step (\d)\.", lines[0])
    assert found, lines[0]
    step, global_step, saved = map(int, found.groups())
    assert global_step == 4 + step and read_resume_state(last).progress["global_step"] == saved < global_step
    for name in ("best", "last"):  # complete and finite (the loader refuses a NaN)
        load_model(home / "diverged" / "speeder" / name)


def test_sigterm_on_one_rank_stops_every_rank_at_the_next_step_and_the_resume_equals_the_uninterrupted_run(
        home, launch, stopped, distributed_runs):
    status, output = stopped
    assert status != 0, output[-6000:]  # torchrun reports its workers' non-zero statuses as a failure
    assert statuses(home / "stop_job", 1) == ["143", "143"], output[-6000:]
    out, cfg = home / "preempted", str(home / "preempted.yaml")
    last = out / "speeder" / "last"
    assert (f"stopped by SIGTERM after stage 1 (text+image, main), epoch 0, step 3 (global step {TERM_STEP + 1}): "
            f"{last} holds that step; resume by running the same command with --resume {last}") in output
    assert output.count("stopped by SIGTERM") == 1  # rank 0 alone prints; torchrun's own traceback follows
    assert not re.search(r'File "[^"]*(speeder_rt|distributed_worker)', output), output[-6000:]  # none from a rank
    assert read_resume_state(last).progress["global_step"] == TERM_STEP + 1
    assert sorted(os.listdir(out / "speeder")) == ["best", "last"]
    status, _, output = launch(home / "term_resume_job", ["--config", cfg, "--resume", str(last)])
    assert status == 0, output[-6000:]
    assert_same_checkpoint(last, distributed_runs["fsdp"][0] / "speeder" / "last")
