"""Run directories: every artifact is written atomically.

A file is written to a temporary name in the same folder, flushed, fsynced and renamed over the
final name, so a crash or kill leaves either the old file or the new one, never a torn one.
Folders (a saved adapter) are written into a temporary sibling folder and renamed in one step.

Layout of a run directory::

    DIR/config.yaml            resolved configuration
    DIR/learner.json           the learner's paper and capabilities (module per task, routing...)
    DIR/metrics.json           metrics, mean over seeds (+ std and per-seed values)
    DIR/summary.md             readable summary table
    DIR/*.png                  plots
    DIR/seed-<s>/metrics.json  metrics of one seed
    DIR/seed-<s>/state.json    progress of that seed (finished tasks), for resume
    DIR/seed-<s>/adapters/<task>/   peft adapter + head after learning <task>
    DIR/seed-<s>/checkpoint/   training state for ``--resume`` (removed when the seed finishes)
    DIR/manifest.json          every artifact with its size and SHA-256 (``conpet verify DIR``)

While a seed runs, its ``state.json`` lists the SHA-256 of every adapter file written so far, so
``conpet verify`` also checks an unfinished run.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from conpet.config import RunConfig, load_config
from conpet.errors import ConfigError, ConpetError, ModelError


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temp file, flush, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces ``path`` in one rename.

    If the body raises, the temporary folder is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        for child in tmp.rglob("*"):
            if child.is_file():
                with open(child, "rb") as f:
                    os.fsync(f.fileno())
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def seed_dir(run_dir: str | os.PathLike, seed: int) -> Path:
    return Path(run_dir) / f"seed-{seed}"


def adapter_dir(run_dir: str | os.PathLike, seed: int, task: str) -> Path:
    """Where the modules after ``task`` of seed ``seed`` live: ``DIR/seed-<s>/adapters/<task>``."""
    return seed_dir(run_dir, seed) / "adapters" / task


def load_run_config(path: str | os.PathLike) -> RunConfig:
    """The configuration a run directory saved (``config.yaml``, or a task-orders folder's
    ``orders-config.yaml``). A run saves the number of layers ``train.top_layers: auto`` chose, so
    it resumes and predicts on the layers it trained whatever ``auto`` means later; a saved
    ``auto`` comes from a development snapshot that did not, and is an error saying what to write."""
    cfg = load_config(str(path))
    if cfg.train.top_layers == "auto":
        lines = Path(path).read_text(encoding="utf-8").splitlines()
        line = next((k for k, text in enumerate(lines, 1) if text.strip().startswith("top_layers:")), 1)
        raise ConfigError(f"{path}:{line}: train.top_layers: auto was saved by a development version that did not "
                          f"record the layers it chose; write the number this run used (4 for a backbone deeper "
                          f"than 8 layers, null for a shallower one), then resume or predict again")
    return cfg


def run_config(run_dir: Path) -> RunConfig:
    """The configuration of run directory ``run_dir``; a clear error if it is not one."""
    for name in ("config.yaml", "stream.json"):
        if not (run_dir / name).is_file():
            raise ConpetError(f"{run_dir}: not a conpet run directory (no {name})")
    return load_run_config(run_dir / "config.yaml")


def finished_run(run_dir: str | os.PathLike, seed: int | None) -> tuple[RunConfig, int, list[str], Path]:
    """``(config, seed, task names, seed folder)`` of a run whose last task has finished; a clear
    error otherwise (shared by evaluate, predict, merge, compress and export)."""
    run_dir = Path(run_dir)
    cfg = run_config(run_dir)
    seed = cfg.seed if seed is None else seed
    tasks = [t["name"] for t in read_json(run_dir / "stream.json")["tasks"]]
    if not adapter_dir(run_dir, seed, tasks[-1]).is_dir():
        raise ConpetError(f"{seed_dir(run_dir, seed)}: the run has not finished its last task ({tasks[-1]})")
    return cfg, seed, tasks, seed_dir(run_dir, seed)


LEARNER_FILE = "learner.json"


def run_learner(run_dir: str | os.PathLike) -> dict[str, Any]:
    """The learner a run was made with, as its ``learner.json`` describes it: ``name``, ``paper``
    and its capabilities (``module_per_task``, ``routes``, ``generative``...), so that code below
    the learners (export, merge) reads what a run holds without importing the learner."""
    path = Path(run_dir) / LEARNER_FILE
    if not path.is_file():
        raise ConpetError(f"{run_dir}: no {LEARNER_FILE} (made by an earlier conpet); `conpet run --resume "
                          f"{run_dir}` writes it")
    return read_json(path)


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".npy", ".npz")


def check_safe_folder(folder: str | os.PathLike) -> None:
    """Refuse a saved module folder holding pickled files: conpet reads only safetensors and JSON
    (unpickling runs arbitrary code)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelError(f"{folder}: no such adapter folder")
    unsafe = sorted(f.name for f in folder.iterdir() if f.suffix.lower() in PICKLE_SUFFIXES)
    if unsafe:
        raise ModelError(f"{folder}: refusing to load pickled file(s) {', '.join(unsafe)}; conpet reads only "
                         f".safetensors and .json")
    if not any(folder.glob("*.safetensors")):
        raise ModelError(f"{folder}: no .safetensors weights in the adapter folder")


def check_binding(folder: str | os.PathLike, fingerprint: str, backbone_desc: str) -> None:
    """Refuse a module saved on another base model (its ``conpet.json`` records the base's fingerprint)."""
    meta_file = Path(folder) / "conpet.json"
    if not meta_file.is_file():
        return
    meta = read_json(meta_file)
    saved = meta.get("backbone_fingerprint")
    if saved and saved != fingerprint:
        raise ModelError(f"{folder}: this adapter was trained on base model {meta.get('backbone_path', '?')} "
                         f"(fingerprint {saved}), not on {backbone_desc} (fingerprint {fingerprint}); "
                         f"refusing to load it onto a different base")


MANIFEST = "manifest.json"


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _artifact_files(root: Path, under: Path) -> list[Path]:
    """Files under ``under`` except temporaries, checkpoints and the manifest itself."""
    out = []
    for f in sorted(under.rglob("*")):
        rel = f.relative_to(root)
        if not f.is_file() or any(part.startswith(".") for part in rel.parts):
            continue
        if "checkpoint" in rel.parts or rel.as_posix() == MANIFEST:
            continue
        out.append(f)
    return out


def hash_files(root: str | os.PathLike, under: str | os.PathLike) -> dict[str, str]:
    """``{path relative to root: sha256}`` of every artifact file under ``under``."""
    root = Path(root)
    return {f.relative_to(root).as_posix(): sha256_file(f) for f in _artifact_files(root, Path(under))}


def write_manifest(run_dir: str | os.PathLike) -> Path:
    """List every artifact of a finished run with its size and SHA-256 (written atomically)."""
    root = Path(run_dir)
    files = {f.relative_to(root).as_posix(): {"bytes": f.stat().st_size, "sha256": sha256_file(f)}
             for f in _artifact_files(root, root)}
    return atomic_write_json(root / MANIFEST, {"files": files})


def verify_run(run_dir: str | os.PathLike) -> tuple[list[str], list[str]]:
    """Check a run directory against its manifest (or, unfinished, its seeds' ``state.json``).

    Returns ``(problems, notes)``: problems are missing or changed files; notes describe what was
    checked (and files present but not listed)."""
    root = Path(run_dir)
    problems: list[str] = []
    notes: list[str] = []
    if (root / MANIFEST).is_file():
        listed = read_json(root / MANIFEST)["files"]
        for rel, info in listed.items():
            f = root / rel
            if not f.is_file():
                problems.append(f"missing: {rel}")
            elif f.stat().st_size != info["bytes"] or sha256_file(f) != info["sha256"]:
                problems.append(f"changed: {rel} (SHA-256 differs from the manifest)")
        extra = sorted(set(hash_files(root, root)) - set(listed))
        notes.append(f"manifest: {len(listed)} files checked")
        notes.extend(f"not in the manifest: {rel}" for rel in extra)
        return problems, notes
    states = sorted(root.glob("seed-*/state.json"))
    if not states:
        problems.append(f"{root}: no manifest.json and no seed state.json (not a conpet run directory?)")
        return problems, notes
    for state_file in states:
        state = read_json(state_file)
        artifacts = state.get("artifacts", {})
        for rel, digest in artifacts.items():
            f = root / rel
            if not f.is_file():
                problems.append(f"missing: {rel}")
            elif sha256_file(f) != digest:
                problems.append(f"changed: {rel} (SHA-256 differs from {state_file.relative_to(root)})")
        notes.append(f"{state_file.parent.name}: unfinished run, {state.get('finished_tasks', 0)} task(s) done, "
                     f"{len(artifacts)} adapter files checked")
    return problems, notes


def recover_interrupted(run_dir: str | os.PathLike) -> list[str]:
    """Undo what a kill can leave behind: a folder replaced half-way by :func:`atomic_directory`
    (``.NAME.old`` with no ``NAME``) is put back; temporary files and folders are removed."""
    actions = []
    root = Path(run_dir)
    for old in sorted(root.rglob(".*.old")):
        target = old.with_name(old.name[1:-4])
        if old.is_dir() and not target.exists():
            os.replace(old, target)
            actions.append(f"restored {target.relative_to(root)}")
        else:
            shutil.rmtree(old, ignore_errors=True)
    for tmp in sorted(root.rglob(".*.tmp"), reverse=True):
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        actions.append(f"removed {tmp.relative_to(root)}")
    return actions


def verified_tasks(run_dir: str | os.PathLike, seed: int, tasks: list[str]) -> tuple[int, list[str]]:
    """How many of ``tasks`` (in stream order) seed ``seed`` has finished with every adapter file
    matching its recorded SHA-256 (``manifest.json`` of a finished run, else the seed's
    ``state.json``), and the problems that stopped the count (a changed, missing or unrecorded
    file): what may be loaded for serving. A task still being written is not finished yet; a
    finished run's task may have no folder (a merged run keeps the last task's alone)."""
    root = Path(run_dir)
    state_file = seed_dir(root, seed) / "state.json"
    if (root / MANIFEST).is_file():
        recorded = {rel: info["sha256"] for rel, info in read_json(root / MANIFEST)["files"].items()}
        finished = len(tasks) if adapter_dir(root, seed, tasks[-1]).is_dir() else 0
    elif state_file.is_file():
        state = read_json(state_file)
        recorded, finished = state.get("artifacts", {}), int(state.get("finished_tasks", 0))
    else:
        return 0, []
    for k, task in enumerate(tasks[:finished]):
        folder = adapter_dir(root, seed, task)
        prefix = folder.relative_to(root).as_posix() + "/"
        on_disk = {f.relative_to(root).as_posix(): f for f in _artifact_files(root, folder)} if folder.is_dir() else {}
        problems = [f"missing: {rel}" for rel in recorded if rel.startswith(prefix) and rel not in on_disk]
        for rel, f in on_disk.items():
            if rel not in recorded:
                problems.append(f"not recorded: {rel} (no SHA-256 for it in the run's records)")
            elif sha256_file(f) != recorded[rel]:
                problems.append(f"changed: {rel} (SHA-256 differs from the run's records)")
        if problems:
            return k, problems
    return finished, []
