"""The shell scripts a user runs first: they fail loudly, with what to do, instead of going on."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_setup_says_what_to_install_when_venv_is_missing(tmp_path):
    """A Python without ``venv``/``ensurepip`` (Debian without python3-venv) gets the package
    name to install, not pip's or venv's traceback, and nothing is left half-made."""
    (tmp_path / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "setup.sh", tmp_path / "scripts" / "setup.sh")
    fake = tmp_path / "python3"
    fake.write_text(f'#!/bin/sh\ncase "$*" in *ensurepip*) exit 1;; esac\nexec {sys.executable} "$@"\n')
    fake.chmod(0o755)
    out = subprocess.run(["bash", "scripts/setup.sh"], cwd=tmp_path, capture_output=True, text=True,
                         env={**os.environ, "PYTHON": str(fake)}, timeout=60)
    assert out.returncode == 1
    assert "apt-get install python3-venv" in out.stderr and out.stderr.startswith("setup: error:")
    assert "ready" not in out.stdout and not (tmp_path / ".venv").exists()


def test_setup_refuses_a_python_that_is_too_old(tmp_path):
    (tmp_path / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "setup.sh", tmp_path / "scripts" / "setup.sh")
    fake = tmp_path / "python3"
    fake.write_text('#!/bin/sh\ncase "$*" in *version_info*) exit 1;; *) echo 3.8.10;; esac\n')
    fake.chmod(0o755)
    out = subprocess.run(["bash", "scripts/setup.sh"], cwd=tmp_path, capture_output=True, text=True,
                         env={**os.environ, "PYTHON": str(fake)}, timeout=60)
    assert out.returncode == 1 and "needs Python 3.11 or newer" in out.stderr


def test_gpu_bench_refuses_a_python_without_cuda():
    """bench/gpu.sh must not run its GPU benchmark on .venv's CPU torch."""
    out = subprocess.run(["bash", "bench/gpu.sh", "/nonexistent-out"], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": ""}, timeout=120)
    assert out.returncode == 2
    assert "has no CUDA torch" in out.stderr
