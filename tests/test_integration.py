"""A few tests on the real packaged models and the real built-in benchmarks."""

import pytest
import torch

from conpet.backbone import cloze_features, load_backbone
from conpet.config import from_dict
from conpet.data.benchmarks import load_benchmark
from conpet.inputs import collate, encode_rows
from conpet.runner import run

pytestmark = pytest.mark.integration


@pytest.mark.slow
def test_minilm_sequential_on_wordnet_typing(tmp_path):
    cfg = from_dict({"model": "minilm", "out": str(tmp_path / "run"),
                     "data": {"benchmark": "wordnet-typing", "max_train_per_class": 32},
                     "train": {"epochs": 4}})
    metrics = run(cfg, progress=False)
    A = metrics["accuracy_matrix"]
    assert len(A) == 10
    # a real encoder learns the first task far above chance (1 / 4 classes) ...
    assert A[0][0] > 0.5
    # ... and the PET-only learner forgets it once nine more tasks have gone by
    assert metrics["forgetting"] > 0.2


def test_smollm2_gguf_converts_loads_and_matches_plain_peft(tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModel

    bb = load_backbone("smollm2")
    assert bb.is_decoder and bb.hidden_size == 576 and (bb.path / "model.safetensors").is_file()
    assert not getattr(bb.model, "is_quantized", False)
    stream = load_benchmark("wordnet-relations")
    rows = stream.tasks[0].test[:4]
    enc = encode_rows([stream.rows[i] for i in rows], stream.kind, bb.tokenizer, True, 128)
    batch = collate(enc, list(range(4)), bb.pad_id)
    model = get_peft_model(bb.model, LoraConfig(r=4, target_modules=["q_proj", "k_proj"], init_lora_weights=False))
    model.save_pretrained(tmp_path / "adapter")
    plain = PeftModel.from_pretrained(AutoModel.from_pretrained(str(bb.path)), str(tmp_path / "adapter"))
    with torch.no_grad():
        a, b = cloze_features(model.eval(), batch), cloze_features(plain.eval(), batch)
    assert torch.equal(a, b) and a.shape == (4, 576)
