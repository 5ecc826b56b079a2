"""Training that stops early and says so (speeder_rt.train.faults): divergence, SIGTERM / SIGINT, a full disk, a
resume with a changed config, a checkpoint with non-finite weights.

The tiny run: stage 0 (text) 4 steps, stage 1 (text+image) a 3-step warm-up and 4 steps: 11 global steps. The
signal and disk tests run the train CLI in a subprocess (the real handlers and exit status); the references train
in this process on one intra-op thread, where a resume reproduces the uninterrupted run bit for bit.
"""
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from test_distributed import assert_same_checkpoint
from test_model import one_thread, tiny_run  # noqa: F401  (one_thread: a fixture)

from speeder_rt.train import __main__ as cli
from speeder_rt.train.config import run_config_from_dict
from speeder_rt.train.data import prepare
from speeder_rt.train.faults import Diverged
from speeder_rt.train.kinds import load_model
from speeder_rt.train.resume import read_resume_state
from speeder_rt.train.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("distributed_worker.py")


def run_config(out: Path, **train) -> dict:
    """test_model's tiny run (on one intra-op thread) as the mapping a config file holds."""
    return tiny_run(out, **{"num_threads": 1, **train}).to_dict()


def write_config(path: Path, raw: dict) -> str:
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def subprocess_env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def run_process(args: list[str], cwd: Path, limit_file_kb: int | None = None, timeout: float = 240):
    """(exit status, stdout, stderr) of ``python ARGS``; ``limit_file_kb``: the largest file it may write (``ulimit
    -f``, SIGXFSZ ignored: a write beyond it fails with EFBIG, as one on a full disk fails with ENOSPC)."""
    command = [sys.executable, *args]
    if limit_file_kb is not None:
        command = ["bash", "-c", f"trap '' XFSZ; ulimit -f {limit_file_kb}; exec \"$0\" \"$@\"", *command]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd,
                            env=subprocess_env(), start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    return proc.returncode, out, err


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The tiny run trained to the end in this process on one thread: its out dir."""
    out = tmp_path_factory.mktemp("uninterrupted")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = run_config_from_dict(run_config(out))
        Trainer("speeder", cfg, *prepare(cfg, log=lambda *_: None), log=lambda *_: None).run()
    finally:
        torch.set_num_threads(threads)
    return out


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


# -- divergence -------------------------------------------------------------------------------------------------
def test_divergence_stops_at_the_step_in_one_line_and_every_checkpoint_stays_finite(tmp_path):
    raw = run_config(tmp_path / "run", checkpoint_every=1)
    raw["mpo"][1]["lr"] = 1e20  # the warm-up's first step blows the weights up; the next loss is NaN
    status, _, err = run_process(["-m", "speeder_rt.train", "--config", write_config(tmp_path / "c.yaml", raw)],
                                 tmp_path)
    assert status == 1, err[-3000:]
    line = one_line(err)
    match = re.fullmatch(r"error: training diverged in stage 1 \(text\+image, warmup\), epoch 0, step (\d) "
                         r"\(global step (\d)\): loss (\S+), grad norm (\S+), learning rate (\S+); the step was not "
                         r"applied and (\S+) holds global step (\d)\. Try a lower learning rate \(mpo\[1\]\.lr\) .*"
                         r"--resume-changed-config.*", line)
    assert match, line
    step, global_step, loss, norm, lr, last, saved = match.groups()
    assert int(global_step) == 4 + int(step) and int(saved) == int(global_step) - 1
    assert not (torch.isfinite(torch.tensor(float(loss))) and torch.isfinite(torch.tensor(float(norm))))
    assert float(lr) == 1e20 and last == str(tmp_path / "run" / "speeder" / "last")
    assert read_resume_state(last).progress["global_step"] == int(saved)
    assert sorted(os.listdir(tmp_path / "run" / "speeder")) == ["best", "last"]  # nothing half-written
    for name in ("best", "last"):
        load_model(tmp_path / "run" / "speeder" / name)  # refuses a non-finite weight


def test_a_checkpoint_of_non_finite_weights_is_never_written(tmp_path):
    cfg = run_config_from_dict(run_config(tmp_path))
    trainer = Trainer("speeder", cfg, *prepare(cfg, log=lambda *_: None), log=lambda *_: None)
    trainer._start_phase(0)
    trainer.save("last")
    before = (tmp_path / "speeder" / "last" / "model.safetensors").stat().st_mtime_ns
    with torch.no_grad():
        trainer.model.head.weight[1, 2] = float("inf")
    with pytest.raises(Diverged, match=r"training diverged: weight 'head.weight' is inf after global step 0, so "
                                       rf"{tmp_path / 'speeder' / 'best'} was not written; .*last holds global step 0"):
        trainer.save("best")
    assert not (tmp_path / "speeder" / "best").exists()
    with pytest.raises(Diverged):
        trainer.save("last")
    assert (tmp_path / "speeder" / "last" / "model.safetensors").stat().st_mtime_ns == before


@pytest.mark.parametrize("file, tensor", [("model.safetensors", "head.weight"),
                                          ("resume.safetensors", "optimizer/head.weight/exp_avg")])
def test_resume_refuses_a_checkpoint_with_non_finite_values(uninterrupted, tmp_path, file, tensor):
    last = tmp_path / "last"
    shutil.copytree(uninterrupted / "speeder" / "last", last)
    tensors = load_file(last / file)
    tensors[tensor] = tensors[tensor].clone()
    tensors[tensor].view(-1)[3] = float("nan")
    save_file(tensors, str(last / file), metadata={"format": "pt"})
    cfg = run_config_from_dict(run_config(tmp_path / "run"))
    trainer = Trainer("speeder", cfg, *prepare(cfg, log=lambda *_: None), log=lambda *_: None)
    message = rf"{last / file}: tensor '{re.escape(tensor)}' holds a non-finite value \(nan at index \[0, 3\]\)"
    with pytest.raises(ValueError, match=message):
        trainer.resume(last)


# -- preemption -------------------------------------------------------------------------------------------------
@pytest.mark.usefixtures("one_thread")
def test_sigterm_mid_epoch_writes_last_exits_143_and_the_resume_equals_the_uninterrupted_run(uninterrupted, tmp_path):
    out = tmp_path / "run"
    config = write_config(tmp_path / "c.yaml", run_config(out))
    # the train CLI in one process; SIGTERM arrives right after global step 1, so step 2 is the last one
    status, _, err = run_process([str(WORKER), str(tmp_path / "worker"), "--kill", "0:1:SIGTERM", "--",
                                  "--config", config], tmp_path)
    assert status == 143, err[-3000:]
    last = out / "speeder" / "last"
    assert one_line(err) == (f"stopped by SIGTERM after stage 0 (text, main), epoch 0, step 2 (global step 2): {last} "
                             f"holds that step; resume by running the same command with --resume {last}")
    progress = read_resume_state(last).progress
    seconds = {k: progress.pop(k) for k in ("step_seconds", "run_seconds")}
    assert progress == {"phase": 0, "epoch": 0, "step_in_epoch": 2, "global_step": 2, "best_metric": None}
    assert 0 < seconds["step_seconds"] < seconds["run_seconds"]
    assert sorted(os.listdir(out / "speeder")) == ["last"]
    assert cli.main(["--config", config, "--resume", str(last)]) == 0
    assert_same_checkpoint(last, uninterrupted / "speeder" / "last")
    best = load_file(out / "speeder" / "best" / "model.safetensors")
    want = load_file(uninterrupted / "speeder" / "best" / "model.safetensors")
    assert best.keys() == want.keys() and all(torch.equal(best[n], want[n]) for n in want)


@pytest.mark.usefixtures("one_thread")
def test_sigint_stops_cleanly_at_the_step_it_arrives_in(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    config = write_config(tmp_path / "c.yaml", run_config(out, checkpoint_every=4))
    step = Trainer.train_step

    def interrupted_step(self, samples, batch):
        if self.progress.global_step == 5:  # Ctrl-C during the sixth step
            os.kill(os.getpid(), signal.SIGINT)
        return step(self, samples, batch)

    monkeypatch.setattr(Trainer, "train_step", interrupted_step)
    before = signal.getsignal(signal.SIGINT)
    assert cli.main(["--config", config]) == 130
    assert signal.getsignal(signal.SIGINT) is before  # the handlers are the caller's again
    last = out / "speeder" / "last"
    assert one_line(capsys.readouterr().err) == (
        f"stopped by SIGINT after stage 1 (text+image, warmup), epoch 0, step 2 (global step 6): {last} holds that "
        f"step; resume by running the same command with --resume {last}")
    assert read_resume_state(last).progress["global_step"] == 6


# -- a full disk ------------------------------------------------------------------------------------------------
def test_a_checkpoint_that_cannot_be_written_is_one_line_and_leaves_nothing_half_written(tmp_path):
    out = tmp_path / "run"
    config = write_config(tmp_path / "c.yaml", run_config(out))
    # files up to 200 KiB: the item table's (28 kB) are written, model.safetensors (~490 kB) is not
    status, _, err = run_process(["-m", "speeder_rt.train", "--config", config], tmp_path, limit_file_kb=200)
    assert status == 1, err[-3000:]
    line = one_line(err)
    assert line.startswith(f"error: could not write {out / 'speeder' / 'best'}: ") and "File too large" in line, line
    assert line.endswith("the checkpoint there before (if any) is intact (no last/ checkpoint was written yet); free "
                         "space or fix the directory, then resume"), line
    assert os.listdir(out / "speeder") == []  # the temporary directory went with the failed write


# -- resume with a changed config -------------------------------------------------------------------------------
@pytest.mark.usefixtures("one_thread")
def test_resume_with_a_changed_training_config_says_what_changed_and_refuses_unless_asked(uninterrupted, tmp_path,
                                                                                        capsys):
    last = uninterrupted / "speeder" / "last"
    changed = run_config(tmp_path / "elsewhere", weight_decay=0.1, checkpoint_every=5, progress=True)
    changed["mpo"][1]["lr"] = 0.001
    cfg = run_config_from_dict(changed)
    data = prepare(cfg, log=lambda *_: None)
    message = (rf"{last}: this run's config differs from the one the checkpoint was trained with \(mpo\[1\]\.lr: "
               r"0\.003 -> 0\.001; train\.weight_decay: 0\.0 -> 0\.1\), so resuming would not continue the same run; "
               r"pass --resume-changed-config")
    with pytest.raises(ValueError, match=message):  # out_dir, checkpoint_every and progress may change
        Trainer("speeder", cfg, *data, log=lambda *_: None).resume(last)
    lines = []
    Trainer("speeder", cfg, *data, log=lines.append).resume(last, allow_changed_config=True)
    assert any(line.startswith(f"note: resuming {last} with a changed config (mpo[1].lr: 0.003 -> 0.001; ")
               for line in lines), lines
    config = write_config(tmp_path / "c.yaml", changed)
    assert cli.main(["--config", config, "--resume", str(last)]) == 2
    assert "pass --resume-changed-config" in one_line(capsys.readouterr().err)
    assert cli.main(["--config", config, "--resume", str(last), "--resume-changed-config"]) == 0  # nothing left
