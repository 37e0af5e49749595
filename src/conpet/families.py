"""What conpet needs to know about a Hugging Face model family, in one table.

Most families need nothing: the layer stack is found by its length (:func:`conpet.engine.find_layers`),
a decoder is told by transformers' own causal-LM registry, peft knows the LoRA targets, and the
split forward pass of the feature engine drives the top layers with ``inputs_embeds``. Where a
family differs, the difference is an entry of :data:`FAMILIES`; nothing else in conpet names a
family. Tested on tiny random-weight models of each listed family (tests/test_model_families.py).

=============  ==================================================================================
family         what differs
=============  ==================================================================================
(default)      an ``embeddings`` module (BERT, RoBERTa...: word + absolute positions) is bypassed
               in the upper pass; decoders' ``embed_tokens`` is skipped by ``inputs_embeds`` anyway
deberta-v2     also the encoder's ``conv`` (applied after layer 0) is left out above the split
gpt2           absolute positions ``wpe`` and embedding dropout ``drop`` are added to
               ``inputs_embeds`` by the model: both are bypassed; blocks are ``Conv1D``, not Linear
gpt_neox, phi  embedding dropout (``emb_dropout``, ``embed_dropout``) bypassed
phi3           peft has no default LoRA targets for its fused ``qkv_proj``: conpet's default is it
=============  ==================================================================================

conpet's own PET methods find their sites by the module names of a transformer block; those
names live here too (:data:`LINEAR_TARGETS`, :data:`FFN_LAYOUTS`, :func:`is_llama_like`), and so
does the keyword a model's forward pass takes its key/value cache under (:func:`cache_argument`).
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    """How one model family deviates from what conpet assumes by default."""

    input_stage: tuple[str, ...] = ()
    """Attributes of the base model that turn ``input_ids``/``inputs_embeds`` into the first
    layer's input (embeddings, absolute positions, embedding dropout): bypassed when the engine
    feeds cached hidden states to the upper layers."""
    after_first_layer: tuple[str, ...] = ()
    """Attributes of the layer stack's owner applied after the stack's first layer (DeBERTa-v2's
    ``conv``): below the split, so left out of the upper pass."""
    lora_targets: tuple[str, ...] | None = None
    """LoRA's default ``target_modules`` where peft has none for the family."""


EMBEDDINGS = ("embeddings",)
"""The input stage of most encoders (word + absolute positions + token types): bypassed by default."""

FAMILIES: dict[str, Family] = {
    "deberta-v2": Family(input_stage=EMBEDDINGS, after_first_layer=("conv",)),
    "gpt2": Family(input_stage=("wpe", "drop")),
    "gpt_neox": Family(input_stage=("emb_dropout",)),
    "phi": Family(input_stage=("embed_dropout",)),
    "phi3": Family(input_stage=EMBEDDINGS, lora_targets=("qkv_proj",)),
}

DEFAULT = Family(input_stage=EMBEDDINGS)

ENCODER_TYPES = {"bert", "roberta", "distilbert", "deberta", "deberta-v2", "electra", "xlm-roberta",
                 "mpnet", "albert", "camembert", "modernbert"}
"""Model types read as encoders (the cloze slot is a mask token) even when a config says ``is_decoder``."""


def family_of(model_type: str) -> Family:
    """The entry of ``model_type`` (``config.model_type``), or the default (no deviation)."""
    return FAMILIES.get(model_type, DEFAULT)


def is_decoder(config) -> bool:
    """A causal LM (the cloze slot is the last prompt token), from transformers' own registry of
    causal-LM model types, the config's architectures or its ``is_decoder`` flag."""
    if config.model_type in ENCODER_TYPES:
        return False
    archs = getattr(config, "architectures", None) or []
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs) or getattr(config, "is_decoder", False):
        return True
    try:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    except ImportError:  # pragma: no cover - transformers moved it
        return False
    return config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES


# -- block layouts: where conpet's own PET methods attach ---------------------------------------------
LINEAR_TARGETS = r"(^|\.)(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj|query|key|value|dense)$"
"""Every linear layer of a Llama-like or BERT-like block."""

FFN_LAYOUTS: tuple[tuple[str, str, str], ...] = (
    ("mlp.up_proj", "mlp.down_proj", "self_attn.o_proj"),  # Llama, Mistral, Qwen2, Gemma, SmolLM2...
    ("intermediate.dense", "output.dense", "attention.output.dense"),  # BERT, RoBERTa, ELECTRA, MiniLM...
    ("mlp.dense_h_to_4h", "mlp.dense_4h_to_h", "attention.dense"),  # GPT-NeoX, Pythia
    ("mlp.fc1", "mlp.fc2", "self_attn.dense"),  # Phi
)
"""(up, down, attention output) linear layers of a transformer block, by family: the feed-forward
input projection (Llama's ``up_proj``; a gated family's gate projection stays frozen), its output
projection and the layer that takes the concatenated head outputs. Block-relative paths."""


def ffn_layout(module_paths) -> tuple[str, str, str] | None:
    """The :data:`FFN_LAYOUTS` entry whose three layers every block of a model has (``module_paths``:
    the model's ``named_modules()`` paths), or None."""
    blocks = {m.group(1) for path in module_paths if (m := re.search(r"\.\d+\.(.+)$", path))}
    return next((names for names in FFN_LAYOUTS if all(name in blocks for name in names)), None)


def is_llama_like(module_paths) -> bool:
    """Whether a model's blocks are Llama-like (a gated ``mlp`` with ``down_proj``), from its
    ``named_modules()`` paths."""
    return any(path.endswith("mlp.down_proj") for path in module_paths)


def cache_argument(model) -> str:
    """The keyword ``model``'s forward pass takes its key/value cache under: transformers 5 renames
    ``past_key_values`` to ``cache`` (the old name goes in 5.40). A peft or conpet wrapper is looked
    through (``get_base_model``)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"
