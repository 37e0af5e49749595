import numpy as np
import pytest

from conpet.backbone import load_backbone
from conpet.data.stream import Row
from conpet.inputs import collate, encode_rows, length_bucketed_batches

ROWS = [Row(text="The old dog barked at the mailman every single morning.", label="animal", entity="dog"),
        Row(text="Bread.", label="food", entity="Bread")]


def test_encoder_cloze_position_is_the_mask_token(tiny_encoder):
    bb = load_backbone(str(tiny_encoder))
    enc = encode_rows(ROWS, "typing", bb.tokenizer, False, 64)
    for ids, pos in zip(enc.ids, enc.cloze_pos):
        assert ids[pos] == bb.tokenizer.mask_token_id
        assert ids[0] == bb.tokenizer.cls_token_id and ids[-1] == bb.tokenizer.sep_token_id
    text = bb.tokenizer.decode(enc.ids[0][1:-1])
    assert text.endswith("in this sentence, dog is a [MASK].")


def test_decoder_prompt_ends_before_the_mask(tiny_decoder):
    bb = load_backbone(str(tiny_decoder))
    assert bb.is_decoder
    enc = encode_rows(ROWS, "typing", bb.tokenizer, True, 64)
    for ids, pos in zip(enc.ids, enc.cloze_pos):
        assert pos == len(ids) - 1
    assert bb.tokenizer.decode(enc.ids[1]).endswith("in this sentence, bread is a")


def test_truncation_keeps_the_template(tiny_encoder):
    bb = load_backbone(str(tiny_encoder))
    long_row = Row(text="word " * 500, label="x", entity="word")
    enc = encode_rows([long_row], "typing", bb.tokenizer, False, 32)
    assert len(enc.ids[0]) == 32
    assert enc.ids[0][enc.cloze_pos[0]] == bb.tokenizer.mask_token_id


def test_relation_template_needs_head_and_tail(tiny_encoder):
    from conpet.errors import DataError

    bb = load_backbone(str(tiny_encoder))
    with pytest.raises(DataError, match="needs field 'head'"):
        encode_rows([Row(text="x", label="y", tail="t", where="d.jsonl:4")], "relation", bb.tokenizer, False, 64)


def test_collate_pads_to_the_longest_row_only():
    from conpet.inputs import Encoded

    enc = Encoded(ids=[[1, 2, 3], [4, 5], [6]], cloze_pos=[2, 1, 0])
    batch = collate(enc, [1, 2], pad_id=0)
    assert batch["input_ids"].tolist() == [[4, 5], [6, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1], [1, 0]]
    assert batch["cloze_pos"].tolist() == [1, 0]


def test_length_buckets_cover_every_row_once_and_group_lengths():
    lengths = np.array([5, 50, 6, 51, 7, 52, 8, 53] * 10)
    batches = length_bucketed_batches(range(80), lengths, 4, np.random.default_rng(0))
    flat = sorted(i for b in batches for i in b)
    assert flat == list(range(80))
    spread = [lengths[b].max() - lengths[b].min() for b in batches]
    assert np.mean(spread) < 10  # random batches would mix 5 and 50
    again = length_bucketed_batches(range(80), lengths, 4, np.random.default_rng(0))
    assert again == batches
