"""The package's shape, checked: imports only point down the layers, no import cycle (module-level
and function-level imports both count), no conpet import hidden inside a function, no module far
over 500 lines, and every PET method in a file named after it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "conpet"

LAYERS = [
    ["conpet", "conpet.__main__", "conpet.cli"],
    ["conpet.search", "conpet.serve"],
    ["conpet.runner", "conpet.predict"],
    ["conpet.model", "conpet.vllm_export"],
    ["conpet.plots"],
    ["conpet.build", "conpet.report", "conpet.checkpoint", "conpet.evaluation"],
    ["conpet.learners"],
    ["conpet.generation"],
    ["conpet.engine", "conpet.adapters"],
    ["conpet.pet"],
    ["conpet.backbone", "conpet.inputs", "conpet.heads", "conpet.replay", "conpet.merging", "conpet.compress",
     "conpet.metrics", "conpet.text_metrics"],
    ["conpet.data"],
    ["conpet.runs"],
    ["conpet.config"],
    ["conpet.device", "conpet.distributed", "conpet.families", "conpet.sparsify"],
    ["conpet.errors"],
]
"""Top to bottom: a module may import modules of lower layers (and, inside its own package, its
siblings, as long as no cycle forms); never a module of its own layer or above."""


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in SRC.rglob("*.py")}


def imports(path: Path) -> list[tuple[str, int, bool]]:
    """(imported conpet module, line, inside a function?) for every import in ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    known = set(modules())
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend((a.name, child.lineno, in_function) for a in child.names if a.name.startswith("conpet"))
            elif isinstance(child, ast.ImportFrom) and child.module and child.module.startswith("conpet"):
                for a in child.names:  # `from conpet.pet import lora` imports the module conpet.pet.lora
                    sub = f"{child.module}.{a.name}"
                    found.append((sub if sub in known else child.module, child.lineno, in_function))
            visit(child, inner)

    visit(tree, False)
    return found


def layer_of(module: str) -> int:
    best = None
    for i, layer in enumerate(LAYERS):
        for prefix in layer:
            if module == prefix or module.startswith(prefix + "."):
                if best is None or len(prefix) > best[1]:
                    best = (i, len(prefix))
    assert best is not None, f"{module} is in no layer of tests/test_architecture.py: add it"
    return best[0]


def package_of(module: str) -> str:
    for layer in LAYERS:
        for prefix in layer:
            if module.startswith(prefix + "."):
                return prefix
    return module


def test_imports_only_point_down_the_layers():
    bad = []
    for name, path in modules().items():
        for target, line, _ in imports(path):
            if package_of(target) == package_of(name) and package_of(name) != name:
                continue  # siblings inside one package: covered by the cycle test
            if target == package_of(name):
                continue  # a package's module importing its package's registry (conpet.pet.x -> conpet.pet)
            if layer_of(target) <= layer_of(name) and target != name:
                bad.append(f"{path.relative_to(SRC.parent)}:{line}: {name} imports {target} (not a lower layer)")
    assert not bad, "\n".join(bad)


def test_no_import_cycle():
    graph: dict[str, set[str]] = {name: {t for t, _, _ in imports(p) if t != name} for name, p in modules().items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                dfs(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            dfs(node)


EXTRA_IMPORTS = {("conpet/serve/__init__.py", "conpet.serve.app"):
                 "the app imports FastAPI, which only the serve extra installs: `conpet serve` says so in one line"}
"""Imports of conpet modules that stay inside a function, and why."""


def test_no_conpet_import_inside_a_function():
    hidden = [f"{p.relative_to(SRC.parent)}:{line}: {t}" for name, p in modules().items()
              for t, line, in_function in imports(p)
              if in_function and (p.relative_to(SRC.parent).as_posix(), t) not in EXTRA_IMPORTS]
    assert not hidden, "imports of conpet modules belong at the top of the module:\n" + "\n".join(hidden)


def test_no_module_far_over_500_lines():
    long = {str(p.relative_to(SRC)): n for p in SRC.rglob("*.py") if (n := len(p.read_text().splitlines())) > 540}
    assert not long, long


def test_every_pet_method_lives_in_a_file_named_after_it():
    from conpet.pet import PET_METHODS

    for name, cls in PET_METHODS.items():
        assert cls.__module__ == f"conpet.pet.{name}", f"{name} is defined in {cls.__module__}"
        assert (SRC / "pet" / f"{name}.py").is_file()


def test_the_cli_lists_every_pet_method_and_the_docs_document_each(capsys):
    from conpet.cli import main
    from conpet.pet import PET_METHODS

    assert main(["pets"]) == 0
    listed = {line.split()[0] for line in capsys.readouterr().out.splitlines() if line.strip()}
    assert listed == set(PET_METHODS)
    docs = (SRC.parents[1] / "docs" / "pets.md").read_text(encoding="utf-8")
    assert all(f"`{name}`" in docs for name in PET_METHODS), [n for n in PET_METHODS if f"`{n}`" not in docs]


TENSOR_FACTORIES = {"eye", "zeros", "ones", "arange", "full", "tensor", "randn", "rand", "randint", "randperm",
                    "empty", "linspace", "as_tensor", "normal"}
CPU_BY_DESIGN = {
    "adapters.py:merge_lora": "merges saved LoRA factors, which are CPU tensors read from safetensors",
    "checkpoint.py:optimizer_state": "checkpoints are written from CPU copies",
    "compress.py:decompress": "ComPEFT decodes stored (CPU) tensors",
    "heads.py:grow": "new rows drawn on the CPU generator for device-independent seeds, then moved",
    "inputs.py:right_padded": "batches are built on the CPU and moved once (its device argument)",
    "inputs.py:collate": "batches are built on the CPU and moved once by the engine",
    "learners/crl.py:__init__": "an empty bank placeholder, replaced by fill() with device tensors",
    "learners/dynamic.py:cache": "cache keys for the checkpoint, which is written from CPU copies",
    "learners/ea_emr.py:__init__": "copy_ into a parameter already on the device (copy_ crosses devices)",
    "learners/model_surgery.py:align": "noise drawn on the CPU generator (same samples on every device), moved",
    "pet/bitfit.py:__init__": "module construction: sites.py moves each part to its layer's device",
    "pet/compacter.py:__init__": "module construction: sites.py moves each part to its layer's device",
    "pet/compacter.py:build_shared": "module construction: sites.py moves the shared part to the device",
    "pet/delta.py:__init__": "module construction: sites.py moves each part to its layer's device",
    "pet/dept.py:__init__": "module construction: add_adapter moves the part to the embeddings' device",
    "pet/dept.py:add_adapter": "prompt rows drawn on the CPU (the same module on every device), index moved",
    "pet/hft.py:gen_perm": "a Python list of layer choices, once per task",
    "pet/lisa.py:_draw": "a Python set of layer choices, once per draw",
    "pet/mola.py:_kaiming_a": "module construction: sites.py moves each part to its layer's device",
    "pet/mola.py:__init__": "module construction: sites.py moves each part to its layer's device",
    "pet/mos.py:build_shared": "module construction: sites.py moves the shared pools to the device",
    "pet/mos.py:indices": "shard indices drawn once per site on the CPU generator, moved where used",
}
"""Tensor factories without ``device=`` that are right where they are, and why. Anything else
creates a CPU tensor that meets device tensors on a GPU (AdaLoRA's orthogonality penalty did)."""


def cpu_tensor_factories() -> list[str]:
    """``file:function: torch.<factory>`` for every factory call in ``src/conpet`` that takes no
    ``device=`` and is not moved at once (``torch.zeros(...).to(x)``) or listed in CPU_BY_DESIGN."""
    found = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).as_posix()
        tree = ast.parse(path.read_text(encoding="utf-8"))
        moved = {id(n.func.value) for n in ast.walk(tree) if isinstance(n, ast.Call)
                 and isinstance(n.func, ast.Attribute) and n.func.attr == "to"}

        def visit(node: ast.AST, function: str) -> None:
            for child in ast.iter_child_nodes(node):
                name = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else function
                f = getattr(child, "func", None)
                if (isinstance(child, ast.Call) and isinstance(f, ast.Attribute) and f.attr in TENSOR_FACTORIES
                        and isinstance(f.value, ast.Name) and f.value.id == "torch"
                        and not any(k.arg == "device" for k in child.keywords) and id(child) not in moved
                        and f"{rel}:{name}" not in CPU_BY_DESIGN):
                    found.append(f"{rel}:{child.lineno} in {name}: torch.{f.attr} without device=")
                visit(child, name)

        visit(tree, "<module>")
    return found


def test_tensor_factories_name_their_device():
    found = cpu_tensor_factories()
    assert not found, ("give these device= (or add them to CPU_BY_DESIGN with the reason):\n" + "\n".join(found))


def test_the_cpu_by_design_list_has_no_stale_entry():
    functions = set()
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC).as_posix()
        functions |= {f"{rel}:{n.name}" for n in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
                      if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    assert set(CPU_BY_DESIGN) <= functions, set(CPU_BY_DESIGN) - functions


def learner_name_comparisons() -> list[str]:
    """``file:line`` of every comparison of a ``.learner`` attribute (a run's learner name) with a
    string outside the learners' own files: what a learner can do is read from its declared
    capabilities (``conpet.learners.CAPABILITIES``), never from its name."""
    found = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).as_posix()
        if rel.startswith("learners/"):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Compare):
                sides = [node.left, *node.comparators]
                if (any(isinstance(s, ast.Attribute) and s.attr == "learner" for s in sides)
                        and any(isinstance(s, ast.Constant) and isinstance(s.value, str) for s in sides)):
                    found.append(f"{rel}:{node.lineno}")
    return found


def test_no_code_outside_the_learners_compares_a_learner_name():
    found = learner_name_comparisons()
    assert not found, "read a capability (Learner.module_per_task, .routes...) instead: " + ", ".join(found)


def overrides_per_class(cls) -> dict[str, set[str]]:
    """For ``cls`` and each class between it and the learner bases (the Static ConPET family's
    plugin host and the per-task-module base included): the methods of the learner interface and
    the one-module base that class itself redefines; option checks do not count."""
    from conpet.learners.base import Learner
    from conpet.learners.one_module import OneModuleLearner
    from conpet.learners.routing import TaskModulesLearner
    from conpet.learners.static import StaticConPET

    hooks = {k for base in (Learner, OneModuleLearner) for k, v in vars(base).items()
             if callable(v) or isinstance(v, (property, classmethod))} - {"validate", "validate_generative",
                                                                          "validate_domain_incremental"}
    out = {}
    for klass in cls.__mro__:
        if klass in (Learner, OneModuleLearner, StaticConPET, TaskModulesLearner, object):
            break
        out[klass.__qualname__] = {k for k in vars(klass) if k in hooks and not k.startswith("__")}
    return out


def test_learners_are_plugins_on_hooks_with_few_overrides():
    from conpet.learners import LEARNERS

    heavy = {klass: sorted(names) for cls in LEARNERS.values()
             for klass, names in overrides_per_class(cls).items() if len(names) > 6}
    assert not heavy, f"learner classes overriding more than 6 hooks (split the method into hooks): {heavy}"
