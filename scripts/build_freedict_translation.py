#!/usr/bin/env python3
"""Build ``freedict-translation``: a generative stream of real word translations, one task per
target language, from the FreeDict English-X dictionaries shipped by Debian.

Task order: French, German, Spanish, Italian, Portuguese, Dutch. A row asks for the translation
of one English headword into the task's language. ``answers`` lists every translation the
dictionary gives the word (every sense line of every entry whose headword is the word itself,
at most three words each; exact match and token F1 take the best of them); the target taught
in training is the translation listed most often over those senses (ties: the first listed), so
that a dictionary that files a word's senses in an arbitrary order (the German one lists "ham"
as a radio amateur first) still teaches its main translation ("Schinken", in two senses).

- Headwords: single lower-case English words (letters only, 3 to 14 of them) present in all six
  dictionaries with at least one translation of at most three words; annotations (``<neut>``,
  ``[chem.]``, ``(...)``) are removed from translations; example sentences, synonyms, notes and
  entries indexed under the word but headed by another (``‐able`` under "able") are skipped.
- Every headword has one split for all six tasks (a seeded shuffle of the sorted headwords:
  70% train, 10% dev, 20% test), so no test word is a training word of any task.
- Sorted inputs, a seeded ``random.Random`` and gzip with ``mtime=0``: a rebuild from the same
  packages gives the same bytes.

Usage (Debian packages ``dict-freedict-eng-{fra,deu,spa,ita,por,nld}``, version 2022.04.21)::

    apt-get install dict-freedict-eng-fra dict-freedict-eng-deu dict-freedict-eng-spa \\
        dict-freedict-eng-ita dict-freedict-eng-por dict-freedict-eng-nld
    python scripts/build_freedict_translation.py [--dictd /usr/share/dictd]

The dictionaries are GPL-2.0-or-later (FreeDict); so is the derived data
(``NOTICE-freedict-translation`` beside it).
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import random
import re
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "src" / "conpet" / "data" / "benchmarks"
LANGUAGES = [("fra", "French"), ("deu", "German"), ("spa", "Spanish"), ("ita", "Italian"), ("por", "Portuguese"),
             ("nld", "Dutch")]
SPLITS = (("train", 0.7), ("dev", 0.1), ("test", 0.2))
HEADWORD = re.compile(r"^[a-z]{3,14}$")
B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
PROMPT = 'Translate the English word "{word}" into {language}. Answer with the {language} word only.'


def _b64(text: str) -> int:
    n = 0
    for c in text:
        n = n * 64 + B64.index(c)
    return n


def clean(translation: str) -> str:
    """A translation without dictionary annotations: ``<neut>``, ``[chem.]``, ``(coll.)``, ``{...}``."""
    text = re.sub(r"<[^>]*>|\[[^\]]*\]|\([^)]*\)|\{[^}]*\}", " ", translation)
    return " ".join(text.replace("…", " ").split()).strip(" ;.")


def senses(entry: str, word: str) -> list[list[str]]:
    """The translations of every sense line of a dictd entry (``headword /ipa/`` then sense lines,
    optionally numbered), or none when the entry is headed by another word than ``word``."""
    lines = entry.splitlines()
    if not lines or lines[0].split(" /")[0].strip() != word:
        return []
    out = []
    for line in lines[1:]:
        stripped = line.strip()
        if not stripped or stripped.startswith(('"', "Synonym", "see:", "Note:")):
            continue
        stripped = re.sub(r"^\d+\.\s*", "", stripped)
        translations = [t for t in (clean(t) for t in stripped.split(",")) if t and len(t.split()) <= 3]
        if translations:
            out.append(translations)
    return out


def main_translation(sense_lists: list[list[str]]) -> str:
    """The translation listed in the most senses (ties: the first listed)."""
    order = list(dict.fromkeys(t for sense in sense_lists for t in sense))
    counts = {t: sum(t in sense for sense in sense_lists) for t in order}
    return max(order, key=lambda t: (counts[t], -order.index(t)))


def read_dictionary(folder: Path, code: str) -> dict[str, list[str]]:
    """English headword -> its translations, the main one first (:func:`main_translation`)."""
    data = gzip.open(folder / f"freedict-eng-{code}.dict.dz").read()
    found: dict[str, list[list[str]]] = {}
    with open(folder / f"freedict-eng-{code}.index", encoding="utf-8") as f:
        for line in f:
            word, offset, length = line.rstrip("\n").split("\t")
            if not HEADWORD.match(word):
                continue
            entry = data[_b64(offset):_b64(offset) + _b64(length)].decode("utf-8")
            found.setdefault(word, []).extend(senses(entry, word))
    out = {}
    for word, sense_lists in found.items():
        if sense_lists:
            target = main_translation(sense_lists)
            out[word] = [target] + [t for t in dict.fromkeys(t for s in sense_lists for t in s) if t != target]
    return out


def build(folder: Path, seed: int = 0) -> tuple[list[dict], dict]:
    dictionaries = {code: read_dictionary(folder, code) for code, _ in LANGUAGES}
    common = sorted(set.intersection(*(set(d) for d in dictionaries.values())))
    rng = random.Random(seed)
    order = common[:]
    rng.shuffle(order)
    split_of, start = {}, 0
    for k, (split, share) in enumerate(SPLITS):
        end = len(order) if k == len(SPLITS) - 1 else start + round(share * len(order))
        split_of.update({w: split for w in order[start:end]})
        start = end
    rows = []
    for code, language in LANGUAGES:
        for word in common:
            answers = dictionaries[code][word]
            rows.append({"prompt": PROMPT.format(word=word, language=language), "target": answers[0],
                         "answers": answers, "task": language.lower(), "split": split_of[word],
                         "id": f"{code}:{word}"})
    counts = {language.lower(): {s: sum(1 for w in common if split_of[w] == s) for s, _ in SPLITS}
              for _, language in LANGUAGES}
    meta = {"name": "freedict-translation", "seed": seed,
            "description": "Generative: an English word -> its translation (FreeDict), one task per language "
                           "(French, German, Spanish, Italian, Portuguese, Dutch); test headwords never trained on.",
            "kind": "generate", "tasks": [[language.lower()] for _, language in LANGUAGES], "counts": counts,
            "metric": "chrf", "headwords": len(common), "source": "FreeDict English-X dictionaries, Debian dict-freedict-eng-* "
            "2022.04.21", "licence": "GPL-2.0-or-later", "prompt": PROMPT}
    return rows, meta


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dictd", type=Path, default=Path("/usr/share/dictd"))
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args()
    rows, meta = build(args.dictd)
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0) as gz:
        for row in rows:
            gz.write((json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8"))
    (args.out / "freedict_translation.jsonl.gz").write_bytes(buf.getvalue())
    (args.out / "freedict_translation.meta.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
    print(f"{len(rows)} rows, {meta['headwords']} headwords x {len(LANGUAGES)} languages; per task {meta['counts']['french']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
