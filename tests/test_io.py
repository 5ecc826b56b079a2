"""Atomic writes (speeder_rt.utils.io): permissions, fsync order, leftovers of killed writers, concurrent writers."""
from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from speeder_rt.utils import io
from speeder_rt.utils.io import atomic_dir, atomic_path, write_json

ROOT = Path(__file__).resolve().parent.parent


@contextlib.contextmanager
def umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def entries(folder: Path) -> list[str]:
    return sorted(os.listdir(folder))


# --- permissions -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("mask", [0o022, 0o027], ids=["umask022", "umask027"])
def test_item_table_files_get_the_umask_permissions(tmp_path, mask):
    """safetensors >= 0.8 writes 0600 files (its own temp file + rename); the commit gives them the usual mode."""
    from speeder_rt.data.item_table import ItemTable

    table = ItemTable(["a", "b"], titles=["x", "y"])
    table.set_modality("text", np.ones((2, 4), dtype=np.float32))
    with umask(mask):
        table.save(tmp_path / "items")
    assert mode(tmp_path / "items") == 0o777 & ~mask
    assert mode(tmp_path / "items" / "features.safetensors") == 0o666 & ~mask
    assert mode(tmp_path / "items" / "items.json") == 0o666 & ~mask
    assert entries(tmp_path) == ["items"]


def test_atomic_path_permissions_and_executables(tmp_path):
    from safetensors.numpy import save_file

    with umask(0o022):
        with atomic_path(tmp_path / "w.safetensors") as tmp:
            save_file({"w": np.zeros(3)}, str(tmp))
        with atomic_dir(tmp_path / "d") as tmp:
            (tmp / "run.sh").write_text("#!/bin/sh\n")
            (tmp / "run.sh").chmod(0o700)
            (tmp / "sub").mkdir(mode=0o700)
            (tmp / "sub" / "f").write_text("f")
            (tmp / "sub" / "f").chmod(0o600)
    assert mode(tmp_path / "w.safetensors") == 0o644
    assert mode(tmp_path / "d" / "run.sh") == 0o755
    assert mode(tmp_path / "d" / "sub") == 0o755 and mode(tmp_path / "d" / "sub" / "f") == 0o644


# --- basic behaviour and failures ----------------------------------------------------------------------


def test_atomic_path_replaces_and_fails_cleanly(tmp_path):
    target = tmp_path / "out" / "x.json"
    write_json(target, {"a": 1})
    assert target.read_text() == '{\n  "a": 1\n}\n'
    with pytest.raises(RuntimeError, match="boom"), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("boom")
    assert target.read_text() == '{\n  "a": 1\n}\n' and entries(target.parent) == ["x.json"]
    with pytest.raises(FileNotFoundError, match=r"no file was written for .*x\.json"), atomic_path(target):
        pass
    assert entries(target.parent) == ["x.json"]


def test_atomic_dir_replaces_and_fails_cleanly(tmp_path):
    target = tmp_path / "d"
    with atomic_dir(target) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(RuntimeError, match="boom"), atomic_dir(target) as tmp:
        (tmp / "a").write_text("2")
        raise RuntimeError("boom")
    assert (target / "a").read_text() == "1" and entries(tmp_path) == ["d"]
    with pytest.raises(FileExistsError, match=r"d already exists"), atomic_dir(target, overwrite=False):
        pass
    assert entries(tmp_path) == ["d"]


@pytest.mark.parametrize("renameat2", [True, False], ids=["renameat2", "plain-rename"])
def test_atomic_dir_force_onto_a_file_leaves_nothing_behind(tmp_path, monkeypatch, renameat2):
    if not renameat2:
        monkeypatch.setattr(io, "_renameat2", None)
    target = tmp_path / "export"
    target.write_text("an old file")
    with atomic_dir(target) as tmp:
        (tmp / "a").write_text("new")
    assert (target / "a").read_text() == "new"
    assert entries(tmp_path) == ["export"]  # no .export.old-PID
    with atomic_dir(target) as tmp:  # and a directory onto a directory
        (tmp / "b").write_text("newer")
    assert entries(target) == ["b"] and entries(tmp_path) == ["export"]


def test_overwrite_false_refuses_a_target_created_during_the_write(tmp_path):
    target = tmp_path / "d"
    with pytest.raises(FileExistsError, match=r"d already exists \(created while this write ran\)"):
        with atomic_dir(target, overwrite=False) as tmp:
            (tmp / "mine").write_text("x")
            target.mkdir()
            (target / "theirs").write_text("y")
    assert entries(target) == ["theirs"] and entries(tmp_path) == ["d"]


# --- fsync before the rename ---------------------------------------------------------------------------


@pytest.fixture
def events(monkeypatch):
    """Records ("fsync", path) and ("rename", src, dst) in order."""
    log: list[tuple[str, ...]] = []
    real_fsync, real_replace, real_renameat2 = os.fsync, os.replace, io._renameat2

    def fsync(fd):
        log.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        log.append(("rename", str(src), str(dst)))
        real_replace(src, dst)

    def renameat2(dfd1, src, dfd2, dst, flags):
        rc = real_renameat2(dfd1, src, dfd2, dst, flags)
        if rc == 0:
            log.append(("rename", os.fsdecode(src), os.fsdecode(dst)))
        return rc

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(io, "_renameat2", renameat2)
    return log


def test_atomic_path_fsyncs_file_then_renames_then_fsyncs_directory(tmp_path, events):
    target = tmp_path / "last.pt"
    with atomic_path(target) as tmp:
        tmp.write_bytes(b"state")
    assert events == [("fsync", str(tmp)), ("rename", str(tmp), str(target)), ("fsync", str(tmp_path))]


def test_atomic_dir_fsyncs_everything_then_renames_then_fsyncs_directory(tmp_path, events):
    target = tmp_path / "items"
    for _ in range(2):  # first write (NOREPLACE), then a swap (EXCHANGE)
        events.clear()
        with atomic_dir(target) as tmp:
            (tmp / "sub").mkdir()
            (tmp / "sub" / "f").write_text("f")
            (tmp / "g").write_text("g")
        synced = {e[1] for e in events[:-2] if e[0] == "fsync"}
        assert synced == {str(tmp / "sub" / "f"), str(tmp / "sub"), str(tmp / "g"), str(tmp)}
        assert events[-2] == ("rename", str(tmp), str(target)) and events[-1] == ("fsync", str(tmp_path))
        assert events.index(("fsync", str(tmp / "sub" / "f"))) < events.index(("fsync", str(tmp / "sub")))
        assert entries(tmp_path) == ["items"] and entries(target) == ["g", "sub"]


# --- leftovers of killed writers -----------------------------------------------------------------------


def test_stale_leftovers_are_removed_and_others_kept(tmp_path):
    (tmp_path / ".items.k3j9x_2a.tmp").mkdir()  # a killed atomic_dir write (this or the previous version)
    (tmp_path / ".items.k3j9x_2a.tmp" / "features.safetensors").write_bytes(b"x" * 1000)
    (tmp_path / ".items.old-12345").mkdir()  # the previous version's moved-aside directory
    (tmp_path / ".items.old-12345" / "items.json").write_text("{}")
    (tmp_path / ".last.pt.ab12cd34.tmp").write_bytes(b"y")  # the previous version's temp file
    keep = [".items.notours.tmp", ".itemsx.ab12cd34.tmp", ".other.ab12cd34.tmp", "items.ab12cd34.tmp"]
    for name in keep:
        (tmp_path / name).write_text("not a leftover of 'items' or 'last.pt'")
    with atomic_dir(tmp_path / "items") as tmp:
        (tmp / "items.json").write_text("{}")
    assert entries(tmp_path) == sorted([*keep, ".last.pt.ab12cd34.tmp", "items"])
    with atomic_path(tmp_path / "last.pt") as tmp:
        tmp.write_bytes(b"z")
    assert entries(tmp_path) == sorted([*keep, "items", "last.pt"])


HOLD = """
import sys, time
from pathlib import Path
from speeder_rt.utils.io import atomic_dir, atomic_path
target = Path(sys.argv[1])
if sys.argv[2] == "dir":
    with atomic_dir(target) as tmp:
        (tmp / "part").write_bytes(b"x" * 100_000)
        print("ready", flush=True)
        time.sleep(float(sys.argv[3]))
else:
    with atomic_path(target) as tmp:
        tmp.write_bytes(b"partial")
        print("ready", flush=True)
        time.sleep(float(sys.argv[3]))
"""


def start_holder(target: Path, kind: str, seconds: float) -> subprocess.Popen:
    """A writer that stops inside its write (after printing 'ready') for ``seconds``."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(target), kind, str(seconds)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ready, _, _ = select.select([proc.stdout], [], [], 30)
    if not ready or proc.stdout.readline().strip() != "ready":
        proc.kill()
        proc.wait(10)
        raise AssertionError(f"holder did not start: {proc.stderr.read()}")
    return proc


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(10)


def write_target(target: Path, kind: str, text: str) -> None:
    if kind == "dir":
        with atomic_dir(target) as tmp:
            (tmp / "content").write_text(text)
    else:
        with atomic_path(target) as tmp:
            tmp.write_text(text)


def read_target(target: Path, kind: str) -> str:
    return (target / "content" if kind == "dir" else target).read_text()


@pytest.mark.parametrize("kind", ["dir", "file"])
def test_kill9_mid_write_then_the_next_write_cleans_up(tmp_path, kind):
    target = tmp_path / ("items" if kind == "dir" else "last.pt")
    write_target(target, kind, "v1")
    proc = start_holder(target, kind, 60)
    try:
        (live,) = [n for n in entries(tmp_path) if n.startswith(f".{target.name}.")]
        write_target(target, kind, "v2")  # a write while the holder is alive keeps the holder's temp
        assert entries(tmp_path) == sorted([live, target.name]) and read_target(target, kind) == "v2"
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        assert entries(tmp_path) == sorted([live, target.name])  # the killed write's leftover ...
        write_target(target, kind, "v3")
        assert entries(tmp_path) == [target.name]  # ... is gone after the next write
        assert read_target(target, kind) == "v3"
    finally:
        stop(proc)


def test_live_writer_finishes_after_a_concurrent_write(tmp_path):
    target = tmp_path / "items"
    proc = start_holder(target, "dir", 1.0)
    try:
        write_target(target, "dir", "theirs")
        assert proc.wait(30) == 0, proc.stderr.read()
    finally:
        stop(proc)
    assert entries(tmp_path) == ["items"] and entries(target) == ["part"]  # the holder finished last: it wins


# --- concurrent writers and readers --------------------------------------------------------------------

WRITER = """
import os, random, sys, time
from pathlib import Path
from speeder_rt.utils import io
target, kind, wid, n, renameat2 = Path(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5] == "1"
if not renameat2:
    io._renameat2 = None
rng = random.Random(wid)
for i in range(n):
    tag = f"{wid}:{i}".encode()
    if kind == "dir":
        with io.atomic_dir(target) as tmp:
            for name in ("a", "b", "c"):
                (tmp / name).write_bytes(tag + b"|" + os.urandom(rng.randrange(1, 20_000)))
            time.sleep(rng.random() * 0.01)
    else:
        with io.atomic_path(target) as tmp:
            with open(tmp, "wb") as f:
                f.write(tag + b"|")
                time.sleep(rng.random() * 0.01)
                f.write(b"x" * rng.randrange(1, 20_000) + b"|end")
"""

READER = """
import os, sys, time
from pathlib import Path
target, kind, renameat2, stop = Path(sys.argv[1]), sys.argv[2], sys.argv[3] == "1", Path(sys.argv[4])
reads, seen, deadline = 0, False, time.monotonic() + 120


def fail(msg):
    print(msg, flush=True)
    sys.exit(1)


def snapshot_dir():
    fd = os.open(target, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            names = sorted(os.listdir(fd))
            tags = set()
            for name in names:
                f = os.open(name, os.O_RDONLY, dir_fd=fd)
                with os.fdopen(f, "rb") as fh:
                    tags.add(fh.read().split(b"|")[0])
            if names == ["a", "b", "c"] and len(tags) == 1:
                return
        except FileNotFoundError:
            pass
        st, own = os.stat(target), os.fstat(fd)
        if (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino):  # not a replaced directory being deleted
            fail(f"incomplete directory at the target: {names}")
    finally:
        os.close(fd)


while not stop.exists() and time.monotonic() < deadline:
    try:
        if kind == "dir":
            snapshot_dir()
        else:
            data = target.read_bytes()
            if not data.endswith(b"|end") or data.count(b"|") != 2:
                fail(f"half-written file: {len(data)} bytes")
        reads += 1
        seen = True
    except FileNotFoundError:
        if seen and renameat2:
            fail("the target was missing")
print(reads, flush=True)
"""


@pytest.mark.parametrize("renameat2", [True, False], ids=["renameat2", "plain-rename"])
@pytest.mark.parametrize("kind", ["dir", "file"])
def test_concurrent_writers_never_fail_and_leave_nothing(tmp_path, kind, renameat2):
    """4 processes write the same target 25 times each while a reader checks every version it sees."""
    target, stop_file, n = tmp_path / "out" / "target", tmp_path / "stop", 25
    flag = "1" if renameat2 else "0"
    reader = subprocess.Popen([sys.executable, "-c", READER, str(target), kind, flag, str(stop_file)], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(target), kind, f"w{w}", str(n), flag], cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for w in range(4)]
    try:
        for w in writers:
            _, err = w.communicate(timeout=120)
            assert w.returncode == 0, err
        stop_file.touch()
        out, err = reader.communicate(timeout=60)
        assert reader.returncode == 0, out + err
        assert int(out) > 0
    finally:
        for proc in [*writers, reader]:
            stop(proc)
    assert entries(target.parent) == ["target"]  # no temp or old folders
    final = (target / "a" if kind == "dir" else target).read_bytes().split(b"|")[0].decode()
    assert final in {f"w{w}:{n - 1}" for w in range(4)}  # some writer's last write: the last complete one
    if kind == "dir":
        assert entries(target) == ["a", "b", "c"]
        assert {(target / name).read_bytes().split(b"|")[0].decode() for name in "abc"} == {final}
