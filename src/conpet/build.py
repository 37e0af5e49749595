"""From a config to objects: the one place that builds the feature engine, the PET method and
the learner, for ``run``, ``resume``, ``evaluate``, ``predict``, ``merge`` and the bench scripts.

    from conpet.build import check, prepare, build_learner
    check(cfg)                              # options of the learner and PET method: no model needed
    prepared = prepare(cfg)                 # stream, backbone, tokenized rows, feature engine (checked)
    learner = build_learner(cfg, prepared, seed=0)

Device, precision and ``train.top_layers`` are resolved once, here (:func:`compute_of`), and the
engine's split forward pass is always checked against the plain one before anything trains or
predicts. Under ``torchrun`` / ``accelerate launch`` :func:`prepare` also joins the launcher's
process group (:mod:`conpet.distributed`).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, TypeVar

import torch

from conpet import distributed
from conpet.backbone import (Backbone, cast_frozen_linears, cast_lm_head, check_quantize,
                             enable_gradient_checkpointing, load_backbone, load_lm_head, resolve_pooling)
from conpet.config import RunConfig
from conpet.data import load_stream
from conpet.data.stream import Stream
from conpet.device import Compute, resolve_device, resolve_precision
from conpet.engine import FeatureEngine, find_layers, resolve_top_layers
from conpet.inputs import encode_generation, encode_rows
from conpet.errors import ConfigError, warn
from conpet.learners import LEARNERS, Context, Learner, get_learner
from conpet.pet import PETMethod, get_pet, get_pet_class


class Prepared(NamedTuple):
    """What every seed and every learner of one run shares: the stream and the feature engine
    (backbone, tokenized rows, lower-layer cache)."""

    stream: Stream
    engine: FeatureEngine


F = TypeVar("F", bound=Callable)


def keeps_torch_threads(fn: F) -> F:
    """Decorate a public entry point that may call :func:`prepare`: ``train.threads`` holds while
    it runs and torch's thread count is put back when it returns, so a library call (or one test
    in a pytest process) does not change the float arithmetic of what runs after it."""

    @functools.wraps(fn)
    def scoped(*args, **kwargs):
        before = torch.get_num_threads()
        try:
            return fn(*args, **kwargs)
        finally:
            if torch.get_num_threads() != before:
                torch.set_num_threads(before)

    return scoped  # type: ignore[return-value]


def compute_of(cfg: RunConfig) -> Compute:
    """The run's device (``train.device``) and resolved precision (``train.precision``)."""
    device = resolve_device(cfg.train.device)
    return Compute(device, resolve_precision(cfg.train.precision, device))


def check(cfg: RunConfig) -> dict[str, Any]:
    """Check what needs no model (learner and PET options, device, precision, quantization) before
    anything is written or loaded; return the learner's options, checked and converted (the one
    place they are: pass them on to :func:`prepare` and :func:`build_learner`)."""
    learner = get_learner(cfg.learner)
    if learner.requires_pet and cfg.pet.method != learner.requires_pet:
        raise ConfigError(f"learner '{cfg.learner}' is built around {learner.requires_pet} modules; it needs "
                          f"pet.method: {learner.requires_pet} (--pet {learner.requires_pet}), not '{cfg.pet.method}'")
    options = learner.check_options(cfg)
    pet = get_pet(cfg.pet.method, cfg.pet.options)
    compute = compute_of(cfg)
    if cfg.backbone.quantize:
        check_quantize(cfg.backbone.quantize, compute.device, pet_supports_kbit=pet.supports_kbit)
    if cfg.backbone.fsdp:
        check_fsdp(cfg)
    return options


def check_fsdp(cfg: RunConfig) -> None:
    """What ``backbone.fsdp`` (a sharded backbone, docs/gpus.md) works with today."""
    if cfg.backbone.quantize:
        raise ConfigError("backbone.fsdp: a quantized backbone (backbone.quantize) is not sharded; use one or the other")
    if cfg.pet.method != "lora":
        raise ConfigError(f"backbone.fsdp: pet.method '{cfg.pet.method}' has not been tried on a sharded backbone; "
                          f"use lora")
    if isinstance(cfg.train.top_layers, int):
        raise ConfigError(f"backbone.fsdp: train.top_layers {cfg.train.top_layers} caches the lower layers per "
                          f"process, which a sharded backbone cannot (every forward pass is a collective); "
                          f"use train.top_layers: null")
    if not get_learner(cfg.learner).shards_backbone:
        able = sorted(name for name, cls in LEARNERS.items() if cls.shards_backbone)
        raise ConfigError(f"backbone.fsdp: learner '{cfg.learner}' is not tried on a sharded backbone; these are: "
                          f"{', '.join(able)}")


def check_stream(cfg: RunConfig, stream: Stream, options: dict[str, Any] | None = None) -> None:
    """What the stream's kind asks of the learner and the settings (before the backbone is loaded);
    ``options``: the learner's, from :func:`check` (checked here when not given)."""
    learner = get_learner(cfg.learner)

    def checked() -> dict[str, Any]:  # only the streams that ask the learner need its options
        return options if options is not None else learner.check_options(cfg)

    if stream.domain_incremental:
        if cfg.data.setting == "task-incremental":
            raise ConfigError("data.setting: the tasks share labels (a domain-incremental stream); masking "
                              "predictions to a task's classes is not supported there yet; leave data.setting at "
                              "class-incremental")
        learner.validate_domain_incremental(cfg, checked())
    if not stream.generative:
        return
    if not learner.generative:
        able = sorted(name for name, cls in LEARNERS.items() if cls.generative)
        raise ConfigError(f"learner: '{cfg.learner}' does not train generative (prompt -> target) streams yet; "
                          f"these do: {', '.join(able)}")
    learner.validate_generative(cfg, checked())
    if cfg.backbone.pooling not in ("auto", "cloze"):
        raise ConfigError(f"backbone.pooling: '{cfg.backbone.pooling}' pools classification rows; a generative "
                          "stream reads the prompt's last token (leave backbone.pooling at auto)")
    if cfg.train.select_on_dev:
        raise ConfigError("train.select_on_dev: not available for generative streams yet (it scores dev "
                          "accuracy of a classification head)")
    if cfg.data.setting != "class-incremental":
        raise ConfigError("data.setting: a generative task answers in text; task-incremental masking of class "
                          "columns does not apply (leave data.setting at class-incremental)")


def prepare(cfg: RunConfig, stream: Stream | None = None, check_rows: int = 8, cast_frozen: bool = True,
            backbone: Backbone | None = None, also_for: tuple[str, ...] = (),
            options: dict[str, Any] | None = None) -> Prepared:
    """Load and validate the data (first: bad data fails fast) unless ``stream`` is given (predict
    builds it from a run's ``stream.json`` and the rows to predict), then the backbone; tokenize
    once; build the feature engine and check its split forward pass on ``check_rows`` rows.

    Under bf16/fp16 the frozen linear weights are stored in that dtype (``cast_frozen``; a baseline
    that keeps fp32 weights under autocast, as HF Trainer does, turns it off). ``backbone`` (e.g.
    :func:`conpet.backbone.backbone_from_model`) replaces loading ``cfg.model``. ``also_for``
    names further learners that will reuse the preparation (:func:`conpet.runner.run_many`): the
    LM head is loaded, or the encoder refused, when any of them reads next-token distributions.
    ``options``: the learner's options from :func:`check`."""
    stream = load_stream(cfg.data) if stream is None else stream
    check_stream(cfg, stream, options)
    if cfg.train.threads:  # entry points that call this are @keeps_torch_threads
        torch.set_num_threads(cfg.train.threads)
    compute = compute_of(cfg)
    distributed.setup(compute.device)
    if backbone is None:  # a backbone to shard is read by rank 0 only, into CPU memory (apply_fsdp)
        to_shard = cfg.backbone.fsdp and distributed.active()
        backbone = load_backbone(cfg.model, torch.device("cpu") if to_shard else compute.device,
                                 cfg.backbone.quantize, compute.dtype, weights=not to_shard or distributed.is_main())
    if compute.precision != "fp32" and cast_frozen and not cfg.backbone.quantize:
        cast_frozen_linears(backbone.model, compute.dtype)
        backbone.frozen_dtype = compute.dtype
    if cfg.train.gradient_checkpointing:
        enable_gradient_checkpointing(backbone.model)
    readers = [name for name in (cfg.learner, *also_for) if get_learner(name).needs_lm_head]
    if readers:
        check_lm_head(readers[0], backbone)
    if stream.generative:
        encoded = encode_generation(stream.rows, backbone.tokenizer, cfg.train.max_length, cfg.data.chat_template)
    else:
        encoded = encode_rows(stream.rows, stream.kind, backbone.tokenizer, backbone.is_decoder, cfg.train.max_length)
    pet_cls = get_pet_class(cfg.pet.method)
    setting = pet_cls.confine_top_layers(cfg.train.top_layers, backbone.model.config.num_hidden_layers,
                                         cfg.pet.options)
    top_layers = resolve_top_layers(setting, backbone.model, pet_cls.input_level, sharded=cfg.backbone.fsdp)
    apply_fsdp(cfg, backbone, compute)
    if stream.generative or readers:  # after sharding: a tied head is gathered from the shards
        attach_lm_head(backbone)  # an encoder is an error here
    engine = FeatureEngine(backbone, encoded, top_layers, compute, cfg.train.eval_batch_size, cfg.train.cache_mb,
                           pooling="cloze" if stream.generative else resolve_pooling(cfg.backbone.pooling, backbone))
    rows = stream.tasks[0].train[:check_rows] if stream.tasks and stream.tasks[0].train else \
        list(range(min(check_rows, len(stream.rows))))
    engine.check(backbone.model, rows)
    return Prepared(stream, engine)


def check_lm_head(learner: str, backbone: Backbone) -> None:
    """A learner that distils next-token distributions needs a decoder's LM head."""
    if not backbone.is_decoder:
        raise ConfigError(f"learner '{learner}' distils the backbone's next-token distributions; model "
                          f"'{backbone.name}' is an encoder without an LM head: use a decoder (causal LM) such as "
                          f"smollm2")


def attach_lm_head(backbone: Backbone) -> None:
    """Load the backbone's frozen LM head once (:func:`conpet.backbone.load_lm_head`), stored in the
    dtype of the frozen linears (:func:`conpet.backbone.cast_lm_head`); a no-op when it is there."""
    if backbone.lm_head is None:
        head = load_lm_head(backbone)
        backbone.lm_head = cast_lm_head(head, backbone.frozen_dtype) if backbone.frozen_dtype else head


def apply_fsdp(cfg: RunConfig, backbone: Backbone, compute: Compute) -> None:
    """``backbone.fsdp`` under a launcher: shard the frozen weights over the processes. Rank 0 holds
    the checkpoint in CPU memory, the others a meta-device skeleton; each process receives its
    shards from rank 0 (:func:`conpet.distributed.shard_backbone`). One process: nothing to shard,
    said once."""
    distributed.forget_sharding()
    if not cfg.backbone.fsdp:
        return
    if not distributed.active():
        warn("backbone.fsdp: one process, so the whole backbone is loaded here (sharding it needs a "
             "launcher: torchrun --nproc_per_node N -m conpet run ...)")
        return
    backbone.shard_bytes = distributed.shard_backbone(backbone.model, find_layers(backbone.model)[2], compute.device)


def build_pet(cfg: RunConfig, engine: FeatureEngine, precision: str | None = None) -> PETMethod:
    """The run's PET method, confined to the engine's layers and told the run's precision
    (``precision`` overrides it for a baseline that runs peft as plain peft does)."""
    return get_pet(cfg.pet.method, cfg.pet.options, scope=engine.scope, precision=precision or engine.precision)


def build_learner(cfg: RunConfig, prepared: Prepared, seed: int, progress: bool = False,
                  checkpointer=None, pet_precision: str | None = None,
                  options: dict[str, Any] | None = None) -> Learner:
    """A fresh learner of ``cfg.learner`` for one seed, with its own PET method object
    (``pet_precision``: see :func:`build_pet`; benchmarks only) and ``options`` (from
    :func:`check`; checked here when not given)."""
    stream, engine = prepared
    learner_cls = get_learner(cfg.learner)
    if learner_cls.needs_lm_head:  # a preparation made for another learner may lack it
        check_lm_head(cfg.learner, engine.backbone)
        attach_lm_head(engine.backbone)
    ctx = Context(cfg=cfg, stream=stream, engine=engine, pet=build_pet(cfg, engine, pet_precision), seed=seed,
                  options=options if options is not None else learner_cls.check_options(cfg), progress=progress,
                  checkpointer=checkpointer)
    return learner_cls(ctx)
