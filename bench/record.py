"""How a benchmark record was made: the provenance every JSON under ``bench/results/`` carries.

    from record import provenance, write_record
    write_record(path, {"args": vars(args), "results": ...})   # adds "provenance"

``provenance()`` names the exact command (script and arguments), the git commit (and whether the
work tree had uncommitted changes), the UTC date, the machine (CPU model, cores, the torch threads
the run used, the GPU where one ran) and the torch/transformers/peft versions.
``tests/test_records.py`` refuses a record without these fields.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIELDS = ("command", "commit", "date", "machine", "versions")
MACHINE_FIELDS = ("cpu", "cores", "threads")
VERSION_FIELDS = ("python", "torch", "transformers", "peft")


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def command_line(argv: list[str] | None = None) -> str:
    """The command as a user would type it again: the script's path relative to the repository."""
    argv = list(sys.argv if argv is None else argv)
    script = Path(argv[0]).resolve()
    try:
        argv[0] = str(script.relative_to(ROOT))
    except ValueError:
        pass
    return "python " + shlex.join(argv)


def provenance(argv: list[str] | None = None, device: str = "cpu") -> dict:
    """The provenance fields of a record made now by this process."""
    import torch

    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("transformers", "peft"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            versions[name] = None
    machine = {"cpu": cpu_model(), "cores": os.cpu_count(), "threads": torch.get_num_threads()}
    if str(device).startswith("cuda") and torch.cuda.is_available():
        machine["gpu"] = torch.cuda.get_device_name()
    return {
        "command": command_line(argv),
        "commit": _git("rev-parse", "HEAD") or None,
        "dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": machine,
        "versions": versions,
    }


def missing_fields(record: dict) -> list[str]:
    """The provenance fields a record lacks (empty when it is complete)."""
    prov = record.get("provenance")
    if not isinstance(prov, dict):
        return ["provenance"]
    out = [f for f in FIELDS if not prov.get(f)]
    out += [f"machine.{f}" for f in MACHINE_FIELDS if not (prov.get("machine") or {}).get(f)]
    out += [f"versions.{f}" for f in VERSION_FIELDS if not (prov.get("versions") or {}).get(f)]
    return out


def write_record(path: str | Path, data: dict, argv: list[str] | None = None, device: str = "cpu") -> dict:
    """Write ``data`` plus its provenance to ``path`` atomically; returns what was written."""
    path = Path(path)
    out = {"provenance": provenance(argv, device), **{k: v for k, v in data.items() if k != "provenance"}}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(out, indent=2) + "\n")
    tmp.replace(path)
    return out
