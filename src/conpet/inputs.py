"""From rows to tensors: prompts, tokenization (once per run), length buckets, padding."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch

from conpet.data.stream import Row
from conpet.errors import DataError
from conpet.data.templates import cloze_parts


@dataclass
class Encoded:
    """Token ids and cloze position of every row of a stream (index = row index).

    Generative rows (:func:`encode_generation`) are prompt + target + end-of-sequence token;
    ``target_start`` is where the target starts and ``cloze_pos`` is the prompt's last token (what
    a selector reads)."""

    ids: list[list[int]]
    cloze_pos: list[int]
    target_start: list[int] | None = None

    def prompt(self, i: int) -> list[int]:
        """The prompt tokens of generative row ``i`` (what generation starts from)."""
        return self.ids[i][: self.target_start[i]]

    def lengths(self, indices) -> np.ndarray:
        return self.all_lengths[np.asarray(list(indices), dtype=np.int64)]

    @cached_property
    def all_lengths(self) -> np.ndarray:
        """Token count of every row (index = row index), computed once."""
        return np.fromiter((len(ids) for ids in self.ids), dtype=np.int64, count=len(self.ids))


def encode_rows(rows: list[Row], kind: str, tokenizer, is_decoder: bool, max_length: int) -> Encoded:
    """Tokenize every row's cloze prompt; the text is truncated, the template never is.

    Encoder: ``[CLS] text before [MASK] after [SEP]``; the cloze position is the mask token.
    Decoder: ``text before``; the cloze position is the last token.
    """
    parts = [cloze_parts(r, kind) for r in rows]
    texts = [r.text for r in rows]
    if is_decoder:
        suffixes = [" " + before.rstrip() for before, _ in parts]
    else:
        suffixes = [" " + before + tokenizer.mask_token + after for before, after in parts]
    text_ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    suffix_ids = tokenizer(suffixes, add_special_tokens=False)["input_ids"]
    ids, pos = [], []
    if is_decoder:
        bos = [tokenizer.bos_token_id] if getattr(tokenizer, "add_bos_token", False) and tokenizer.bos_token_id is not None else []
        for t, s in zip(text_ids, suffix_ids):
            budget = max(0, max_length - len(s) - len(bos))
            seq = bos + t[:budget] + s
            ids.append(seq)
            pos.append(len(seq) - 1)
    else:
        cls, sep, mask = tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.mask_token_id
        for t, s in zip(text_ids, suffix_ids):
            budget = max(0, max_length - len(s) - 2)
            seq = [cls] + t[:budget] + s + [sep]
            ids.append(seq)
            pos.append(seq.index(mask))
    return Encoded(ids=ids, cloze_pos=pos)


MIN_PROMPT_TOKENS = 8


def text_chunks(tokenizer, text: str, max_tokens: int) -> list[list[int]]:
    """``text`` as token chunks of at most ``max_tokens`` (no special tokens; chunks of one token,
    which predict nothing, left out): the reference text of perplexity and of ZSCL's distillation."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return [c for c in (ids[k:k + max_tokens] for k in range(0, len(ids), max_tokens)) if len(c) > 1]


def chat_template_on(tokenizer, setting: bool | str) -> bool:
    """``data.chat_template``: ``auto`` = when the tokenizer has one; ``true`` requires one."""
    has = bool(getattr(tokenizer, "chat_template", None))
    if setting is True and not has:
        raise DataError("data.chat_template: true, but the model's tokenizer has no chat template "
                        "(set data.chat_template: false to train on plain prompts)")
    return has and setting is not False


def end_token_id(tokenizer) -> int:
    """The token that ends an answer: the tokenizer's end-of-sequence token (``[SEP]`` for a
    BERT-style vocabulary without one)."""
    for token_id in (tokenizer.eos_token_id, getattr(tokenizer, "sep_token_id", None)):
        if token_id is not None:
            return int(token_id)
    raise DataError("generative rows need a tokenizer with an end-of-sequence token (eos_token)")


def encode_generation(rows: list[Row], tokenizer, max_length: int, chat_template: bool | str = "auto") -> Encoded:
    """Tokenize generative rows: the prompt (in the model's chat template as a user turn when
    ``chat_template`` says so, else the prompt and a new line) then the target and the
    end-of-sequence token. A prompt too long for ``max_length`` keeps its last tokens (the
    template's assistant header stays next to the answer); a target that leaves no room for a
    prompt is an error naming the row."""
    chat = chat_template_on(tokenizer, chat_template)
    if chat:
        prompts = [tokenizer.apply_chat_template([{"role": "user", "content": r.text}], add_generation_prompt=True,
                                                 tokenize=False) for r in rows]
    else:
        prompts = [r.text + "\n" for r in rows]
    eos = end_token_id(tokenizer)
    bos = [tokenizer.bos_token_id] if not chat and getattr(tokenizer, "add_bos_token", False) \
        and tokenizer.bos_token_id is not None else []
    prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    target_ids = tokenizer([r.target or "" for r in rows], add_special_tokens=False)["input_ids"]
    ids, starts, pos = [], [], []
    for row, p, t in zip(rows, prompt_ids, target_ids):
        t = t + [eos]
        budget = max_length - len(t) - len(bos)
        if budget < MIN_PROMPT_TOKENS:
            raise DataError(f"{row.where or 'row'}: the target is {len(t) - 1} tokens long and leaves no room for "
                            f"the prompt within train.max_length {max_length}; raise train.max_length or "
                            "shorten the target")
        p = bos + p[-budget:]
        ids.append(p + t)
        starts.append(len(p))
        pos.append(len(p) - 1)
    return Encoded(ids=ids, cloze_pos=pos, target_start=starts)


def right_padded(seqs, pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists as a batch right-padded to its own longest: ``input_ids`` and ``attention_mask``
    [len(seqs), longest] (on ``device``)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, : len(s)] = torch.tensor(list(s), dtype=torch.long)
        mask[r, : len(s)] = 1
    return (ids, mask) if device is None else (ids.to(device), mask.to(device))


def collate(encoded: Encoded, indices, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch to its own longest row (dynamic padding)."""
    input_ids, attention = right_padded([encoded.ids[i] for i in indices], pad_id)
    pos = torch.tensor([encoded.cloze_pos[i] for i in indices], dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention, "cloze_pos": pos}


def length_bucketed_batches(indices, lengths: np.ndarray, batch_size: int, rng: np.random.Generator,
                            pool_batches: int = 50) -> list[list[int]]:
    """Shuffle, then sort by length inside pools of ``pool_batches`` batches, then shuffle batches.

    Rows of similar length share a batch (little padding) while the order stays random.
    ``pool_batches=1`` gives plain random batches (each batch is still padded only to its own
    longest row).
    """
    indices = np.asarray(list(indices))
    order = rng.permutation(len(indices))
    pool = batch_size * pool_batches
    batches = []
    for start in range(0, len(order), pool):
        chunk = order[start:start + pool]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches.extend(indices[chunk[i:i + batch_size]].tolist() for i in range(0, len(chunk), batch_size))
    rng.shuffle(batches)
    return batches


def sorted_batches(indices, lengths: np.ndarray, batch_size: int) -> list[list[int]]:
    """Evaluation batches: sorted by length, no shuffling."""
    indices = np.asarray(list(indices))
    order = np.argsort(lengths, kind="stable")
    return [indices[order[i:i + batch_size]].tolist() for i in range(0, len(order), batch_size)]
