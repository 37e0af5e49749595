"""conpet on tiny random-weight models of the common Hugging Face families.

Each family is built once from its config (hidden 32, 2 layers, 4 heads, the packaged MiniLM
tokenizer files, vocab 30522), decoders saved as their causal-LM class and encoders as the base
model, and each is run through:

- ``sequential`` with PET in every layer (``top_layers: null``), then the saved adapter is
  reopened in plain peft and must give identical logits;
- ``emr*`` with ``top_layers: 1`` (the split forward pass: lower layer cached, the top one driven
  with ``inputs_embeds``), then the same reload check;
- the split forward pass against the full one at 1e-5 in fp32 (on two more variants too: mixed
  sliding/full attention layers, DeBERTa-v2's conv after the first layer);
- a decoder saved as its base ``*Model`` class is still read as a decoder.

What each family needs beyond the defaults lives in one table, :data:`conpet.families.FAMILIES`.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from conftest import MINILM_FILES, minilm_dir, write_typing_data

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SIZE = dict(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=256)
DECODER = dict(SIZE, pad_token_id=0, bos_token_id=101, eos_token_id=102)  # MiniLM's [CLS]/[SEP]: ids in the vocabulary
DEBERTA_V3 = dict(SIZE, pad_token_id=0, relative_attention=True, position_biased_input=False,
                  pos_att_type=["p2c", "c2p"], max_relative_positions=-1, position_buckets=64,
                  norm_rel_ebd="layer_norm", share_att_key=True, type_vocab_size=0)

FAMILIES: dict[str, tuple[str, str, str, dict]] = {
    # family: (config class, class saved, base model class, config fields)
    "llama": ("LlamaConfig", "LlamaForCausalLM", "LlamaModel",
              dict(DECODER, num_key_value_heads=2, tie_word_embeddings=True)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", "Qwen2Model",
              dict(DECODER, num_key_value_heads=2, tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", "Qwen3Model",
              dict(DECODER, num_key_value_heads=2, head_dim=8, tie_word_embeddings=True)),
    "mistral": ("MistralConfig", "MistralForCausalLM", "MistralModel",
                dict(DECODER, num_key_value_heads=2, tie_word_embeddings=True, sliding_window=4)),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", "GemmaModel",
              dict(DECODER, num_key_value_heads=2, head_dim=8)),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", "Gemma2Model",
               dict(DECODER, num_key_value_heads=2, head_dim=8, sliding_window=4, query_pre_attn_scalar=8)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", "Phi3Model",
             dict(DECODER, num_key_value_heads=2, tie_word_embeddings=True, original_max_position_embeddings=256)),
    "phi": ("PhiConfig", "PhiForCausalLM", "PhiModel", dict(DECODER, tie_word_embeddings=True)),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", "GPT2Model",
             dict(vocab_size=30522, n_embd=32, n_layer=2, n_head=4, n_inner=64, n_positions=256,
                  pad_token_id=0, bos_token_id=101, eos_token_id=102)),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", "GPTNeoXModel", dict(DECODER, tie_word_embeddings=True)),
    "bert": ("BertConfig", "BertModel", "BertModel", dict(SIZE, pad_token_id=0)),
    "roberta": ("RobertaConfig", "RobertaModel", "RobertaModel",
                dict(SIZE, pad_token_id=0, max_position_embeddings=258)),  # positions start after the pad id
    "deberta-v2": ("DebertaV2Config", "DebertaV2Model", "DebertaV2Model", DEBERTA_V3),
}
VARIANTS: dict[str, tuple[str, str, str, dict]] = {
    # split-pass corner cases, checked by the exactness test only
    "qwen2-mixed-window": ("Qwen2Config", "Qwen2ForCausalLM", "Qwen2Model",
                           dict(DECODER, num_key_value_heads=2, tie_word_embeddings=True, use_sliding_window=True,
                                sliding_window=4, max_window_layers=1)),  # layer_types [full, sliding]
    "deberta-v2-conv": ("DebertaV2Config", "DebertaV2Model", "DebertaV2Model",
                        dict(DEBERTA_V3, conv_kernel_size=3, conv_act="gelu")),  # as deberta-v2-xlarge
}
DECODERS = [f for f in FAMILIES if FAMILIES[f][1] != FAMILIES[f][2]]

def _build(folder: Path, spec: tuple[str, str, str, dict]) -> Path:
    import transformers

    config_cls, model_cls, _, fields = spec
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**fields))
    model.save_pretrained(folder)  # safetensors
    for name in MINILM_FILES:
        shutil.copy(minilm_dir() / name, folder / name)
    return folder


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run faster on one thread (and leave the other core alone); restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """``tiny_model(family)``: the folder of that family's tiny model, built once per module."""
    root = tmp_path_factory.mktemp("families")
    built: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in built:
            built[family] = _build(root / family, {**FAMILIES, **VARIANTS}[family])
        return built[family]

    return get


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    return write_typing_data(tmp_path_factory.mktemp("families-data"))


def _run(folder: Path, data, out: Path, learner: str, top_layers: int | None) -> dict:
    from conpet.config import from_dict
    from conpet.runner import run

    data_file, tasks = data
    return run(from_dict({"model": str(folder), "learner": learner, "seeds": 1, "out": str(out),
                          "data": {"file": str(data_file), "tasks": str(tasks)},
                          "train": {"epochs": 1, "batch_size": 8, "lr": 5e-3, "top_layers": top_layers,
                                    "precision": "fp32"}}), progress=False)


def _block_linear_names(model) -> set[str]:
    import re

    from transformers.pytorch_utils import Conv1D

    return {n.rsplit(".", 1)[-1] for n, m in model.named_modules()
            if isinstance(m, (torch.nn.Linear, Conv1D)) and re.search(r"\.\d+\.", n)}


def _check_reload(folder: Path, data, adapter: Path, top_layers: int | None) -> None:
    """The saved adapter through conpet's LoRA and through plain peft: identical logits, and not
    the base model's; peft's default targets without a scope, every linear layer of the scope with one."""
    from peft import PeftModel
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_DEFAULTS
    from transformers import AutoModel

    from conpet.backbone import cloze_features, load_backbone
    from conpet.config import from_dict
    from conpet.data import load_stream
    from conpet.engine import FeatureEngine
    from conpet.heads import GrowingHead
    from conpet.inputs import collate, encode_rows
    from conpet.pet import get_pet

    data_file, tasks = data
    stream = load_stream(from_dict({"data": {"file": str(data_file), "tasks": str(tasks)}}).data)
    bb = load_backbone(str(folder))
    enc = encode_rows(stream.rows, stream.kind, bb.tokenizer, bb.is_decoder, 64)
    batch = collate(enc, list(range(len(stream.rows))), bb.pad_id)
    head = GrowingHead.load(adapter)

    saved = json.loads((adapter / "adapter_config.json").read_text())
    if top_layers is None:  # peft's default for the family where it has one
        default = PEFT_DEFAULTS.get(bb.model.config.model_type)
        assert set(saved["target_modules"]) == set(default) if default else \
            0 < len(saved["target_modules"]) and set(saved["target_modules"]) <= _block_linear_names(bb.model)
    else:
        n = bb.model.config.num_hidden_layers
        assert saved["layers_to_transform"] == list(range(n - top_layers, n))
        assert set(saved["target_modules"]) == _block_linear_names(bb.model)

    pet = get_pet("lora", scope=FeatureEngine(bb, enc, top_layers).scope)
    ours = pet.attach(bb.model, "default")
    pet.load(ours, adapter, "default")
    pet.activate(ours, "default")
    ours.eval()
    plain = PeftModel.from_pretrained(AutoModel.from_pretrained(str(folder)), str(adapter)).eval()
    with torch.no_grad():
        a = head(cloze_features(ours, batch))
        b = head(cloze_features(plain, batch))
        with plain.disable_adapter():
            base = head(cloze_features(plain, batch))
    assert torch.equal(a, b)
    assert not torch.equal(a, base)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_sequential_with_pet_in_every_layer_reloads_in_plain_peft(family, tiny_model, data, tmp_path):
    folder = tiny_model(family)
    metrics = _run(folder, data, tmp_path / "run", "sequential", None)
    assert len(metrics["accuracy_matrix"]) == 2
    _check_reload(folder, data, tmp_path / "run" / "seed-0" / "adapters" / "task-02", None)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_static_conpet_on_the_top_layer_reloads_in_plain_peft(family, tiny_model, data, tmp_path):
    folder = tiny_model(family)
    metrics = _run(folder, data, tmp_path / "run", "emr*", 1)
    assert len(metrics["accuracy_matrix"]) == 2
    _check_reload(folder, data, tmp_path / "run" / "seed-0" / "adapters" / "task-02", 1)


@pytest.mark.parametrize("family", [*FAMILIES, *VARIANTS])
def test_split_forward_pass_is_exact_in_fp32(family, tiny_model, data):
    """Every family that works gives a split pass bit-identical to the full one in fp32 here; the
    engine's own 5% tolerance would let a wrong mask (gemma2: 2%) or a misplaced conv pass."""
    from conpet.backbone import load_backbone
    from conpet.config import from_dict
    from conpet.data import load_stream
    from conpet.engine import FeatureEngine
    from conpet.inputs import encode_rows

    data_file, tasks = data
    stream = load_stream(from_dict({"data": {"file": str(data_file), "tasks": str(tasks)}}).data)
    bb = load_backbone(str(tiny_model(family)))
    engine = FeatureEngine(bb, encode_rows(stream.rows, stream.kind, bb.tokenizer, bb.is_decoder, 64), 1)
    assert engine.check(bb.model, list(range(16)), atol=1e-5) <= 1e-5


@pytest.mark.parametrize("family", DECODERS)
def test_a_decoder_saved_as_its_base_model_is_read_as_a_decoder(family, tiny_model, tmp_path):
    from conpet.backbone import load_backbone

    folder = shutil.copytree(tiny_model(family), tmp_path / family)
    config = json.loads((folder / "config.json").read_text())
    config["architectures"] = [FAMILIES[family][2]]
    (folder / "config.json").write_text(json.dumps(config))
    assert load_backbone(str(folder)).is_decoder


def test_the_cache_keyword_is_read_from_the_forward_signature_through_wrappers():
    """transformers 5 renames ``past_key_values`` to ``cache``: conpet passes the name the
    backbone's own forward takes, looking through a wrapper (peft's, conpet's injected model)."""
    from torch import nn

    from conpet.families import cache_argument

    class Renamed(nn.Module):
        def forward(self, input_ids, cache=None, past_key_values=None):
            return input_ids

    class Older(nn.Module):
        def forward(self, input_ids, past_key_values=None):
            return input_ids

    class Wrapper(nn.Module):
        def __init__(self, base):
            super().__init__()
            self.base = base

        def get_base_model(self):
            return self.base

        def forward(self, *args, **kwargs):
            return self.base(*args, **kwargs)

    assert cache_argument(Renamed()) == "cache"
    assert cache_argument(Older()) == "past_key_values"
    assert cache_argument(Wrapper(Renamed())) == "cache"
    assert cache_argument(Wrapper(Older())) == "past_key_values"
