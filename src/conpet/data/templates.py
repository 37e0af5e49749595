"""Cloze prompt templates (ConPET, Song et al. 2023).

Every task is cloze classification: the text is followed by a template with a ``[MASK]`` slot
and the backbone's hidden state at that slot feeds a linear head.

- encoder (BERT-like): the template is kept whole and ``[MASK]`` becomes the tokenizer's mask
  token; the hidden state is read at that token.
- decoder (Llama-like): the prompt ends right before ``[MASK]`` and the hidden state is read at
  the last prompt token. Under causal attention no later token can reach that position, so this
  is what the official code's mask-token position computes, without the extra token.
"""

from __future__ import annotations

from conpet.data.stream import Row
from conpet.errors import DataError

MASK = "[MASK]"

TEMPLATES: dict[str, str] = {
    "typing": "In this sentence, {entity} is a [MASK].",
    "relation": "In this sentence, {tail} is the [MASK] of {head}.",
    "text": "This text is about [MASK].",
}


def infer_kind(rows: list[Row]) -> str:
    """``generate`` if rows carry targets, ``relation`` if they carry head and tail, ``typing`` if
    they carry an entity, else ``text``."""
    if rows and all(r.target is not None for r in rows):
        return "generate"
    if rows and all(r.head is not None and r.tail is not None for r in rows):
        return "relation"
    if rows and all(r.entity is not None for r in rows):
        return "typing"
    return "text"


def cloze_parts(row: Row, kind: str) -> tuple[str, str]:
    """Return (template text before [MASK], template text after [MASK]) filled for ``row``."""
    template = TEMPLATES[kind]
    fields = {"entity": row.entity, "head": row.head, "tail": row.tail}
    needed = {"typing": ["entity"], "relation": ["head", "tail"], "text": []}[kind]
    for name in needed:
        if not fields[name]:
            raise DataError(f"{row.where or 'row'}: the {kind} template needs field '{name}'")
    before, after = template.split(MASK)
    return before.format(**fields), after.format(**fields)


def render(row: Row, kind: str, mask_token: str = MASK) -> str:
    """The full prompt as a string (for display and for encoders)."""
    before, after = cloze_parts(row, kind)
    return f"{row.text} {before}{mask_token}{after}"
