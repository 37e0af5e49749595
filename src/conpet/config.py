"""One typed configuration tree: YAML in, command-line flags override, saved with every run.

A config file mirrors the dataclasses below, e.g.::

    model: smollm2
    learner: sequential
    seeds: 3
    data: {benchmark: wordnet-typing}
    pet: {method: lora, options: {r: 8, lora_alpha: 16}}
    train: {epochs: 3, batch_size: 16}

Unknown keys and wrong types are errors that name the key, so a typo never silently falls back
to a default.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from conpet.device import PRECISIONS
from conpet.errors import ConfigError, choices_hint, read_user_text



@dataclass
class DataConfig:
    benchmark: str | None = "wordnet-typing"
    """Built-in benchmark name (``conpet benchmarks`` lists them). Ignored when ``file`` is set."""
    file: str | None = None
    """Your own JSONL or CSV rows (``text``, ``label``, optional ``split``, ``entity``, ``head``, ``tail``)."""
    tasks: str | None = None
    """Task file: a JSON/YAML list of label groups, a mapping task name -> labels, or a flat list
    of names (one label, or one generative task, per task)."""
    n_tasks: int | None = None
    """Without a task file: split the labels into this many tasks at random (seeded)."""
    template: str = "auto"
    """``typing``, ``relation``, ``text`` or ``auto`` (from the benchmark, or from the row fields;
    rows with ``prompt``/``target`` are a generative stream, ``generate``)."""
    chat_template: bool | str = "auto"
    """Generative streams: wrap each prompt in the model's chat template (``auto``: when the
    tokenizer has one; ``true``: required; ``false``: plain prompt + target)."""
    max_new_tokens: int = 32
    """Generative streams: most tokens generated per answer at evaluation (greedy, stops at EOS)."""
    reference_text: str | None = None
    """Generative streams: a UTF-8 text file whose perplexity is measured after every task (the
    retention of general ability), beside the base model's; default a built-in sample of WordNet
    example sentences."""
    metric: str = "auto"
    """Generative streams: each task's primary metric: ``exact_match``, ``f1`` (token F1),
    ``rouge_l``, ``chrf``, or ``auto`` (exact match for tasks whose answers are at most 3 words,
    else ROUGE-L)."""
    task_order: list[str] | None = None
    """Run the stream's tasks in this order (their names, each once); ``None``: the stream's own
    order. ``conpet run --orders N`` sets it for each of N seeded orders."""
    setting: str = "class-incremental"
    """``class-incremental`` (predict over all seen classes) or ``task-incremental`` (task id known)."""
    split_seed: int = 0
    """Seed of the automatic task split and of the train/dev/test split of rows without ``split``."""
    max_train_per_class: int | None = None
    """Cap on training rows per class (a quick way to shorten a run); ``None`` keeps all."""
    report_dev: bool = False
    """Also measure accuracy on the **dev** rows after every task (metrics key ``dev_accuracy``,
    a matrix like ``accuracy_matrix``): what a choice of settings should look at, never test."""
    task_slice: str | None = None
    """Keep only the tasks ``START:STOP`` of the stream (after ``task_order``), e.g. ``0:10`` and
    ``10:20`` give two disjoint halves of ``wordnet-fine`` (``conpet search``'s built-in pair)."""
    eval_split: str = "test"
    """The rows the accuracy matrix is measured on: ``test``, or ``dev`` for choosing settings
    (``conpet search``'s tuning phase): the test rows are then **sealed**, and anything that
    reads them is an error (:func:`conpet.data.stream.seal_test`)."""


@dataclass
class PETConfig:
    method: str = "lora"
    """PET method name (``conpet pets`` lists them)."""
    options: dict[str, Any] = field(default_factory=dict)
    """Method options, e.g. ``{r: 8, lora_alpha: 16, target_modules: [q_proj, v_proj]}``."""


@dataclass
class TrainConfig:
    epochs: int = 3
    """Passes over each task's training rows (a replay schedule lays out as many steps)."""
    batch_size: int = 16
    """Rows per optimizer step (the global batch, over every process of a launcher)."""
    lr: float = 1e-3
    """Learning rate of the PET parameters."""
    head_lr: float = 5e-3
    """Learning rate of the classification head."""
    weight_decay: float = 0.01
    """AdamW's decoupled weight decay."""
    grad_clip: float = 1.0
    """Clip the gradient norm of every step to this (0: no clipping)."""
    max_length: int = 128
    """Maximum prompt length in tokens (the text is truncated, the template is kept)."""
    eval_batch_size: int = 64
    """Rows per batch at evaluation, prediction and feature passes (no gradients)."""
    device: str = "auto"
    """``auto`` (CUDA if present, then Apple MPS, then the CPU), ``cpu``, ``cuda``, ``cuda:N`` or
    ``mps``. Under ``torchrun`` / ``accelerate launch`` each process takes ``cuda:<LOCAL_RANK>``."""
    precision: str = "auto"
    """``auto``: bf16 autocast on a GPU that runs it (else fp16 with gradient scaling) and on a CPU
    with native bf16 (else fp32); or ``bf16``, ``fp16`` (GPUs only) or ``fp32``."""
    grad_accum: int = 1
    """Split each batch of ``batch_size`` rows into this many micro-batches whose gradients add up
    before one optimizer step: the optimizer sees the same global batch, in less device memory."""
    gradient_checkpointing: bool = False
    """Recompute the backbone's layer activations in the backward pass instead of keeping them
    (less memory, about a third more compute); HF models only."""
    threads: int = 0
    """torch intra-op threads; 0 = all cores."""
    top_layers: int | str | None = "auto"
    """Confine PET modules to the top L transformer layers and compute the frozen lower layers
    once per row (cached, reused by every epoch, replay batch and evaluation). ``auto`` (default):
    the top 40% of the layers (rounded) of a backbone with more than 8 (SmolLM2: 12 of 30; chosen
    by dev accuracy over four streams, docs/speed.md), every layer otherwise (MiniLM);
    ``null`` = PET in every layer, no cache. With a confined LoRA and no ``target_modules`` given,
    LoRA goes on every linear layer of those L layers (docs/speed.md). A run directory saves the
    number ``auto`` chose, so that it resumes and predicts on the same layers in a later version."""
    cache_mb: float = 4096.0
    """Memory bound of the lower-layer cache (MB); the oldest rows are evicted beyond it."""
    length_bucketing: bool = True
    """Batch rows of similar length together (within pools of 50 batches, order still random) so
    that dynamic padding pads little; ``false`` = plain random batches."""
    checkpoint_seconds: float = 60.0
    """Save an in-task checkpoint (for ``conpet run --resume``) at most this often; 0 = every step."""
    select_on_dev: bool = False
    """Keep, for every fit, the epoch (the untrained start included) with the best accuracy on the
    **dev** rows of the tasks seen so far, as ConPET's official code does; never the test rows.
    ``false`` (default) keeps the last epoch."""


@dataclass
class BackboneConfig:
    quantize: str | None = None
    """Store the frozen backbone quantized: ``nf4`` (4-bit NormalFloat, QLoRA) or ``int8``
    (LLM.int8()), through bitsandbytes and peft's k-bit preparation; CUDA only, peft-backed PET
    methods only. ``null`` (default): full-precision weights."""
    pooling: str = "auto"
    """How a classification row becomes one feature vector for the heads and the selector:
    ``cloze`` (the hidden state at the template's cloze slot: the [MASK] of an encoder, the
    prompt's last token of a decoder), ``mean`` (the mean over the row's tokens), ``last`` (the
    row's last token), or ``auto``: ``mean`` for a sentence-transformers model trained for mean
    pooling (all-MiniLM-L6-v2), ``cloze`` for every other backbone (chosen on dev rows,
    docs/learners.md). A run saves what ``auto`` chose. Generative streams always read the
    prompt's last token."""
    fsdp: bool = False
    """Shard the frozen backbone's weights over the processes of a launcher (``torchrun``,
    ``accelerate launch``) with torch's ``fully_shard`` (FSDP2), one unit per transformer layer, for a
    backbone that does not fit one device. LoRA only, every layer (``train.top_layers`` null or
    auto), the learners that list it (``conpet learners``); one process: nothing is sharded."""


@dataclass
class RunConfig:
    model: str = "minilm"
    """``minilm``, ``smollm2``, a local HF model folder, or a ``.gguf`` file."""
    learner: str = "sequential"
    """Continual learner (``conpet learners`` lists them)."""
    seeds: int = 1
    """Number of seeds; seeds are ``seed, seed+1, ...``."""
    seed: int = 0
    """The first seed: it seeds batch order, module initialisation and replay draws (the data split has
    its own, ``data.split_seed``)."""
    orders: int = 1
    """Task orders: ``N > 1`` runs the stream in N orders (the stream's own, then N-1 seeded
    permutations), each a run directory ``out/order-<k>``, and reports mean ± std over orders."""
    out: str | None = None
    """Run directory; default ``runs/<learner>-<model>-<benchmark>``."""
    data: DataConfig = field(default_factory=DataConfig)
    pet: PETConfig = field(default_factory=PETConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    learner_options: dict[str, Any] = field(default_factory=dict)
    """Options of the chosen learner (see its docstring)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


SETTINGS = ("class-incremental", "task-incremental")
QUANTIZE = (None, "nf4", "int8")
POOLINGS = ("auto", "cloze", "mean", "last")
"""``backbone.pooling``: how a classification row's states become one feature vector."""
GENERATION_METRICS = ("auto", "exact_match", "f1", "rouge_l", "chrf")
TEMPLATES = ("auto", "typing", "relation", "text", "generate")


def _type_ok(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is Any:
        return True
    if origin is dict:
        return isinstance(value, dict)
    if origin is list:
        return isinstance(value, list)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(tp, type):
        return isinstance(value, tp)
    return True


def _build(cls: type, values: dict[str, Any], where: str, prefix: str = "") -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: '{prefix.rstrip('.') or 'config'}' must be a mapping, got {type(values).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            hint = choices_hint(str(key), names, prefix=prefix, cutoff=0.6, listing="known")
            raise ConfigError(f"{where}: unknown key '{prefix}{key}'{hint}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, where, f"{prefix}{key}.")
            continue
        if tp in (float, float | None):
            if isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            else:
                value = yaml_number(value)
        if not _type_ok(value, tp):
            raise ConfigError(f"{where}: '{prefix}{key}' must be {_type_name(tp)}, got {value!r}")
        kwargs[key] = value
    return cls(**kwargs)


def _type_name(tp: Any) -> str:
    return str(tp).replace("typing.", "").replace("<class '", "").replace("'>", "")


def validate(cfg: RunConfig, where: str = "config") -> RunConfig:
    """Check value ranges; raise ConfigError naming the field."""
    checks = [
        (cfg.seeds >= 1, "seeds", "must be >= 1"),
        (cfg.orders >= 1, "orders", "must be >= 1"),
        (cfg.data.task_order is None or all(isinstance(t, str) for t in cfg.data.task_order), "data.task_order",
         "must be a list of task names"),
        (cfg.train.epochs >= 1, "train.epochs", "must be >= 1"),
        (cfg.train.batch_size >= 1, "train.batch_size", "must be >= 1"),
        (cfg.train.eval_batch_size >= 1, "train.eval_batch_size", "must be >= 1"),
        (cfg.train.lr > 0, "train.lr", "must be > 0"),
        (cfg.train.head_lr > 0, "train.head_lr", "must be > 0"),
        (cfg.train.max_length >= 16, "train.max_length", "must be >= 16"),
        (cfg.train.top_layers in (None, "auto")
         or (isinstance(cfg.train.top_layers, int) and cfg.train.top_layers >= 1),
         "train.top_layers", "must be an integer >= 1, auto or null"),
        (cfg.train.cache_mb > 0, "train.cache_mb", "must be > 0"),
        (cfg.train.checkpoint_seconds >= 0, "train.checkpoint_seconds", "must be >= 0"),
        (cfg.train.precision in PRECISIONS, "train.precision", f"must be one of {', '.join(PRECISIONS)}"),
        (cfg.train.grad_accum >= 1, "train.grad_accum", "must be >= 1"),
        (cfg.train.grad_accum <= cfg.train.batch_size, "train.grad_accum", "must be <= train.batch_size "
         "(each micro-batch needs a row)"),
        (cfg.backbone.quantize in QUANTIZE, "backbone.quantize", "must be nf4, int8 or null"),
        (cfg.backbone.pooling in POOLINGS, "backbone.pooling", f"must be one of {', '.join(POOLINGS)}"),
        (cfg.data.setting in SETTINGS, "data.setting", f"must be one of {', '.join(SETTINGS)}"),
        (cfg.data.eval_split in ("test", "dev"), "data.eval_split", "must be test or dev"),
        (cfg.data.task_slice is None or _is_slice(cfg.data.task_slice), "data.task_slice",
         "must be START:STOP with integers 0 <= START < STOP, e.g. 0:10"),
        (cfg.data.template in TEMPLATES, "data.template", f"must be one of {', '.join(TEMPLATES)}"),
        (cfg.data.chat_template in ("auto", True, False), "data.chat_template", "must be auto, true or false"),
        (cfg.data.max_new_tokens >= 1, "data.max_new_tokens", "must be >= 1"),
        (cfg.data.metric in GENERATION_METRICS, "data.metric", f"must be one of {', '.join(GENERATION_METRICS)}"),
        (cfg.data.n_tasks is None or cfg.data.n_tasks >= 1, "data.n_tasks", "must be >= 1"),
        (cfg.data.max_train_per_class is None or cfg.data.max_train_per_class >= 1,
         "data.max_train_per_class", "must be >= 1"),
        (cfg.data.file is not None or cfg.data.benchmark is not None, "data", "set data.benchmark or data.file"),
    ]
    for ok, key, msg in checks:
        if not ok:
            raise ConfigError(f"{where}: '{key}' {msg}")
    return cfg


def _is_slice(text: str) -> bool:
    parts = str(text).split(":")
    return len(parts) == 2 and all(p.strip().isdigit() for p in parts) and int(parts[0]) < int(parts[1])


def task_slice(text: str) -> slice:
    """``"0:10"`` -> ``slice(0, 10)`` (``data.task_slice``, checked by :func:`validate`)."""
    start, stop = (int(p) for p in str(text).split(":"))
    return slice(start, stop)


def from_dict(values: dict[str, Any], where: str = "config") -> RunConfig:
    return validate(_build(RunConfig, values or {}, where), where)


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    text = read_user_text(path, "config file", ConfigError)
    try:
        values = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path}{line}: invalid YAML: {problem}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: top level must be a mapping of keys to values")
    return values


def set_dotted(values: dict[str, Any], dotted: str, value: Any) -> None:
    """``set_dotted(d, "train.epochs", 5)`` sets ``d["train"]["epochs"] = 5``."""
    keys = dotted.split(".")
    node = values
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: '{k}' is not a section")
    node[keys[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """Parse ``key.sub=value`` (value read as YAML: numbers, lists, null...)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. train.epochs=5")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw
    return key.strip(), yaml_number(value)


def yaml_number(value: Any) -> Any:
    """``value``, or the float a string spells: YAML 1.1 (PyYAML) reads ``1e-4`` as a string."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    return value


def load_config(path: str | None = None, overrides: dict[str, Any] | None = None,
                sets: list[str] | None = None) -> RunConfig:
    """Build the run config: defaults < YAML file < ``overrides`` (dotted keys) < ``--set`` pairs."""
    values = load_yaml(path) if path else {}
    where = str(path) if path else "config"
    for dotted, value in (overrides or {}).items():
        if value is not None:
            set_dotted(values, dotted, value)
    for item in sets or []:
        set_dotted(values, *parse_override(item))
    return from_dict(values, where)


# -- the learner-spec grammar: ``a,b[opt=v,opt2=w],c`` ------------------------------------------------
def split_learner_specs(text: str) -> list[str]:
    """Split ``a,b[x=1,y=2],c`` on the commas outside brackets."""
    out, depth, cur = [], 0, ""
    for ch in text:
        depth += (ch == "[") - (ch == "]")
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    out.append(cur.strip())
    return [x for x in out if x]


def parse_learner_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``"dynamic[top_k=2,new_ratio=0.5]"`` -> ``("dynamic", {"top_k": 2, "new_ratio": 0.5})``
    (values read as YAML)."""
    spec = spec.strip()
    if "[" not in spec:
        return spec, {}
    if not spec.endswith("]"):
        raise ConfigError(f"learner '{spec}': options go in brackets at the end, e.g. dynamic[top_k=2]")
    name, inner = spec[:-1].split("[", 1)
    options = {}
    for pair in filter(None, (x.strip() for x in split_learner_specs(inner))):
        if "=" not in pair:
            raise ConfigError(f"learner '{spec}': expected KEY=VALUE, got '{pair}'")
        key, value = pair.split("=", 1)
        options[key.strip()] = parse_override(f"x={value}")[1]
    return name.strip(), options


def spec_dir_name(spec: str) -> str:
    """A folder name for a learner spec: ``emr*`` -> ``emr-star``, ``dynamic[top_k=2]`` -> ``dynamic-top_k=2``."""
    name, options = parse_learner_spec(spec)
    return "-".join([name.replace("*", "-star")] + [f"{k}={v}" for k, v in options.items()])


def default_out(cfg: RunConfig, compare: bool = False) -> Path:
    """The run directory when ``--out`` is not given: ``runs/<learner>-<pet>-<model>-<data>``, or
    ``runs/compare-<pet>-<model>-<data>`` for several learners."""
    data = cfg.data.benchmark if cfg.data.file is None else Path(cfg.data.file).stem
    model = Path(cfg.model).stem if cfg.model not in ("minilm", "smollm2") else cfg.model
    learner = "compare" if compare else spec_dir_name(cfg.learner)
    return Path("runs") / f"{learner}-{cfg.pet.method}-{model}-{data}"
