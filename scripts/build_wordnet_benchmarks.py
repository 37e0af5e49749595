#!/usr/bin/env python3
"""Build conpet's built-in benchmarks from the WordNet 3.0 database files.

Three benchmarks are produced (see docs/benchmarks.md for the full description):

* ``wordnet_typing``: entity typing.  A word marked in a sentence is labelled
  with the WordNet lexicographer file (supersense) of the sense it is used in,
  e.g. ``noun.animal`` or ``verb.motion``.
* ``wordnet_relations``: FewRel-style relation classification.  A (head, tail)
  word pair, shown with the definitions of both words, is labelled with the
  WordNet pointer type that links them.  Direction convention: a WordNet
  pointer from synset H to synset T always becomes ``head = H``, ``tail = T``,
  and the label reads as "tail is the <label> of head" (``hypernym``: the tail
  is the hypernym of the head).
* ``wordnet_fine``: fine-grained noun typing.  Like ``wordnet_typing`` for
  nouns, but the label is a category synset of the noun hypernym tree (the
  most specific synsets with at least FINE_MIN_DESCENDANTS eligible synsets
  below them), e.g. ``musician`` or ``wheeled_vehicle``.

Only the Python standard library is used and the output is byte-identical on
every run with the same ``--seed`` (everything is sorted before it is
shuffled with ``random.Random``; gzip files are written with ``mtime=0``).

Usage::

    python scripts/build_wordnet_benchmarks.py            # data files
    python scripts/build_wordnet_benchmarks.py --write-docs  # + docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import re
import sys
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "src" / "conpet" / "data" / "benchmarks"
DEFAULT_DOCS = REPO_ROOT / "docs" / "benchmarks.md"
DEFAULT_WORDNET = Path("/usr/share/wordnet")
DEFAULT_LICENSE = Path("/usr/share/doc/wordnet-base/copyright")

SOURCE = "WordNet 3.0 (Debian wordnet-base 1:3.0-37)"
SPLITS = ("train", "dev", "test")
CAPS = {"train": 64, "dev": 16, "test": 32}
MINIMA = {"train": 40, "dev": 8, "test": 16}
N_TYPING_TASKS = 10
N_RELATION_TASKS = 4

# wordnet_fine: fine-grained noun typing with categories cut from the noun
# hypernym tree (see build_fine).
FINE_CAPS = {"train": 32, "dev": 8, "test": 16}
FINE_MINIMA = {"train": 20, "dev": 4, "test": 8}
N_FINE_TASKS = 20
# A category is a noun synset with at least this many eligible hyponyms
# (direct or indirect) none of whose direct hyponyms has that many.
FINE_MIN_DESCENDANTS = 200
# Left out of wordnet_fine, as (lemma, sense number in index.noun):
# * subtrees: Linnaean taxa (genus/family/order names, told apart only by
#   their rank and Latin form) and racial categories of people (a subtree of
#   dated and offensive terms);
# * synsets whose usage domain (";u" pointer) is one of these, and synsets
#   whose definition matches FINE_OFFENSIVE_RE: slurs, disparaging words and
#   obscenities are not wanted as class members.
FINE_EXCLUDED_SUBTREES = (("taxonomic group", 1), ("person of color", 1))
FINE_EXCLUDED_USAGE = (("ethnic slur", 1), ("disparagement", 1), ("obscenity", 2))
FINE_OFFENSIVE_RE = re.compile(r"\b(?:slur|offensive|disparaging|derogatory|obscene|vulgar)\b",
                               re.IGNORECASE)

# lexnames(5WN): file number -> lexicographer file name.
LEXNAMES = [
    "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal",
    "noun.artifact", "noun.attribute", "noun.body", "noun.cognition",
    "noun.communication", "noun.event", "noun.feeling", "noun.food",
    "noun.group", "noun.location", "noun.motive", "noun.object",
    "noun.person", "noun.phenomenon", "noun.plant", "noun.possession",
    "noun.process", "noun.quantity", "noun.relation", "noun.shape",
    "noun.state", "noun.substance", "noun.time", "verb.body", "verb.change",
    "verb.cognition", "verb.communication", "verb.competition",
    "verb.consumption", "verb.contact", "verb.creation", "verb.emotion",
    "verb.motion", "verb.perception", "verb.possession", "verb.social",
    "verb.stative", "verb.weather", "adj.ppl",
]

TYPING_CLASSES = sorted(name for name in LEXNAMES
                        if name.startswith(("noun.", "verb.")) and name != "noun.Tops")
POS_FILES = ("noun", "verb", "adj", "adv")
# pointer target pos letter -> data file
POS_OF_LETTER = {"n": "noun", "v": "verb", "a": "adj", "s": "adj", "r": "adv"}

# WordNet pointer symbol -> (label, WordNet name, explanation of "tail is the
# <label> of head").  A pointer from synset H to synset T gives head=H, tail=T.
RELATIONS: Dict[str, Tuple[str, str, str]] = {
    "@": ("hypernym", "hypernym", "the tail is a more general concept than the head"),
    "~": ("hyponym", "hyponym", "the tail is a more specific concept than the head"),
    "@i": ("instance_hypernym", "instance hypernym",
           "the head is an instance (a named entity) of the tail class"),
    "%m": ("member_meronym", "member meronym", "the tail is a member of the head"),
    "%p": ("part_meronym", "part meronym", "the tail is a part of the head"),
    "%s": ("substance_meronym", "substance meronym",
           "the tail is a substance the head is made of"),
    "#m": ("member_holonym", "member holonym", "the head is a member of the tail"),
    "#p": ("part_holonym", "part holonym", "the head is a part of the tail"),
    "#s": ("substance_holonym", "substance holonym",
           "the head is a substance the tail is made of"),
    "!": ("antonym", "antonym", "the tail means the opposite of the head (lexical)"),
    "*": ("entailment", "entailment", "doing the head entails doing the tail (verbs)"),
    ">": ("effect", "cause",
          "the head causes the tail; the tail is the effect (WordNet 'cause' pointer)"),
    "&": ("similar_to", "similar to",
          "the tail adjective is similar in meaning to the head adjective"),
    "+": ("derivation", "derivationally related form",
          "the tail word is morphologically and semantically related to the head word (lexical)"),
    "^": ("also_see", "also see", "the tail is a related entry the head refers to"),
    "=": ("attribute", "attribute",
          "the tail noun is the attribute for which the head adjective is a value "
          "(only the adjective -> noun direction is used)"),
    "$": ("verb_group", "verb group", "the tail verb sense is grouped with the head verb sense"),
    "\\": ("base_word", "pertainym / derived from adjective",
           "the head adjective pertains to the tail noun, or the head adverb is derived "
           "from the tail adjective (WordNet 'pertainym' pointer, lexical)"),
    "<": ("base_verb", "participle",
          "the head adjective is a participle of the tail verb (WordNet 'participle' pointer, lexical)"),
    ";c": ("topic_domain", "domain of synset - topic",
           "the tail is the topic domain the head belongs to"),
}

WORD_RE = re.compile(r"^[A-Za-z][A-Za-z'. -]*[A-Za-z.]$")
EXAMPLE_BAD_RE = re.compile(r'["`;|_\[\]{}<>]|\.\.\.|--')


# --------------------------------------------------------------------------- #
# Parsing
# --------------------------------------------------------------------------- #
class Synset:
    __slots__ = ("pos", "offset", "lexfile", "words", "pointers", "definition", "examples")

    def __init__(self, pos, offset, lexfile, words, pointers, definition, examples):
        self.pos = pos
        self.offset = offset
        self.lexfile = lexfile
        self.words = words
        self.pointers = pointers
        self.definition = definition
        self.examples = examples

    @property
    def key(self) -> str:
        return f"{self.pos}:{self.offset}"


def clean_word(raw: str) -> str:
    """Data-file word -> display form (underscores to spaces, no adj marker)."""
    word = re.sub(r"\((a|p|ip)\)$", "", raw)
    return word.replace("_", " ")


def clean_space(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def parse_gloss(gloss: str) -> Tuple[str, List[str]]:
    """Split a gloss into (first definition clause, [example sentences]).

    Glosses look like ``definition; more definition; "example 1"; "example 2"``.
    Examples are the double-quoted parts after the definition; glosses with
    unbalanced quotes yield no examples.  The definition is cut at its first
    semicolon so that it reads as one clause.
    """
    gloss = clean_space(gloss)
    cut = gloss.find('; "')
    if gloss.startswith('"'):
        definition, rest = "", gloss
    elif cut >= 0:
        definition, rest = gloss[:cut], gloss[cut + 2:]
    else:
        definition, rest = gloss, ""
    definition = definition.split(";")[0].replace('"', "")
    definition = clean_space(definition).rstrip(" .,:")
    examples: List[str] = []
    if rest and rest.count('"') % 2 == 0:
        for part in re.findall(r'"([^"]*)"', rest):
            part = clean_space(part)
            if part:
                examples.append(part)
    return definition, examples


def read_data(wordnet_dir: Path, pos: str) -> Dict[str, Synset]:
    synsets: Dict[str, Synset] = {}
    with open(wordnet_dir / f"data.{pos}", encoding="latin-1") as handle:
        for line in handle:
            if line.startswith("  "):
                continue
            head, _, gloss = line.partition(" | ")
            fields = head.split()
            offset, lexfile = fields[0], LEXNAMES[int(fields[1])]
            w_cnt = int(fields[3], 16)
            words = [clean_word(fields[4 + 2 * i]) for i in range(w_cnt)]
            i = 4 + 2 * w_cnt
            p_cnt = int(fields[i])
            i += 1
            pointers = []
            for _ in range(p_cnt):
                sym, t_off, t_pos, src_tgt = fields[i:i + 4]
                i += 4
                pointers.append((sym, POS_OF_LETTER[t_pos], t_off,
                                 int(src_tgt[:2], 16), int(src_tgt[2:], 16)))
            definition, examples = parse_gloss(gloss)
            synsets[offset] = Synset(pos, offset, lexfile, words, pointers, definition, examples)
    return synsets


def read_index(wordnet_dir: Path, pos: str) -> Dict[str, List[str]]:
    """lemma (lower case, spaces) -> synset offsets in sense-number order."""
    index: Dict[str, List[str]] = {}
    with open(wordnet_dir / f"index.{pos}", encoding="latin-1") as handle:
        for line in handle:
            if line.startswith("  "):
                continue
            fields = line.split()
            lemma = fields[0].replace("_", " ")
            synset_cnt = int(fields[2])
            index[lemma] = fields[-synset_cnt:]
    return index


def read_exceptions(wordnet_dir: Path, pos: str) -> Dict[str, List[str]]:
    """base form -> sorted irregular inflected forms (from pos.exc)."""
    forms: Dict[str, set] = defaultdict(set)
    with open(wordnet_dir / f"{pos}.exc", encoding="latin-1") as handle:
        for line in handle:
            fields = line.split()
            if len(fields) < 2:
                continue
            for base in fields[1:]:
                forms[base.replace("_", " ")].add(fields[0].replace("_", " "))
    return {base: sorted(vals) for base, vals in forms.items()}


class WordNet:
    def __init__(self, wordnet_dir: Path):
        self.data = {pos: read_data(wordnet_dir, pos) for pos in POS_FILES}
        self.index = {pos: read_index(wordnet_dir, pos) for pos in ("noun", "verb")}
        self.exc = {pos: read_exceptions(wordnet_dir, pos) for pos in ("noun", "verb")}

    def synset(self, pos: str, offset: str) -> Synset:
        return self.data[pos][offset]


# --------------------------------------------------------------------------- #
# Small helpers
# --------------------------------------------------------------------------- #
def is_clean_word(word: str) -> bool:
    return 2 <= len(word) <= 40 and bool(WORD_RE.match(word)) and "  " not in word


def first_occurrence_is_word(text: str, word: str, expected: Optional[int] = None) -> bool:
    """True if the first occurrence of ``word`` in ``text`` is a whole word
    (and, when given, starts at ``expected``)."""
    pos = text.find(word)
    if pos < 0 or (expected is not None and pos != expected):
        return False
    before = text[pos - 1] if pos > 0 else " "
    after = text[pos + len(word)] if pos + len(word) < len(text) else " "
    return _is_boundary(before) and _is_boundary(after)


def sentence_case(text: str) -> str:
    text = text[0].upper() + text[1:]
    if text[-1] not in ".!?":
        text += "."
    return text


def _inflect_regular(word: str, pos: str) -> List[str]:
    forms = []
    if len(word) < 3 or not word.isalpha() or not word.islower():
        return forms
    sibilant = word.endswith(("s", "x", "z", "ch", "sh"))
    cons_y = word.endswith("y") and word[-2] not in "aeiou"
    if pos == "noun":
        forms.append(word[:-1] + "ies" if cons_y else word + ("es" if sibilant else "s"))
        return forms
    forms.append(word + ("es" if sibilant else "s"))
    if cons_y:
        forms += [word[:-1] + "ies", word[:-1] + "ied", word + "ing"]
    elif word.endswith("e"):
        forms += [word + "d", word[:-1] + "ing"]
    else:
        forms += [word + "ed", word + "ing"]
        if (word[-1] not in "aeiouwxy" and word[-2] in "aeiou" and word[-3] not in "aeiou"):
            forms += [word + word[-1] + "ed", word + word[-1] + "ing"]
    return forms


def inflections(lemma: str, pos: str, exc: Dict[str, List[str]]) -> List[str]:
    """Surface forms to look for: the lemma, its irregular forms from the
    exception list, and regular -s/-es/-ies (nouns, last word) or
    -s/-ed/-ing (verbs, first word) forms."""
    forms = [lemma] + exc.get(lemma, [])
    tokens = lemma.split(" ")
    head_i = len(tokens) - 1 if pos == "noun" else 0
    head = tokens[head_i]
    variants = exc.get(head, []) + _inflect_regular(head, pos) if len(tokens) > 1 else \
        _inflect_regular(head, pos)
    for variant in variants:
        forms.append(" ".join(tokens[:head_i] + [variant] + tokens[head_i + 1:]))
    seen, out = set(), []
    for form in sorted(forms, key=lambda f: (-len(f), f)):
        if form not in seen:
            seen.add(form)
            out.append(form)
    return out


def _is_boundary(ch: str) -> bool:
    return not (ch.isalnum() or ch == "-")


def find_form(text: str, forms: Sequence[str]) -> Optional[str]:
    """Return the surface string of the earliest whole-word match of any form
    (case-insensitive), provided that its first verbatim occurrence in the
    text is that match."""
    lower = text.lower()
    best: Optional[Tuple[int, int]] = None
    for form in forms:
        needle = form.lower()
        start = lower.find(needle)
        while start >= 0:
            end = start + len(needle)
            before = text[start - 1] if start > 0 else " "
            after = text[end] if end < len(text) else " "
            if _is_boundary(before) and _is_boundary(after):
                if best is None or start < best[0]:
                    best = (start, end)
                break
            start = lower.find(needle, start + 1)
    if best is None:
        return None
    surface = text[best[0]:best[1]]
    if text.find(surface) != best[0]:
        return None
    return surface


def deal_tasks(labels: Iterable[str], n_tasks: int, rng: random.Random) -> List[List[str]]:
    ordered = sorted(labels)
    rng.shuffle(ordered)
    base, extra = divmod(len(ordered), n_tasks)
    tasks, start = [], 0
    for t in range(n_tasks):
        size = base + (1 if t < extra else 0)
        tasks.append(ordered[start:start + size])
        start += size
    return tasks


def split_sizes(n: int, caps: Dict[str, int] = CAPS,
                minima: Dict[str, int] = MINIMA) -> Optional[Dict[str, int]]:
    """Split sizes for a class with ``n`` usable rows, or None if too few."""
    n = min(n, sum(caps.values()))
    if n < sum(minima.values()):
        return None
    total = sum(caps.values())
    sizes = {s: max(minima[s], caps[s] * n // total) for s in ("dev", "test")}
    sizes["train"] = n - sizes["dev"] - sizes["test"]
    for s in ("test", "dev"):
        while sizes["train"] < minima["train"] and sizes[s] > minima[s]:
            sizes[s] -= 1
            sizes["train"] += 1
    return sizes


# --------------------------------------------------------------------------- #
# Entity typing
# --------------------------------------------------------------------------- #
def typing_candidates(wn: WordNet, syn: Synset,
                      class_of: Callable[[Synset], Optional[str]] = lambda s: s.lexfile,
                      ) -> List[Tuple[int, int, str, str, str, str]]:
    """(tier, word_no, lemma_key, lemma, text, entity) for one synset.

    tier 0: example sentence, lemma unambiguous for the class
    tier 1: definitional sentence, lemma unambiguous
    tier 2: example sentence, ambiguous lemma
    tier 3: definitional sentence, ambiguous lemma
    "Unambiguous" = this synset is the lemma's most frequent sense in its
    part of speech, or all senses of the lemma share this synset's class
    (``class_of``: the lexicographer file by default).
    """
    out = []
    index = wn.index[syn.pos]
    for word_no, lemma in enumerate(syn.words):
        if not is_clean_word(lemma) or any(ch.isdigit() for ch in lemma):
            continue
        key = lemma.lower()
        senses = index.get(key)
        if not senses or syn.offset not in senses:
            continue
        classes = {class_of(wn.synset(syn.pos, off)) for off in senses}
        unambiguous = senses[0] == syn.offset or classes == {class_of(syn)}
        forms = inflections(lemma, syn.pos, wn.exc[syn.pos])
        text = entity = None
        for example in syn.examples:
            if EXAMPLE_BAD_RE.search(example) or not 4 <= len(example.split()) <= 30:
                continue
            candidate = sentence_case(example)
            surface = find_form(candidate, forms)
            if surface is not None:
                text, entity = candidate, surface
                break
        tier = 0
        if text is None:
            tier = 1
            # drop a leading domain tag such as "(chemistry)"
            definition = re.sub(r"^\([^()]*\)\s*", "", syn.definition)
            if (not definition or definition[0].isdigit() or len(definition.split()) > 30
                    or EXAMPLE_BAD_RE.search(definition)):
                continue
            if syn.pos == "verb":
                definition = re.sub(r"^to ", "", definition)
                prefix = "To "
                text = f"To {lemma} means to {definition}."
            else:
                prefix = "The term "
                text = f"The term {lemma} means {definition}."
            if not first_occurrence_is_word(text, lemma, expected=len(prefix)):
                continue
            entity = lemma
        if not unambiguous:
            tier += 2
        out.append((tier, word_no, key, lemma, text, entity))
    out.sort()
    return out


def select_typing_rows(pool: Dict[str, List[Tuple[str, list]]], seed: int, tag: str,
                       caps: Dict[str, int] = CAPS, minima: Dict[str, int] = MINIMA,
                       ) -> Tuple[List[str], List[dict]]:
    """Pick the rows of a typing benchmark from per-class candidate pools.

    ``pool`` maps a class to ``(synset_key, typing_candidates)`` pairs in
    synset order.  Each pool is shuffled with ``{seed}:{tag}:{class}``; tiers
    are filled globally with a benchmark-wide set of used lemmas and surface
    forms (so a word occurs at most once), classes that cannot reach the
    split minima are dropped (and the selection redone without them), and
    every surviving class is split into test/dev/train by synset with
    ``{seed}:{tag}-split:{class}``.  Returns (surviving classes, rows without
    ids; ``label`` is the class).
    """
    classes = sorted(pool)
    for label in classes:
        random.Random(f"{seed}:{tag}:{label}").shuffle(pool[label])

    active = [c for c in classes if len(pool[c]) >= sum(minima.values())]
    cap = sum(caps.values())
    while True:
        # Scarce classes pick first inside each tier; tiers are global so that
        # a lemma's best (tier 0) use is claimed before any ambiguous use.
        order = sorted(active, key=lambda c: (len(pool[c]), c))
        used_lemmas: set = set()
        chosen: Dict[str, List[Tuple[str, tuple]]] = {c: [] for c in active}
        taken: Dict[str, set] = {c: set() for c in active}
        for tier in range(4):
            for label in order:
                for syn_key, cands in pool[label]:
                    if len(chosen[label]) >= cap:
                        break
                    if syn_key in taken[label]:
                        continue
                    for cand in cands:
                        words = {cand[2], cand[5].lower()}  # lemma and surface form
                        if cand[0] == tier and not words & used_lemmas:
                            used_lemmas.update(words)
                            taken[label].add(syn_key)
                            chosen[label].append((syn_key, cand))
                            break
        failing = [c for c in active if split_sizes(len(chosen[c]), caps, minima) is None]
        if not failing:
            break
        active = [c for c in active if c not in failing]

    rows = []
    for label in sorted(active):
        rng = random.Random(f"{seed}:{tag}-split:{label}")
        picked = sorted(chosen[label], key=lambda item: item[0])
        rng.shuffle(picked)
        sizes = split_sizes(len(picked), caps, minima)
        assert sizes is not None
        start = 0
        for split in ("test", "dev", "train"):
            for syn_key, (_tier, _no, key, _lemma, text, entity) in picked[start:start + sizes[split]]:
                rows.append({"text": text, "entity": entity, "label": label, "split": split,
                             "synset": syn_key, "lemma": key})
            start += sizes[split]
    return sorted(active), rows


def number_typing_rows(rows: List[dict], prefix: str) -> List[dict]:
    """Sort rows by (split, label, synset) and put an ``id`` first in each."""
    rows = sorted(rows, key=lambda r: (SPLITS.index(r["split"]), r["label"], r["synset"]))
    out = []
    for i, row in enumerate(rows, start=1):
        row_id = {"id": f"{prefix}-{i:06d}"}
        row_id.update(row)
        out.append(row_id)
    return out


def build_typing(wn: WordNet, seed: int) -> Tuple[List[dict], dict]:
    classes = list(TYPING_CLASSES)
    pool: Dict[str, List[Tuple[str, list]]] = {c: [] for c in classes}
    for pos in ("noun", "verb"):
        for offset in sorted(wn.data[pos]):
            syn = wn.data[pos][offset]
            if syn.lexfile not in pool:
                continue
            cands = typing_candidates(wn, syn)
            if cands:
                pool[syn.lexfile].append((syn.key, cands))
    active, rows = select_typing_rows(pool, seed, "typing")
    rows = number_typing_rows(rows, "typing")
    labels = sorted(active)
    meta = {
        "name": "wordnet-typing",
        "kind": "typing",
        "description": (
            "Entity typing built from WordNet 3.0: a word marked in a sentence (a WordNet "
            "example sentence, or a definitional sentence built from the gloss) is labelled "
            "with the lexicographer file (supersense) of its sense, e.g. noun.animal or "
            "verb.motion. Splits are disjoint by synset and by lemma."
        ),
        "source": SOURCE,
        "seed": seed,
        "tasks": deal_tasks(labels, N_TYPING_TASKS, random.Random(f"{seed}:typing-tasks")),
        "counts": count_rows(rows, labels),
    }
    return rows, meta


# --------------------------------------------------------------------------- #
# Fine-grained noun typing
# --------------------------------------------------------------------------- #
def noun_ancestors(wn: WordNet) -> Dict[str, frozenset]:
    """noun offset -> all its hypernym ancestors via ``@`` and ``@i`` (every path)."""
    nouns = wn.data["noun"]
    parents = {off: sorted({t_off for sym, t_pos, t_off, _s, _t in syn.pointers
                            if sym in ("@", "@i") and t_pos == "noun"})
               for off, syn in nouns.items()}
    memo: Dict[str, frozenset] = {}

    def walk(off: str) -> frozenset:
        if off not in memo:
            found = set()
            for parent in parents[off]:
                found.add(parent)
                found |= walk(parent)
            memo[off] = frozenset(found)
        return memo[off]

    for off in sorted(nouns):
        walk(off)
    return memo


def noun_sense(wn: WordNet, lemma: str, sense_no: int) -> str:
    return wn.index["noun"][lemma][sense_no - 1]


def fine_categories(wn: WordNet, ancestors: Dict[str, frozenset],
                    eligible: Sequence[str]) -> List[str]:
    """The category synsets: noun synsets with at least FINE_MIN_DESCENDANTS
    eligible descendants, none of whose direct hyponyms has that many (the
    most specific synsets that are still well populated).  They form an
    antichain: no category lies below another on any hypernym path."""
    below: Dict[str, int] = defaultdict(int)
    for off in eligible:
        for anc in ancestors[off]:
            below[anc] += 1
    children: Dict[str, List[str]] = defaultdict(list)
    for off, syn in wn.data["noun"].items():
        for sym, t_pos, t_off, _s, _t in syn.pointers:
            if sym in ("@", "@i") and t_pos == "noun":
                children[t_off].append(off)
    return sorted(off for off, n in below.items()
                  if n >= FINE_MIN_DESCENDANTS
                  and all(below.get(child, 0) < FINE_MIN_DESCENDANTS for child in children[off]))


def fine_label_names(wn: WordNet, categories: Sequence[str]) -> Dict[str, str]:
    """category offset -> label: its first lemma with underscores, plus a
    ``.n.<sense number>`` suffix when two categories share a first lemma."""
    nouns = wn.data["noun"]
    base = {off: nouns[off].words[0].replace(" ", "_") for off in categories}
    clashes = defaultdict(int)
    for name in base.values():
        clashes[name.lower()] += 1
    names = {}
    for off in categories:
        name = base[off]
        if clashes[name.lower()] > 1:
            sense_no = wn.index["noun"][nouns[off].words[0].lower()].index(off) + 1
            name = f"{name}.n.{sense_no}"
        names[off] = name
    assert len(set(names.values())) == len(names)
    return names


def build_fine(wn: WordNet, seed: int) -> Tuple[List[dict], dict]:
    nouns = wn.data["noun"]
    ancestors = noun_ancestors(wn)
    excluded = {noun_sense(wn, lemma, no) for lemma, no in FINE_EXCLUDED_SUBTREES}
    usage = {noun_sense(wn, lemma, no) for lemma, no in FINE_EXCLUDED_USAGE}
    eligible = [off for off in sorted(nouns)
                if off not in excluded and not ancestors[off] & excluded
                and not any(sym == ";u" and t_off in usage
                            for sym, _p, t_off, _s, _t in nouns[off].pointers)
                and not FINE_OFFENSIVE_RE.search(nouns[off].definition)
                and typing_candidates(wn, nouns[off])]
    categories = fine_categories(wn, ancestors, eligible)
    category_set = set(categories)
    # A synset belongs to the category it descends from; synsets below two or
    # more categories (multiple inheritance) are dropped, and so are the
    # category synsets themselves (they descend from none).
    category_of: Dict[str, str] = {}
    n_multi = 0
    for off in eligible:
        found = sorted(ancestors[off] & category_set)
        if len(found) == 1:
            category_of[off] = found[0]
        elif len(found) > 1:
            n_multi += 1

    def class_of(syn: Synset) -> Optional[str]:
        return category_of.get(syn.offset) if syn.pos == "noun" else None

    pool: Dict[str, List[Tuple[str, list]]] = {f"noun:{c}": [] for c in categories}
    for off in sorted(category_of):
        syn = nouns[off]
        pool[f"noun:{category_of[off]}"].append((syn.key, typing_candidates(wn, syn, class_of)))
    active, rows = select_typing_rows(pool, seed, "fine", FINE_CAPS, FINE_MINIMA)
    names = fine_label_names(wn, [key.split(":")[1] for key in active])
    for row in rows:
        row["label"] = names[row["label"].split(":")[1]]
    rows = number_typing_rows(rows, "fine")
    labels = sorted(names.values())
    by_name = {name: off for off, name in names.items()}
    meta = {
        "name": "wordnet-fine",
        "kind": "typing",
        "description": (
            "Fine-grained noun typing built from WordNet 3.0: a noun marked in a sentence (a "
            "WordNet example sentence, or a definitional sentence built from the gloss) is "
            "labelled with the category synset its sense descends from in the noun hypernym "
            "tree (@ and @i pointers), e.g. musical_instrument or city. Categories are the most "
            f"specific noun synsets with at least {FINE_MIN_DESCENDANTS} eligible hyponyms; "
            "senses below two categories are dropped. Splits are disjoint by synset and by "
            "lemma."
        ),
        "source": SOURCE,
        "seed": seed,
        "rule": {
            "min_descendants": FINE_MIN_DESCENDANTS,
            "candidate_categories": len(categories),
            "eligible_synsets": len(eligible),
            "dropped_multi_category_synsets": n_multi,
            "labelled_synsets": len(category_of),
        },
        "categories": {
            name: {"synset": f"noun:{by_name[name]}",
                   "lemmas": nouns[by_name[name]].words,
                   "definition": nouns[by_name[name]].definition}
            for name in labels
        },
        "dropped_categories": sorted(
            nouns[c].words[0].replace(" ", "_") + f" (noun:{c})"
            for c in categories if f"noun:{c}" not in set(active)),
        "tasks": deal_tasks(labels, N_FINE_TASKS, random.Random(f"{seed}:fine-tasks")),
        "counts": count_rows(rows, labels),
    }
    return rows, meta


# --------------------------------------------------------------------------- #
# Relation classification
# --------------------------------------------------------------------------- #
def relation_candidates(wn: WordNet) -> Dict[str, List[tuple]]:
    """label -> sorted (head_key, tail_key, head, tail, text) candidates."""
    out: Dict[str, List[tuple]] = defaultdict(list)
    for pos in POS_FILES:
        for offset in sorted(wn.data[pos]):
            src = wn.data[pos][offset]
            for sym, t_pos, t_off, s_no, t_no in src.pointers:
                if sym not in RELATIONS:
                    continue
                if sym == "=" and pos != "adj":
                    continue  # keep only adjective -> attribute-noun direction
                tgt = wn.synset(t_pos, t_off)
                if tgt.key == src.key:
                    continue
                if s_no or t_no:
                    head, tail = src.words[s_no - 1], tgt.words[t_no - 1]
                else:
                    head, tail = src.words[0], tgt.words[0]
                if not (is_clean_word(head) and is_clean_word(tail)):
                    continue
                if re.sub(r"[- ]", "", head.lower()) == re.sub(r"[- ]", "", tail.lower()):
                    continue  # same word up to case, spaces and hyphens
                h_def, t_def = src.definition, tgt.definition
                if not h_def or not t_def:
                    continue
                if len(h_def.split()) > 25 or len(t_def.split()) > 25:
                    continue
                text = f"{head}: {h_def}. {tail}: {t_def}."
                if not first_occurrence_is_word(text, head, expected=0):
                    continue
                if not first_occurrence_is_word(text, tail):
                    continue
                label = RELATIONS[sym][0]
                out[label].append((src.key, tgt.key, head, tail, text))
    for label in out:
        out[label] = sorted(set(out[label]))
    return out


def build_relations(wn: WordNet, seed: int) -> Tuple[List[dict], dict]:
    cands = relation_candidates(wn)
    for label in sorted(cands):
        random.Random(f"{seed}:rel:{label}").shuffle(cands[label])
    active = sorted(l for l in cands if len(cands[l]) >= sum(MINIMA.values()))
    while True:
        order = sorted(active, key=lambda l: (len(cands[l]), l))
        head_split: Dict[str, str] = {}
        used_pairs: set = set()
        chosen: Dict[str, Dict[str, list]] = {}
        for label in order:
            got = {s: [] for s in SPLITS}
            for head_key, tail_key, head, tail, text in cands[label]:
                if all(len(got[s]) >= CAPS[s] for s in SPLITS):
                    break
                pair = tuple(sorted((head_key, tail_key)))
                if pair in used_pairs:
                    continue
                split = head_split.get(head_key)
                if split is None:
                    # the split that is furthest from its quota gets this head
                    split = max(SPLITS, key=lambda s: ((CAPS[s] - len(got[s])) / CAPS[s],
                                                       -SPLITS.index(s)))
                if len(got[split]) >= CAPS[split]:
                    continue
                head_split[head_key] = split
                used_pairs.add(pair)
                got[split].append((head_key, tail_key, head, tail, text))
            chosen[label] = got
        failing = [l for l in active if any(len(chosen[l][s]) < MINIMA[s] for s in SPLITS)]
        if not failing:
            break
        active = [l for l in active if l not in failing]

    rows = []
    for label in sorted(active):
        for split in SPLITS:
            for head_key, tail_key, head, tail, text in chosen[label][split]:
                rows.append({"text": text, "head": head, "tail": tail, "label": label,
                             "split": split,
                             "pair": f"{head_key}-{tail_key}"})
    rows.sort(key=lambda r: (SPLITS.index(r["split"]), r["label"], r["pair"]))
    for i, row in enumerate(rows, start=1):
        row_id = {"id": f"rel-{i:06d}"}
        row_id.update(row)
        rows[i - 1] = row_id
    labels = sorted(active)
    meta = {
        "name": "wordnet-relations",
        "kind": "relation",
        "description": (
            "FewRel-style relation classification built from WordNet 3.0 pointers: a (head, "
            "tail) word pair shown with both definitions is labelled with the pointer type "
            "from the head's synset to the tail's synset, read as 'tail is the <label> of "
            "head' (hypernym: the tail is the hypernym of the head). Splits are disjoint by "
            "pair and by head synset; pair keys are pos:offset-pos:offset."
        ),
        "source": SOURCE,
        "seed": seed,
        "tasks": deal_tasks(labels, N_RELATION_TASKS, random.Random(f"{seed}:relation-tasks")),
        "counts": count_rows(rows, labels),
    }
    return rows, meta


def count_rows(rows: List[dict], labels: List[str]) -> Dict[str, Dict[str, int]]:
    counts = {label: {s: 0 for s in SPLITS} for label in labels}
    for row in rows:
        counts[row["label"]][row["split"]] += 1
    return counts


# --------------------------------------------------------------------------- #
# Output
# --------------------------------------------------------------------------- #
def atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def gzip_bytes(data: bytes) -> bytes:
    import io

    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, compresslevel=9, mtime=0) as gz:
        gz.write(data)
    return buf.getvalue()


def jsonl_bytes(rows: List[dict]) -> bytes:
    return "".join(json.dumps(row, ensure_ascii=True) + "\n" for row in rows).encode("ascii")


def meta_bytes(meta: dict) -> bytes:
    return (json.dumps(meta, indent=2, ensure_ascii=True) + "\n").encode("ascii")


# --------------------------------------------------------------------------- #
# Documentation
# --------------------------------------------------------------------------- #
DOC_HEADER = """\
# Built-in benchmarks (WordNet 3.0)

conpet ships three small, real benchmarks generated from the WordNet 3.0
database, so that continual-learning experiments can run offline without
downloading anything. The files live in `src/conpet/data/benchmarks/`:

| file | content |
| --- | --- |
| `wordnet_typing.jsonl.gz` | entity typing rows |
| `wordnet_typing.meta.json` | labels, task sequence, per-class counts |
| `wordnet_relations.jsonl.gz` | relation classification rows |
| `wordnet_relations.meta.json` | labels, task sequence, per-class counts |
| `wordnet_fine.jsonl.gz` | fine-grained noun typing rows |
| `wordnet_fine.meta.json` | labels, category synsets, task sequence, per-class counts |
| `LICENSE-WordNet` | the WordNet 3.0 licence (copy of `/usr/share/doc/wordnet-base/copyright`) |

Source: {source}, read from `/usr/share/wordnet` (`data.*`, `index.*`,
`*.exc`). WordNet is (c) Princeton University and is redistributed under
the WordNet 3.0 licence in `LICENSE-WordNet`.

## Regenerating

```bash
apt-get install wordnet-base          # provides /usr/share/wordnet
python scripts/build_wordnet_benchmarks.py              # rewrites the data files
python scripts/build_wordnet_benchmarks.py --write-docs # ... and this page
```

Options: `--wordnet-dir` (default `/usr/share/wordnet`), `--out` (default
`src/conpet/data/benchmarks`), `--seed` (default 0). The builder uses only the
Python standard library and is deterministic: everything is sorted before it
is shuffled with `random.Random` seeded from `--seed`, gzip files are written
with `mtime=0` and no file name, and every file is written atomically
(temporary file + `os.replace`). `tests/test_wordnet_benchmarks.py` rebuilds
the files into a temporary directory and checks they are byte-identical.

Every row has an `id` and a `split` (`train`, `dev` or `test`). In
`wordnet_typing` and `wordnet_relations` each class has
at most {cap_train} train, {cap_dev} dev and {cap_test} test rows; a class that cannot
reach at least {min_train} train, {min_dev} dev and {min_test} test rows is dropped
(`wordnet_fine` uses smaller caps and minima, see below). When a
class has fewer than {cap_total} rows, dev and test shrink proportionally (never
below their minima). The labels of each benchmark are shuffled with the seed
and dealt into class-disjoint tasks of near-equal size (sizes differ by at
most one); nouns and verbs are mixed freely.

## Entity typing (`wordnet_typing`)

Row: `{{"id", "text", "entity", "label", "split", "synset", "lemma"}}`, e.g.

```json
{typing_example}
```

* **Label**: the lexicographer file ("supersense") of the synset, e.g.
  `noun.animal`, `verb.motion` (lexnames(5WN)). `noun.Tops` is not used.
* **Entity and text**: one lemma of the synset (underscores become spaces).
  Preferred text is one of the quoted example sentences of the synset's gloss
  that contains the lemma as a whole word, either verbatim or as a simple
  inflection (regular `-s/-es/-ies` for nouns on the last word, `-s/-ed/-ing`
  with `e`-dropping, `y`-to-`i` and consonant doubling for verbs on the first
  word, plus the irregular forms in `noun.exc`/`verb.exc`), matched
  case-insensitively. The example gets a capital first letter and a final
  period if missing; `entity` is the exact matched surface string, so it
  occurs verbatim in `text` and its first occurrence is the marked word.
  Otherwise a definitional sentence is built from the first clause of the
  gloss definition (without a leading domain tag such as `(chemistry)`):
  `The term {{lemma}} means {{definition}}.` for nouns and
  `To {{lemma}} means to {{definition}}.` for verbs.
* **Ambiguity**: candidates are ranked in four tiers: (0) example sentence
  and an unambiguous lemma, (1) definitional sentence and an unambiguous
  lemma, (2) example with an ambiguous lemma, (3) definition with an
  ambiguous lemma. A lemma is unambiguous for the synset when the synset is
  its most frequent sense (first in `index.noun`/`index.verb`) or when all of
  its senses in that part of speech share the synset's lexicographer file.
  Tiers are filled globally in that order (scarce classes choose first
  within a tier).
* **One row per synset and per lemma**: a synset gives at most one row and a
  lemma (lower-cased) is used at most once in the whole benchmark, and no
  lower-cased surface form (`entity`) is used twice either (e.g. `leaves` of
  `leaf` blocks the lemma `leaves`), so a word has a single label and belongs
  to exactly one split: train, dev and test are disjoint by synset, by lemma
  and by entity string (no test word is seen in training). The extra `lemma`
  field holds the lower-cased base form (the entity may be an inflected or
  capitalised form of it); conpet's loader ignores it.
* **Classes**: the 25 noun files other than `noun.Tops` and the 15 verb
  files; dropped for lack of rows: {typing_dropped}.

## Relation classification (`wordnet_relations`)

Row: `{{"id", "text", "head", "tail", "label", "split", "pair"}}`, e.g.

```json
{relation_example}
```

* **Text**: `{{head}}: {{head definition}}. {{tail}}: {{tail definition}}.` where
  the definitions are the first clause of each synset's gloss without the
  quoted examples (at most 25 words each). `head` starts the text; rows in
  which the first occurrence of `tail` is not a whole word (e.g. `music`
  inside `musical`) are skipped, so both words can be located with
  `str.find`.
* **Words**: for lexical pointers (antonym, derivation, pertainym,
  participle; source/target word numbers not `00`) the two specific words
  linked by the pointer; for semantic pointers the first lemma of each
  synset. Pairs whose two words are equal up to case, spaces and hyphens
  (e.g. `back-channel` / `back channel`) are skipped.
* **Direction convention**: a WordNet pointer from synset H to synset T always
  gives `head` = a word of H and `tail` = a word of T, and the label is named
  so that conpet's template `In this sentence, {{tail}} is the [MASK] of
  {{head}}.` reads correctly: label `hypernym` means "the tail is the hypernym
  of the head" (pointer `@`). Where WordNet's own name would read backwards
  under this template the label is renamed: pointer `>` ("cause") is
  `effect`, pointer `\\` ("pertainym"/"derived from adjective") is
  `base_word`, pointer `<` ("participle") is `base_verb`. Attribute (`=`) is
  used only in the adjective -> noun direction.
* **Splits**: each head synset is assigned to one split (so splits are
  disjoint by head synset and therefore by pair), and each unordered synset
  pair occurs at most once in the whole benchmark, so (A, B) and (B, A) never
  both appear, not even under inverse labels such as hypernym/hyponym.
  `pair` is `headpos:offset-tailpos:offset`.

Pointer types and their labels (types marked "dropped" did not have enough
rows after filtering):

| label | WordNet pointer | meaning ("tail is the label of head") | used |
| --- | --- | --- | --- |
{relation_table}

## Fine-grained noun typing (`wordnet_fine`)

Benchmark name `wordnet-fine`. Same rows as `wordnet_typing` (ids `fine-...`),
nouns only, e.g.

```json
{fine_example}
```

but the label is a category synset of the noun hypernym tree instead of a
supersense, e.g. `musician`, `wheeled_vehicle`, `city`, `disease`.

* **Eligible senses**: every noun synset with at least one usable
  (entity, sentence) candidate, built exactly as for `wordnet_typing`,
  except: the Linnaean taxa (the subtree of `taxonomic group`, i.e. genus,
  family and order names, which differ only by rank and Latin form), the
  subtree of `person of color` (racial categories, many dated or offensive
  terms), synsets whose usage domain (`;u` pointer) is `ethnic slur`,
  `disparagement` or `obscenity`, and synsets whose definition contains
  `slur`, `offensive`, `disparaging`, `derogatory`, `obscene` or `vulgar`.
* **Categories**: ancestors are followed through hypernym (`@`) and
  instance-hypernym (`@i`) pointers, over every path. A noun synset is a
  category when at least {fine_min_desc} eligible synsets lie below it and none of its
  direct hyponyms has {fine_min_desc} or more below it: the most specific synsets that
  are still well populated. No category lies below another, so a sense
  descends from at most one category along any single path.
* **Labels**: each eligible synset is labelled with the category it descends
  from. A synset below two or more categories (multiple inheritance, e.g.
  a city that is also listed as a port, or a dog breed below both `canine`
  and `domestic animal`) is **dropped**, as are the category
  synsets themselves (so the entity is never the label word's own synset)
  and synsets below no category. Of {fine_eligible} eligible synsets, {fine_labelled} are
  labelled and {fine_multi} dropped as multi-category; {fine_candidates} categories qualify.
  The label is the category's first lemma with spaces as underscores; if two
  surviving categories shared a first lemma, both would get a
  `.n.<sense number>` suffix (none does with the default seed and WordNet 3.0).
* **Ambiguity tiers** as in `wordnet_typing`, with the category in place of
  the lexicographer file: a lemma is unambiguous when the synset is its most
  frequent noun sense or all its noun senses carry the same category.
* **Splits and sizes**: the selection code of `wordnet_typing` is reused
  (one row per synset, per lemma and per surface form; splits disjoint by
  synset, lemma and entity string), with at most {fine_cap_train} train,
  {fine_cap_dev} dev and {fine_cap_test} test rows per class and minima {fine_min_train} / {fine_min_dev} / {fine_min_test}.
  Classes that cannot reach the minima are dropped: {fine_dropped}.
  The {fine_n_classes} surviving classes are dealt into {fine_n_tasks} tasks.
* **Meta file**: besides `tasks` and `counts`, `categories` maps each label
  to its synset (`noun:offset`), lemmas and definition, and `rule` records
  the threshold and the counts above.
"""


def doc_tables(meta: dict, categories: Optional[Dict[str, dict]] = None) -> str:
    lines = []
    counts = meta["counts"]
    totals = {s: sum(c[s] for c in counts.values()) for s in SPLITS}
    lines.append(
        f"**{meta['name']}**: {sum(totals.values())} rows (train {totals['train']}, "
        f"dev {totals['dev']}, test {totals['test']}), {len(counts)} classes, "
        f"{len(meta['tasks'])} tasks.\n")
    if categories is None:
        lines.append("| task | label | train | dev | test |")
        lines.append("| --- | --- | ---: | ---: | ---: |")
    else:
        lines.append("| task | label | category synset: definition | train | dev | test |")
        lines.append("| --- | --- | --- | ---: | ---: | ---: |")
    for t, task in enumerate(meta["tasks"]):
        for label in task:
            c = counts[label]
            extra = ""
            if categories is not None:
                cat = categories[label]
                definition = cat["definition"].replace("|", "/")
                extra = f" `{cat['synset']}`: {definition} |"
            lines.append(f"| task-{t + 1:02d} | `{label}` |{extra} {c['train']} | {c['dev']} | "
                         f"{c['test']} |")
    return "\n".join(lines) + "\n"


def render_docs(out_dir: Path) -> str:
    typing_meta = json.loads((out_dir / "wordnet_typing.meta.json").read_text())
    rel_meta = json.loads((out_dir / "wordnet_relations.meta.json").read_text())
    fine_meta = json.loads((out_dir / "wordnet_fine.meta.json").read_text())

    def first_row(name: str, split: str = "test") -> str:
        with gzip.open(out_dir / name, "rt", encoding="ascii") as handle:
            for line in handle:
                row = json.loads(line)
                if row["split"] == split:
                    return json.dumps(row)
        return "{}"

    used = set(rel_meta["counts"])
    rel_lines = []
    for sym, (label, wn_name, meaning) in RELATIONS.items():
        rel_lines.append(f"| `{label}` | `{sym}` {wn_name} | {meaning} | "
                         f"{'yes' if label in used else 'dropped'} |")
    text = DOC_HEADER.format(
        source=SOURCE, cap_train=CAPS["train"], cap_dev=CAPS["dev"], cap_test=CAPS["test"],
        min_train=MINIMA["train"], min_dev=MINIMA["dev"], min_test=MINIMA["test"],
        cap_total=sum(CAPS.values()),
        typing_example=first_row("wordnet_typing.jsonl.gz"),
        relation_example=first_row("wordnet_relations.jsonl.gz"),
        relation_table="\n".join(rel_lines),
        typing_dropped=", ".join(f"`{c}`" for c in TYPING_CLASSES
                                 if c not in typing_meta["counts"]) or "none",
        fine_example=first_row("wordnet_fine.jsonl.gz"),
        fine_min_desc=fine_meta["rule"]["min_descendants"],
        fine_eligible=fine_meta["rule"]["eligible_synsets"],
        fine_labelled=fine_meta["rule"]["labelled_synsets"],
        fine_multi=fine_meta["rule"]["dropped_multi_category_synsets"],
        fine_candidates=fine_meta["rule"]["candidate_categories"],
        fine_cap_train=FINE_CAPS["train"], fine_cap_dev=FINE_CAPS["dev"],
        fine_cap_test=FINE_CAPS["test"], fine_min_train=FINE_MINIMA["train"],
        fine_min_dev=FINE_MINIMA["dev"], fine_min_test=FINE_MINIMA["test"],
        fine_dropped=", ".join(f"`{c}`" for c in fine_meta["dropped_categories"]) or "none",
        fine_n_classes=len(fine_meta["counts"]), fine_n_tasks=len(fine_meta["tasks"]),
    )
    text += "\n## Sizes and task sequences\n\n"
    text += ("Generated from the meta files (seed "
             f"{typing_meta['seed']}). Task names are those given by "
             "`conpet.data.benchmarks.load_benchmark` (`task-01`, `task-02`, ...), in "
             "sequence order.\n\n")
    text += "### Entity typing\n\n" + doc_tables(typing_meta)
    text += "\n### Relation classification\n\n" + doc_tables(rel_meta)
    text += ("\n### Fine-grained noun typing\n\n"
             + doc_tables(fine_meta, fine_meta["categories"]))
    return text


# --------------------------------------------------------------------------- #
def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wordnet-dir", type=Path, default=DEFAULT_WORDNET)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--license-file", type=Path, default=DEFAULT_LICENSE,
                        help="WordNet licence to copy to OUT/LICENSE-WordNet")
    parser.add_argument("--write-docs", action="store_true",
                        help="also (re)write the documentation page")
    parser.add_argument("--docs-path", type=Path, default=DEFAULT_DOCS)
    args = parser.parse_args(argv)

    if not (args.wordnet_dir / "data.noun").exists():
        parser.error(f"WordNet data files not found in {args.wordnet_dir} "
                     "(install the Debian package wordnet-base)")
    wn = WordNet(args.wordnet_dir)
    out: Path = args.out
    for name, (rows, meta) in (("wordnet_typing", build_typing(wn, args.seed)),
                               ("wordnet_relations", build_relations(wn, args.seed)),
                               ("wordnet_fine", build_fine(wn, args.seed))):
        atomic_write(out / f"{name}.jsonl.gz", gzip_bytes(jsonl_bytes(rows)))
        atomic_write(out / f"{name}.meta.json", meta_bytes(meta))
        totals = {s: sum(c[s] for c in meta["counts"].values()) for s in SPLITS}
        print(f"{name}: {len(rows)} rows {totals}, {len(meta['counts'])} classes, "
              f"{len(meta['tasks'])} tasks", file=sys.stderr)
    atomic_write(out / "LICENSE-WordNet", args.license_file.read_bytes())
    if args.write_docs:
        atomic_write(args.docs_path, render_docs(out).encode("utf-8"))
        print(f"wrote {args.docs_path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
