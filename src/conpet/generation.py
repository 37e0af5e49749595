"""Generative tasks: the language-model loss on target tokens, greedy decoding with a KV cache,
and perplexity on a reference text.

- :func:`lm_loss`: mean cross-entropy of the next-token predictions at the **target** positions
  of each row (prompt tokens are context only, never counted); the hidden states come from the
  feature engine, so frozen lower layers are cached as for classification;
- :func:`greedy_generate`: batched greedy decoding (left-padded prompts, one forward pass per new
  token over the KV cache), stopping at the end-of-sequence token or after ``max_new_tokens``;
  the same tokens as Hugging Face ``generate(do_sample=False)`` with the same adapter (tested);
  methods that prepend virtual tokens decode without the cache (``kv_cache=False``);
- :func:`perplexity`: of the backbone with its active module on a fixed text, the retention of
  general ability reported after every task.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from conpet import distributed
from conpet.backbone import last_hidden, token_states
from conpet.device import Compute
from conpet.engine import FeatureEngine
from conpet.families import cache_argument
from conpet.inputs import right_padded


def target_positions(engine: FeatureEngine, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(batch row, position, next token) of every target token of rows ``indices``: the hidden
    state at ``position`` predicts ``next token`` (the first from the prompt's last position)."""
    enc = engine.encoded
    rows, pos, nxt = [], [], []
    for r, i in enumerate(indices):
        ids, start = enc.ids[i], enc.target_start[i]
        rows.extend([r] * (len(ids) - start))
        pos.extend(range(start - 1, len(ids) - 1))
        nxt.extend(ids[start:])
    device = engine.device
    return (torch.tensor(rows, device=device), torch.tensor(pos, device=device), torch.tensor(nxt, device=device))


def target_tokens(engine: FeatureEngine, indices: Sequence[int]) -> torch.Tensor:
    """The target tokens of rows ``indices`` in :func:`target_positions` order (what the logits predict)."""
    enc = engine.encoded
    return torch.tensor([tok for i in indices for tok in enc.ids[i][enc.target_start[i]:]], device=engine.device)


def lm_loss(engine: FeatureEngine, model: nn.Module, lm_head: nn.Module, indices: Sequence[int],
            **forward_kwargs) -> torch.Tensor:
    """Mean next-token cross-entropy over the target tokens of the batch (prompt masked)."""
    return F.cross_entropy(token_logits(engine, model, lm_head, indices, **forward_kwargs),
                           target_tokens(engine, indices))


def token_logits(engine: FeatureEngine, model: nn.Module, lm_head: nn.Module, indices: Sequence[int],
                 **forward_kwargs) -> torch.Tensor:
    """Next-token logits [target tokens of the batch, vocabulary], in :func:`target_positions` order."""
    states = engine.states(model, list(indices), **forward_kwargs)
    rows, pos, _ = target_positions(engine, indices)
    return lm_head(states[rows, pos]).float()


def _next_tokens(logits: torch.Tensor, ensemble: int) -> torch.Tensor:
    """Greedy tokens from next-token logits [rows, vocabulary]; with ``ensemble`` k > 1 the rows are
    k copies of the prompts and each prompt takes the argmax of the copies' element-wise max
    probability (the same token for every copy)."""
    if ensemble == 1:
        return logits.argmax(dim=-1)
    probs = logits.softmax(dim=-1).view(ensemble, logits.shape[0] // ensemble, -1).amax(dim=0)
    return probs.argmax(dim=-1).repeat(ensemble)


@torch.no_grad()
def greedy_generate(model: nn.Module, lm_head: nn.Module, prompts: Sequence[Sequence[int]], pad_id: int,
                    eos_ids: Sequence[int], max_new_tokens: int, compute: Compute, ensemble: int = 1,
                    kv_cache: bool = True, **forward_kwargs) -> list[list[int]]:
    """Greedy continuations of ``prompts`` (token lists), each without its end-of-sequence token.

    ``forward_kwargs`` go to every forward pass (peft's ``adapter_names`` routes each row through
    its own module). ``ensemble`` k > 1: the prompts run k times in one batch (copy c is rows
    ``c n .. (c + 1) n - 1``, routed by ``adapter_names``) and each step's token is the argmax of
    the element-wise maximum of the copies' next-token probabilities (LAE's ensemble).

    ``kv_cache=False`` recomputes the whole right-padded sequence at every step, for methods that
    prepend virtual tokens or keys at every forward pass (prompt and prefix tuning, P-tuning,
    DePT: :attr:`conpet.pet.base.PETMethod.input_level`): over a cache they would be prepended
    again at each new token. Each row then keeps its natural positions, so a batch gives the
    tokens each prompt gives alone."""
    prompts = list(prompts) * ensemble
    if not kv_cache:
        return _generate_without_cache(model, lm_head, prompts, pad_id, eos_ids, max_new_tokens, compute,
                                       ensemble, **forward_kwargs)
    from transformers import DynamicCache

    device = compute.device
    n, width = len(prompts), max(len(p) for p in prompts)
    ids = torch.full((n, width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((n, width), dtype=torch.long, device=device)
    for r, p in enumerate(prompts):  # left padding: every prompt ends at the last column
        ids[r, width - len(p):] = torch.tensor(list(p), dtype=torch.long, device=device)
        mask[r, width - len(p):] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache_key = cache_argument(model)
    cache = DynamicCache()
    eos = torch.tensor(sorted(set(eos_ids)), device=device)
    done = torch.zeros(n, dtype=torch.bool, device=device)
    out: list[list[int]] = [[] for _ in range(n)]
    step_ids, step_pos = ids, positions
    with compute.autocast():  # one region for every step: autocast's cast cache lives across steps
        for _ in range(max_new_tokens):
            hidden = last_hidden(model(input_ids=step_ids, attention_mask=mask, position_ids=step_pos,
                                       use_cache=True, **{cache_key: cache}, **forward_kwargs))
            token = _next_tokens(lm_head(hidden[:, -1]).float(), ensemble)
            finished = torch.isin(token, eos)
            for r in (~done & ~finished).nonzero().flatten().tolist():
                out[r].append(int(token[r]))
            done |= finished
            if distributed.all_true(bool(done.all()), device):
                break
            step_ids = torch.where(done, torch.full_like(token, pad_id), token)[:, None]
            step_pos = step_pos[:, -1:] + 1
            mask = torch.cat([mask, torch.ones((n, 1), dtype=mask.dtype, device=device)], dim=1)
    return out[: n // ensemble]


def _generate_without_cache(model: nn.Module, lm_head: nn.Module, prompts: list[Sequence[int]], pad_id: int,
                            eos_ids: Sequence[int], max_new_tokens: int, compute: Compute, ensemble: int,
                            **forward_kwargs) -> list[list[int]]:
    """:func:`greedy_generate` with one full forward pass per new token (``kv_cache=False``)."""
    n = len(prompts)
    seqs = [list(p) for p in prompts]
    eos = set(eos_ids)
    done = [False] * n
    out: list[list[int]] = [[] for _ in range(n)]
    with compute.autocast():
        for _ in range(max_new_tokens):
            ids, mask = right_padded(seqs, pad_id, compute.device)
            hidden = token_states(last_hidden(model(input_ids=ids, attention_mask=mask, **forward_kwargs)), ids.shape[1])
            last = torch.tensor([len(s) - 1 for s in seqs], device=hidden.device)
            token = _next_tokens(lm_head(hidden[torch.arange(n, device=hidden.device), last]).float(), ensemble)
            for r, tok in enumerate(token.tolist()):
                if done[r]:
                    continue
                if tok in eos:
                    done[r] = True
                else:
                    out[r].append(tok)
                    seqs[r].append(tok)
            if distributed.all_true(all(done), compute.device):
                break
    return out[: n // ensemble]


@torch.no_grad()
def perplexity(model: nn.Module, lm_head: nn.Module, chunks: Sequence[Sequence[int]], compute: Compute,
               batch_size: int = 8) -> float:
    """exp(mean next-token negative log-likelihood) over every token of ``chunks`` (token lists,
    each predicted from its own start). Under a prompt method the virtual tokens it prepends are
    context, never scored."""
    total, count = 0.0, 0
    device = compute.device
    for start in range(0, len(chunks), batch_size):
        batch = [list(c) for c in chunks[start:start + batch_size] if len(c) > 1]
        if not batch:
            continue
        ids, mask = right_padded(batch, 0, device)
        with compute.autocast():
            hidden = token_states(last_hidden(model(input_ids=ids, attention_mask=mask)), ids.shape[1])
        keep = mask[:, 1:].bool()
        states, targets = hidden[:, :-1][keep], ids[:, 1:][keep]
        total += scored_nll(lm_head, states, targets, compute)
        count += len(targets)
    return math.exp(total / max(1, count))


LOGIT_TOKENS = 1024
"""Most tokens whose vocabulary-wide logits exist at once when scoring text: a batch of 64 chunks
of 128 tokens would otherwise hold 64 x 127 x 49k fp32 logits (1.6 GB for SmolLM2) plus as much
again inside the cross-entropy."""


def scored_nll(lm_head: nn.Module, states: torch.Tensor, targets: torch.Tensor, compute: Compute) -> float:
    """Sum of the next-token negative log-likelihoods of ``targets`` [tokens] from their hidden
    ``states`` [tokens, hidden], the logits made :data:`LOGIT_TOKENS` tokens at a time."""
    total = 0.0
    for s in range(0, len(targets), LOGIT_TOKENS):
        with compute.autocast():
            logits = lm_head(states[s:s + LOGIT_TOKENS]).float()
        total += float(F.cross_entropy(logits, targets[s:s + LOGIT_TOKENS], reduction="sum"))
    return total
