"""The adapter lifecycle after (or during) a stream: merge per-task LoRA modules into one,
compress them for storage (ComPEFT), and read/write plain peft LoRA folders.

Merging works on the weight update ``dW = scaling * B @ A`` of every LoRA layer, never on the
factors separately (averaging A and B apart is not averaging dW); the merged ``dW`` is brought
back to a LoRA of a chosen rank by truncated SVD, with the relative reconstruction error
reported per layer (:func:`conpet.merging.to_lora`). Merge rules: :mod:`conpet.merging`.

A peft LoRA folder holds ``adapter_config.json`` and ``adapter_model.safetensors`` with keys
``base_model.model.<module path>.lora_A.weight`` / ``.lora_B.weight``; that is all read or
written here (safetensors and JSON only).
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor
from safetensors.torch import load_file, save_file

from conpet.compress import compress_lora_folder, decompress_lora_folder, is_compressed
from conpet.errors import ConfigError, ConpetError, ModelError
from conpet.heads import GrowingHead, concat_heads
from conpet.merging import get_merge_method, merge_state
from conpet.runs import (LEARNER_FILE, adapter_dir, atomic_directory, atomic_write_json, atomic_write_text,
                         check_safe_folder, finished_run, run_learner, write_manifest)

LoraFactors = dict[str, tuple[torch.Tensor, torch.Tensor]]
"""module path -> (A [r, in], B [out, r])"""


def lora_scaling(config: dict) -> float:
    """peft's LoRA scaling for a config: ``lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA)."""
    r, alpha = config["r"], config["lora_alpha"]
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def lora_delta(A: Tensor, B: Tensor, scaling: float = 1.0) -> Tensor:
    """The dense update of a LoRA pair as peft applies it: ``dW = scaling * B @ A``.

    ``A`` is ``[r, in_features]`` (peft's ``lora_A.weight``), ``B`` is ``[out_features, r]``
    (``lora_B.weight``), ``scaling = lora_alpha / r`` (or ``/ sqrt(r)`` with rsLoRA).
    Hu et al. (2022), "LoRA: Low-Rank Adaptation of Large Language Models", arXiv:2106.09685.
    """
    if A.dim() != 2 or B.dim() != 2 or B.shape[1] != A.shape[0]:
        raise ConfigError(
            f"lora_delta: expected A [r, in] and B [out, r], got A {tuple(A.shape)} and "
            f"B {tuple(B.shape)}"
        )
    return scaling * (B @ A)


def to_lora(dW: Tensor, rank: int, *, scaling: float = 1.0) -> tuple[Tensor, Tensor, float]:
    """Factor ``dW`` into LoRA ``(A, B)`` of rank ``rank`` by truncated SVD.

    With ``dW = U S V^T``: ``B = U_r sqrt(S_r)``, ``A = sqrt(S_r) V_r^T``, so ``B @ A`` is the best
    rank-``r`` approximation of ``dW`` in Frobenius norm (Eckart-Young). With ``scaling`` (the
    LoRA ``lora_alpha / r`` the factors will be used with) both factors are divided by
    ``sqrt(scaling)``, so ``lora_delta(A, B, scaling)`` approximates ``dW``.

    Returns ``(A [rank, in], B [out, rank], rel_error)`` with
    ``rel_error = ||dW - B A||_F / ||dW||_F`` (0 for a zero ``dW``), which equals
    ``sqrt(sum_{i>r} s_i^2 / sum_i s_i^2)``.
    """
    if dW.dim() != 2:
        raise ConfigError(f"to_lora: expected a 2-D update, got shape {tuple(dW.shape)}")
    max_rank = min(dW.shape)
    if not isinstance(rank, int) or not 1 <= rank <= max_rank:
        raise ConfigError(f"to_lora: rank must be an integer in [1, {max_rank}], got {rank!r}")
    if not scaling > 0:
        raise ConfigError(f"to_lora: scaling must be > 0, got {scaling!r}")
    work = dW.detach().to(torch.float64 if dW.dtype == torch.float64 else torch.float32)
    U, S, Vh = torch.linalg.svd(work, full_matrices=False)
    root = S[:rank].sqrt() / math.sqrt(scaling)
    B = U[:, :rank] * root.unsqueeze(0)
    A = root.unsqueeze(1) * Vh[:rank, :]
    norm = torch.linalg.matrix_norm(work)
    residual = torch.linalg.matrix_norm(work - scaling * (B @ A))
    rel_error = 0.0 if norm == 0 else float(residual / norm)
    return A.to(dW.dtype), B.to(dW.dtype), rel_error


def read_lora(folder: str | Path) -> tuple[dict, LoraFactors]:
    """The adapter config and the LoRA factors of a peft LoRA folder."""
    folder = Path(folder)
    check_safe_folder(folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    if config.get("peft_type") != "LORA":
        raise ModelError(f"{folder}: a {config.get('peft_type')} adapter; merging and compression need LoRA")
    if config.get("use_dora"):
        raise ModelError(f"{folder}: DoRA adapters have a magnitude vector; merging them on dW is not supported")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise ModelError(f"{folder}: per-layer rank/alpha patterns are not supported here")
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    factors: LoraFactors = {}
    for key, a in tensors.items():
        if key.endswith(".lora_A.weight"):
            path = key[: -len(".lora_A.weight")]
            factors[path] = (a.float(), tensors[f"{path}.lora_B.weight"].float())
    if not factors:
        raise ModelError(f"{folder}: no LoRA weights in adapter_model.safetensors")
    return config, factors


def write_lora(folder: str | Path, template: dict, factors: LoraFactors, rank: int, alpha: float | None = None) -> None:
    """Write a plain peft LoRA folder (``folder`` exists) with ``template``'s targets and layers,
    rank ``rank`` and ``lora_alpha`` = ``alpha`` (default: ``rank``, so scaling 1)."""
    folder = Path(folder)
    config = {**template, "r": rank, "lora_alpha": rank if alpha is None else alpha, "use_rslora": False,
              "use_dora": False, "rank_pattern": {}, "alpha_pattern": {}, "inference_mode": True}
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))
    tensors = {}
    for path, (a, b) in factors.items():
        tensors[f"{path}.lora_A.weight"] = a.contiguous()
        tensors[f"{path}.lora_B.weight"] = b.contiguous()
    save_file(tensors, str(folder / "adapter_model.safetensors"))


def lora_deltas(config: dict, factors: LoraFactors) -> dict[str, torch.Tensor]:
    """``dW`` of every LoRA layer."""
    scaling = lora_scaling(config)
    return {path: lora_delta(a, b, scaling) for path, (a, b) in factors.items()}


@dataclass
class MergeResult:
    factors: LoraFactors
    rank: int
    errors: dict[str, float] = field(default_factory=dict)
    """relative Frobenius reconstruction error of the rank-``rank`` LoRA, per layer"""

    @property
    def mean_error(self) -> float:
        return sum(self.errors.values()) / max(1, len(self.errors))

    @property
    def max_error(self) -> float:
        return max(self.errors.values(), default=0.0)


def merge_lora(modules: list[tuple[dict, LoraFactors]], method: str, rank: int, **options) -> MergeResult:
    """Merge per-task LoRA modules on ``dW`` with a :mod:`conpet.merging` method and factor the
    result back to rank ``rank`` (scaling 1: ``lora_alpha = r``)."""
    if not modules:
        raise ConfigError("merge: no modules to merge")
    get_merge_method(method)
    deltas = [lora_deltas(config, factors) for config, factors in modules]
    merged = merge_state(deltas, method, **options)
    result = MergeResult(factors={}, rank=rank)
    for path, dw in merged.items():
        r = min(rank, *dw.shape)
        a, b, err = to_lora(dw, r)
        if r < rank:  # keep one rank for the whole module: pad with zero directions
            a = torch.cat([a, torch.zeros(rank - r, a.shape[1])])
            b = torch.cat([b, torch.zeros(b.shape[0], rank - r)], dim=1)
        result.factors[path] = (a, b)
        result.errors[path] = err
    return result


# -- whole runs -------------------------------------------------------------------------------------
def merge_run(run_dir: str | Path, method: str, rank: int, out: str | Path, seed: int | None = None,
              **options) -> dict:
    """Merge the per-task experts of a run with a module and a head per task and a selector
    (``dynamic``) into one LoRA module (on dW, then rank
    ``rank`` by SVD) plus the concatenation of their heads; write ``out`` as a run directory
    (learner ``merge``) that ``conpet predict``/``evaluate`` load, and whose module is a plain
    peft adapter. Returns the reconstruction errors."""
    cfg, seed, tasks, sdir = finished_run(Path(run_dir), seed)
    learner = run_learner(run_dir)
    if not (learner["module_per_task"] and learner["routes"] == "selector"):
        raise ConpetError(f"{run_dir}: merging needs one module and one head per task (the experts of a learner "
                          f"that routes with a selector, such as `dynamic`); this run's learner is '{cfg.learner}'")
    folders = [adapter_dir(run_dir, seed, task) for task in tasks]
    modules = [read_lora(f) for f in folders]
    heads = [GrowingHead.load(f) for f in folders]
    result = merge_lora(modules, method, rank, **options)
    out = Path(out)
    merged_cfg = dataclasses.replace(cfg, learner="merge", out=str(out),
                                     learner_options={"method": method, "rank": rank, "merge_options": options})
    info = {"source_run": str(run_dir), "seed": seed, "method": method, "merge_options": options, "rank": rank,
            "tasks_merged": len(tasks), "mean_relative_reconstruction_error": result.mean_error,
            "max_relative_reconstruction_error": result.max_error}
    with atomic_directory(out) as tmp:
        atomic_write_text(tmp / "config.yaml", merged_cfg.to_yaml())
        shutil.copy2(Path(run_dir) / "stream.json", tmp / "stream.json")
        # the merged run holds one module that answers every input, whatever its source held
        atomic_write_json(tmp / LEARNER_FILE, {**learner, "name": "merge", "paper": None, "merged_from": learner["name"],
                                             "module_per_task": False, "routes": None})
        folder = adapter_dir(tmp, seed, tasks[-1])
        folder.mkdir(parents=True)
        template = {k: v for k, v in modules[0][0].items()}
        write_lora(folder, template, result.factors, rank)
        concat_heads(heads, heads[0].hidden_size).save(folder)
        meta = json.loads((folders[-1] / "conpet.json").read_text())
        meta.update({"learner": "merge", "module": "default", "labels": [l for h in heads for l in h.labels]})
        meta.pop("top_k", None)
        (folder / "conpet.json").write_text(json.dumps(meta, indent=2))
        (folder / "merge.json").write_text(json.dumps(info, indent=2))
        atomic_write_json(tmp / "merge.json", info)
        write_manifest(tmp)
    return info


def compress_run(run_dir: str | Path, density: float, out: str | Path, alpha: float = 1.0) -> dict:
    """ComPEFT-compress every LoRA module of a run (all seeds, all tasks; heads kept) into ``out``,
    a run directory that ``conpet predict``/``evaluate`` load (decompressing on load)."""
    run_dir, out = Path(run_dir), Path(out)
    finished_run(run_dir, None)
    if not 0 < density <= 1:
        raise ConpetError(f"--density must be in (0, 1], got {density}")
    original = compressed = 0
    with atomic_directory(out) as tmp:
        for name in ("config.yaml", "stream.json", LEARNER_FILE):
            if (run_dir / name).is_file():
                shutil.copy2(run_dir / name, tmp / name)
        for weights in sorted(run_dir.glob("seed-*/adapters/**/adapter_model.safetensors")):
            src = weights.parent
            dst = tmp / src.relative_to(run_dir)
            dst.mkdir(parents=True, exist_ok=True)
            a, b = compress_lora_folder(src, dst, density, alpha)
            original, compressed = original + a, compressed + b
        for head in sorted(run_dir.glob("seed-*/adapters/**/head.*")):  # folders without LoRA weights
            dst = tmp / head.relative_to(run_dir)
            if not dst.exists():
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(head, dst)
        info = {"source_run": str(run_dir), "density": density, "alpha": alpha,
                "adapter_bytes": original, "compressed_bytes": compressed,
                "compression_ratio": original / max(1, compressed)}
        atomic_write_json(tmp / "compress.json", info)
        write_manifest(tmp)
    return info


def export_peft(run_dir: str | Path, out: str | Path, seed: int | None = None) -> list[Path]:
    """Write the run's final modules as plain peft LoRA folders (decompressed if needed) under
    ``out``: one folder per module that prediction uses (every task's module of a learner with a
    module per task, and its selector where it routes with one; the one module of any other)."""
    cfg, seed, tasks, sdir = finished_run(Path(run_dir), seed)
    learner = run_learner(run_dir)
    chosen = [(task, adapter_dir(run_dir, seed, task)) for task in (tasks if learner["module_per_task"] else tasks[-1:])]
    selector = adapter_dir(run_dir, seed, tasks[-1]) / "selector"
    if learner["routes"] == "selector" and selector.is_dir():
        chosen.append(("selector", selector))
    written = []
    for name, src in chosen:
        with atomic_directory(Path(out) / name) as tmp:
            if is_compressed(src):
                decompress_lora_folder(src, tmp)
            else:
                check_safe_folder(src)
                for f in src.iterdir():
                    if f.is_file():
                        shutil.copy2(f, tmp / f.name)
        written.append(Path(out) / name)
    return written
