"""Export a generative run's bank for vLLM: one plain peft LoRA folder per task, in the form vLLM
loads (``vllm serve BASE --enable-lora --lora-modules task=DIR/task ...``), checked against the
base model so that no module name can miss (vLLM then silently serves the base model: vllm
issues #34186, #55193).

What vLLM cannot serve is refused with the reason: classification runs (their answers come from
a head), learners whose answers are not one LoRA module (an ensemble, weights merged into the
backbone), DoRA, prompt methods and other non-LoRA PET methods, initialisations that change the
base weights (PiSSA...), modules outside the transformer's linear layers.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from conpet.backbone import resolve_model
from conpet.compress import decompress_lora_folder, is_compressed
from conpet.errors import ConpetError
from conpet.learners import get_learner
from conpet.runs import (adapter_dir, atomic_directory, atomic_write_json, atomic_write_text, check_safe_folder,
                         finished_run, read_json)

VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""The values vLLM accepts for ``--max-lora-rank`` (``vllm/config/lora.py``)."""
PREFIX = "base_model.model."
EXPORT_FILE = "conpet-export.json"


def export_vllm(run_dir: str | Path, out: str | Path, seed: int | None = None) -> dict[str, Any]:
    """Write ``out/<task>/`` (adapter_config.json + adapter_model.safetensors) for every task of
    a finished generative run, ``out/README.md`` with the ``vllm serve`` line and
    ``out/conpet-export.json`` (task -> folder, base model, routing). Returns that description.
    A learner with one module for every task exports it once (``out/all-tasks``), every task
    named after it."""
    run_dir, out = Path(run_dir), Path(out)
    cfg, seed, tasks, _ = finished_run(run_dir, seed)
    learner = get_learner(cfg.learner)
    if read_json(run_dir / "stream.json")["kind"] != "generate":
        raise ConpetError(f"{run_dir}: vLLM serves generative runs; this run classifies (its answers come from a "
                          f"classification head, which a LoRA adapter cannot hold): use `conpet serve`")
    if not learner.exports_lora:
        raise ConpetError(f"{run_dir}: learner '{cfg.learner}' does not answer with one LoRA module per request "
                          f"(an ensemble of modules, or weights merged into the backbone), which is all vLLM serves; "
                          f"use `conpet serve`")
    base = resolve_model(cfg.model)
    skeleton = _skeleton(base)
    per_task = learner.module_per_task
    folders = {task: task for task in tasks} if per_task else {task: "all-tasks" for task in tasks}
    sources = {task: adapter_dir(run_dir, seed, task) for task in tasks} if per_task else \
        {"all-tasks": adapter_dir(run_dir, seed, tasks[-1])}
    ranks = {}
    with atomic_directory(out) as tmp:
        for name, src in sources.items():
            ranks[name] = _export_folder(src, tmp / name, skeleton, str(base))
        description = {"run": str(run_dir), "seed": seed, "base_model": str(base), "learner": cfg.learner,
                       "routes": learner.routes, "tasks": folders, "ranks": ranks,
                       "max_lora_rank": next(r for r in VLLM_RANKS if r >= max(ranks.values()))}
        atomic_write_json(tmp / EXPORT_FILE, description)
        atomic_write_text(tmp / "README.md", _readme(description, out))
    return description


def _skeleton(base: Path) -> dict[str, torch.nn.Module]:
    """The causal LM's modules by path, built on the meta device from the base's config (no weights)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(base)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return dict(model.named_modules())


def _export_folder(src: Path, dst: Path, skeleton: dict[str, torch.nn.Module], base: str) -> int:
    """One module folder in vLLM's form; returns its rank."""
    dst.mkdir(parents=True)
    if is_compressed(src):
        decompress_lora_folder(src, dst)
        src = dst
    check_safe_folder(src)
    config = read_json(src / "adapter_config.json")
    _check_config(config, src)
    tensors = load_file(str(src / "adapter_model.safetensors"))
    renamed, targets = {}, set()
    bare = not str(config.get("auto_mapping", {}).get("base_model_class", "")).endswith("ForCausalLM") and \
        config.get("task_type") != "CAUSAL_LM"  # conpet wraps the bare base model; vLLM reads the causal LM's paths
    for key, value in tensors.items():
        if not key.startswith(PREFIX) or not key.endswith((".lora_A.weight", ".lora_B.weight")):
            raise ConpetError(f"{src}: tensor '{key}' is not a LoRA factor (vLLM reads lora_A/lora_B weights only)")
        inner, factor = key[len(PREFIX):].rsplit(".lora_", 1)
        path = f"model.{inner}" if bare else inner
        module = skeleton.get(path)
        if not isinstance(module, torch.nn.Linear):
            what = "is not a linear layer" if module is not None else "does not exist"
            raise ConpetError(f"{src}: module '{path}' {what} in the base model {base}; vLLM would serve the base "
                              f"model for it")
        renamed[f"{PREFIX}{path}.lora_{factor}"] = value.contiguous()
        targets.add(path.rsplit(".", 1)[-1])
    save_file(renamed, str(dst / "adapter_model.safetensors"))
    for f in dst.iterdir():  # what decompression copied beside the weights
        if f.name != "adapter_model.safetensors":
            f.unlink() if f.is_file() else shutil.rmtree(f)
    plain = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base, "r": config["r"],
             "lora_alpha": config["lora_alpha"], "target_modules": sorted(targets), "bias": "none",
             "modules_to_save": None, "use_dora": False, "use_rslora": bool(config.get("use_rslora")),
             "lora_bias": False, "init_lora_weights": True, "lora_dropout": 0.0, "fan_in_fan_out": False,
             "inference_mode": True}
    (dst / "adapter_config.json").write_text(json.dumps(plain, indent=2) + "\n")
    return int(config["r"])


def _check_config(config: dict[str, Any], src: Path) -> None:
    """What vLLM refuses or would serve wrongly, refused here with the reason."""
    if config.get("peft_type") != "LORA":
        raise ConpetError(f"{src}: a {config.get('peft_type')} module; vLLM serves LoRA adapters only")
    problems = []
    if config.get("use_dora"):
        problems.append("DoRA (vLLM does not support it)")
    if config.get("modules_to_save"):
        problems.append(f"modules_to_save {config['modules_to_save']} (vLLM needs none)")
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        problems.append("bias terms (vLLM supports none)")
    if config.get("init_lora_weights", True) not in (True, False, "gaussian"):
        problems.append(f"init_lora_weights '{config['init_lora_weights']}' changes the base weights, which an "
                        f"adapter served on the original base cannot reproduce")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        problems.append("per-module ranks (rank_pattern / alpha_pattern)")
    if int(config.get("r", 0)) > VLLM_RANKS[-1]:
        problems.append(f"rank {config['r']} above vLLM's largest --max-lora-rank {VLLM_RANKS[-1]}")
    if problems:
        raise ConpetError(f"{src}: vLLM cannot serve this module: " + "; ".join(problems))


def _readme(description: dict[str, Any], out: Path) -> str:
    folders = sorted(set(description["tasks"].values()))
    modules = " ".join(f"{task}={out / name}" for task, name in description["tasks"].items())
    route = ("the run routes each prompt with its learned selector: put `conpet serve RUN_DIR --upstream URL` in "
             "front (it runs the selector and forwards each request with model=<task>)"
             if description["routes"] else "one module answers every task: each task name is that module")
    return f"""# vLLM export of {description['run']} (seed {description['seed']})

One plain peft LoRA folder per module ({', '.join(folders)}), checked against the base model's
modules. Serve them with:

```bash
vllm serve {description['base_model']} --enable-lora --max-lora-rank {description['max_lora_rank']} \\
    --max-loras {len(description['tasks'])} --lora-modules {modules}
```

Then `model: "<task>"` in a request uses that task's module; {route}.
"""
