"""Conformance matrix of the PET methods (in the style of peft's tests/testing_common.py): every
method x a tiny encoder and a tiny decoder: one training step lowers the loss; save + load
reproduces the outputs exactly; the trainable-parameter count matches the method's formula; and
every method runs inside the learners (sequential, joint, Static and Dynamic ConPET)."""

from __future__ import annotations

import copy
import itertools
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conpet.backbone import cloze_features, load_backbone
from conpet.data.stream import Row
from conpet.errors import ConfigError
from conpet.inputs import collate, encode_rows
from conpet.pet import LayerScope, get_pet

METHODS = [
    ("lora", {}),
    ("lora", {"use_rslora": True}),
    ("lora", {"use_dora": True}),
    ("ia3", {}),
    ("ln_tuning", {}),
    ("adapter", {"bottleneck": 8}),
    ("adapter", {"bottleneck": 8, "placement": "pfeiffer"}),
    ("parallel_adapter", {"bottleneck": 8}),
    ("bitfit", {}),
    ("compacter", {"bottleneck": 8, "phm_dim": 4}),
    ("mola", {"r": 2, "experts": [2, 3]}),
    ("mos", {"r": 4, "valid_r": 3, "private_r": 1, "shards": 2}),
    ("sparse_ft", {"density": 0.1, "regrow_every": 1}),
    ("hft", {}),
    ("lisa", {"active_layers": 1, "interval": 1}),
    ("prompt_tuning", {"num_virtual_tokens": 4}),
    ("prefix_tuning", {"num_virtual_tokens": 4}),
    ("p_tuning", {"num_virtual_tokens": 4, "encoder_hidden_size": 16}),
    ("adalora", {"init_r": 4, "target_r": 2}),
    ("dept", {"prompt_length": 4, "r": 4, "max_length": 64}),
    ("corda", {"r": 2}),
    ("osf", {}),
]
IDS = [f"{m}-{o['placement']}" if o.get("placement") else "lora-rslora" if o.get("use_rslora")
       else "lora-dora" if o.get("use_dora") else m for m, o in METHODS]


@pytest.fixture(scope="module", params=["encoder", "decoder"])
def backbone_batch(request, tiny_encoder, tiny_decoder):
    folder = tiny_encoder if request.param == "encoder" else tiny_decoder
    bb = load_backbone(str(folder))
    rows = [Row(text=f"Yesterday we talked about the {w} for a while.", label="x", entity=w)
            for w in ["dog", "bread", "hammer", "city", "lion", "cake", "saw", "river"]]
    enc = encode_rows(rows, "typing", bb.tokenizer, bb.is_decoder, 64)
    return bb, collate(enc, list(range(len(rows))), bb.pad_id), torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])


def _fresh(bb):
    return copy.deepcopy(bb.model)


def _train_steps(pet, model, bb, batch, targets, steps: int, lr: float = 1e-2, weight_decay: float = 0.01) -> None:
    """``steps`` AdamW steps of module ``m`` the way the training loop runs them: the method's
    regulariser added to the loss, its step hook called after each step."""
    hook = pet.step_hook(model, "m", steps)
    model.train()
    head = nn.Linear(bb.hidden_size, 4)
    opt = torch.optim.AdamW(pet.parameters(model, "m"), lr=lr, weight_decay=weight_decay)
    for step in range(steps):
        loss = F.cross_entropy(head(cloze_features(model, batch)), targets)
        extra = pet.extra_loss(model, "m")
        if extra is not None:
            loss = loss + extra
        opt.zero_grad()
        loss.backward()
        opt.step()
        if hook is not None:
            hook(step)


def _block_linears(base: nn.Module) -> list[tuple[str, int, nn.Linear]]:
    """(path inside the block, layer index, layer) of every linear layer of the transformer blocks."""
    out = []
    for n, m in base.named_modules():
        hit = re.search(r"\.(\d+)\.(.+)$", n)
        if hit and isinstance(m, nn.Linear):
            out.append((hit.group(2), int(hit.group(1)), m))
    return out


def _hft_totals(sizes: list[list[int]]) -> set[int]:
    """HFT's possible counts for one category, ``sizes[l]`` = its matrices' sizes in block ``l``:
    ``n // 2`` matrices per block, an odd ``n`` giving ``ceil`` in ``L // 2`` of the blocks."""
    out = set()
    for ceil_blocks in itertools.combinations(range(len(sizes)), len(sizes) // 2):
        sums = {0}
        for layer, s in enumerate(sizes):
            k = len(s) // 2 + (len(s) % 2 if layer in ceil_blocks else 0)
            sums = {a + sum(pick) for a in sums for pick in itertools.combinations(s, k)}
        out |= sums
    return out


def _expected_count(method: str, base: nn.Module, options: dict) -> int | set[int]:
    """Independent formulas over the *unwrapped* backbone: its config, its block linears, the
    row's options and the method's documented defaults (written here, not read from the method).
    A set where the method draws at random among matrices of different sizes (HFT on Llama)."""
    names = [(n, m) for n, m in base.named_modules() if re.search(r"\.\d+\.", n)]
    linears = _block_linears(base)  # every method below that targets "every linear" means these
    llama = any(n.endswith("down_proj") for n, _ in names)
    c = base.config
    d, n_layers = c.hidden_size, c.num_hidden_layers
    if method in ("lora", "corda"):  # corda: the trainable half of its rank-2r storage
        r = options.get("r", 8)
        targets = ("q_proj", "v_proj") if llama else ("query", "value")
        magnitude = 1 if options.get("use_dora") else 0  # DoRA: one magnitude per output row
        return sum(r * (m.in_features + m.out_features) + magnitude * m.out_features
                   for n, m in names if n.split(".")[-1] in targets)
    if method == "ia3":
        targets, ff = (("k_proj", "v_proj", "down_proj"), ("down_proj",)) if llama else \
            (("key", "value", "output.dense"), ("output.dense",))
        return sum(m.in_features if any(n.endswith(f) for f in ff) else m.out_features
                   for n, m in names if isinstance(m, nn.Linear) and any(n.endswith(t) for t in targets))
    if method == "adalora":  # P (r x in), E (r), Q (out x r) on peft's default targets
        r = options.get("init_r", 12)
        targets = ("q_proj", "v_proj") if llama else ("query", "value")
        return sum(r * (m.in_features + m.out_features + 1) for n, m in names if n.split(".")[-1] in targets)
    if method == "ln_tuning":
        return sum(p.numel() for n, m in names if "norm" in type(m).__name__.lower() for p in m.parameters())
    if method == "adapter":
        # Houlsby: 2 adapters per layer (after the attention output and the FFN output projections),
        # Pfeiffer: the FFN one only; each d*b + b (down) + b*d + d (up); default b = 64
        b, per_layer = options.get("bottleneck", 64), 1 if options.get("placement") == "pfeiffer" else 2
        return n_layers * per_layer * (d * b + b + b * d + d)
    if method == "compacter":
        # Houlsby-placed (2 per layer) adapters of PHM layers: rank-1 fast weights s (in) and t (out)
        # + bias (out) per PHM layer, down d -> b and up b -> d; plus 2 sets (down, up) of the n slow
        # n x n weights shared by all adapters; defaults b = 32, n = 4
        b, n = options.get("bottleneck", 32), options.get("phm_dim", 4)
        return 2 * n ** 3 + n_layers * 2 * ((d + b + b) + (b + d + d))
    if method == "parallel_adapter":
        # He et al.: x -> b -> d beside the FFN (x of width d, the FFN's input); on BERT (named
        # deviation) beside the FFN output projection, whose input is the intermediate activation
        b = options.get("bottleneck", 64)
        d_in = d if llama else c.intermediate_size
        return n_layers * (d_in * b + b + b * d + d)
    if method == "bitfit":
        # one bias per output of every block linear (LayerNorm biases excluded: named deviation)
        return sum(m.out_features for _, _, m in linears)
    if method == "mola":
        # every block linear: E_l LoRA experts, r (in + out) each, + a bias-free router in x E_l;
        # the experts list (default [2, 4, 6, 8], r = 8) splits the layers, bottom up, in equal blocks
        r, experts = options.get("r", 8), options.get("experts", [2, 4, 6, 8])
        return sum(experts[i * len(experts) // n_layers] * (r * (m.in_features + m.out_features) + m.in_features)
                   for _, i, m in linears)
    if method == "mos":
        # the shard pools hold as much as a plain LoRA of rank valid_r (default 4) on every block linear
        return options.get("valid_r", 4) * sum(m.in_features + m.out_features for _, _, m in linears)
    if method == "sparse_ft":
        # round(density x out x in) entries (at least 1) per block linear; default density 0.01
        density = options.get("density", 0.01)
        return sum(max(1, round(density * m.weight.numel())) for _, _, m in linears)
    if method == "hft":
        # half of the block linears per block and category (attention / feed-forward), drawn at
        # random: the total is exact where a category's matrices share one size (BERT) and one of
        # a few values where they do not (Llama's grouped-query k_proj/v_proj are smaller than q/o)
        totals = {0}
        for attention in (True, False):
            sizes = [[m.weight.numel() for t, i, m in linears if i == layer and ("att" in t) == attention]
                     for layer in range(n_layers)]
            totals = {a + b for a in totals for b in _hft_totals(sizes)}
        return totals.pop() if len(totals) == 1 else totals
    if method == "lisa":
        # a full-size update of every block linear (LISA trains sampled layers, but each can be drawn)
        return sum(m.weight.numel() for _, _, m in linears)
    if method == "prompt_tuning":
        # num_virtual_tokens (default 20) embeddings of width d
        return options.get("num_virtual_tokens", 20) * d
    if method == "prefix_tuning":
        # a key and a value per virtual token (default 20) in every layer, of the key/value width
        # (head_dim x key/value heads: narrower than d with grouped-query attention); no MLP
        kv_heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
        return options.get("num_virtual_tokens", 20) * n_layers * 2 * (d // c.num_attention_heads * kv_heads)
    if method == "p_tuning":
        # virtual-token embeddings + peft's MLP prompt encoder d -> h -> h -> d (default h = 128)
        t, h = options.get("num_virtual_tokens", 20), options.get("encoder_hidden_size", 128)
        return t * d + (d * h + h) + (h * h + h) + (h * d + d)
    if method == "dept":
        # prompt P (m x d) + low-rank embedding update A (max_length x r) B (r x d);
        # defaults m = 60, r = 30, max_length = 256
        m, r, s = options.get("prompt_length", 60), options.get("r", 30), options.get("max_length", 256)
        return m * d + s * r + r * d
    if method == "osf":
        # every block linear (peft's Llama list is all 7 projections; BERT: all linear layers):
        # U (m x t), S (t), V (t x n) of the trainable rank t = min(m, n) - k, the preserved rank k
        # defaulting to peft's min(m, n) // 2
        total = 0
        for _, _, lin in linears:
            m, n = lin.weight.shape
            total += (m + n + 1) * (min(m, n) - options.get("effective_rank", min(m, n) // 2))
        return total
    raise AssertionError(method)


@pytest.mark.parametrize("method,options", METHODS, ids=IDS)
def test_one_step_lowers_the_loss(backbone_batch, method, options):
    bb, batch, targets = backbone_batch
    torch.manual_seed(0)
    pet = get_pet(method, options)
    model = pet.attach(_fresh(bb), "m")
    head = nn.Linear(bb.hidden_size, 4)
    params = [p for p in pet.parameters(model, "m") if p.requires_grad]  # LISA: the sampled layers
    assert params
    head.requires_grad_(False)
    model.eval()  # no dropout: the same function before and after the step
    losses = []
    for _ in range(2):  # one small normalised gradient step: first order, the loss must go down
        loss = F.cross_entropy(head(cloze_features(model, batch)), targets)
        losses.append(float(loss.detach()))
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        norm = torch.sqrt(sum((g ** 2).sum() for g in grads if g is not None))
        assert norm > 0
        # a small step along -g; large enough that the first-order decrease (step x norm) shows in
        # fp32 even when the gradient is tiny (AdaLoRA starts with E = 0)
        step = max(1e-3, 1e-4 / float(norm))
        with torch.no_grad():
            for p, g in zip(params, grads):
                if g is not None:
                    p.sub_(step * g / norm)
    assert losses[1] < losses[0]
    base_params = [p for n, p in model.named_parameters() if not any(p is q for q in params)]
    assert all(not p.requires_grad for p in base_params), "the backbone stays frozen"


@pytest.mark.parametrize("method,options", METHODS, ids=IDS)
def test_save_load_reproduces_outputs_exactly(backbone_batch, method, options, tmp_path):
    bb, batch, _ = backbone_batch
    torch.manual_seed(0)
    pet = get_pet(method, options)
    model = pet.attach(_fresh(bb), "m")
    with torch.no_grad():  # move every tensor away from its initial value
        for p in pet.parameters(model, "m"):
            p.add_(torch.randn_like(p) * 0.05)
    model.eval()
    with torch.no_grad():
        before = cloze_features(model, batch)
    pet.save(model, "m", tmp_path)
    loaded = get_pet(method, options).attach_from(_fresh(bb), tmp_path, "m")
    loaded.eval()
    with torch.no_grad():
        after = cloze_features(loaded, batch)
    assert torch.equal(before, after)
    with torch.no_grad():
        plain = cloze_features(bb.model, batch)
    assert not torch.equal(before, plain), "the module changes the output"


@pytest.mark.parametrize("method,options", METHODS, ids=IDS)
def test_trainable_count_matches_the_formula(backbone_batch, method, options):
    bb, _, _ = backbone_batch
    pet = get_pet(method, options)
    base = _fresh(bb)
    expected = _expected_count(method, base, options)  # from the unwrapped backbone, before attaching
    model = pet.attach(base, "m")
    if isinstance(expected, set):  # HFT on Llama: which half trains is random (see _expected_count)
        assert pet.count(model, "m") in expected and min(expected) > 0
    else:
        assert pet.count(model, "m") == expected > 0


@pytest.mark.parametrize("method,options", METHODS, ids=IDS)
def test_two_named_modules_are_independent_and_detach_restores_the_backbone(backbone_batch, method, options):
    bb, batch, _ = backbone_batch
    pet = get_pet(method, options)
    base = _fresh(bb)
    with torch.no_grad():
        plain = cloze_features(base, batch)
    model = pet.attach(base, "a")
    pet.add(model, "b")
    with torch.no_grad():
        for p in pet.parameters(model, "a"):
            p.add_(0.05)
    model.eval()
    pet.activate(model, "b")
    with torch.no_grad():
        out_b = cloze_features(model, batch)
    pet.activate(model, "a")
    with torch.no_grad():
        out_a = cloze_features(model, batch)
    assert not torch.equal(out_a, out_b)
    restored = pet.detach(model)
    with torch.no_grad():
        assert torch.equal(cloze_features(restored, batch), plain)


LEARNERS = ["sequential", "joint", "emr*", "lwf", "dynamic[top_k=2]"]


@pytest.mark.parametrize("method,options", METHODS, ids=IDS)
def test_every_method_runs_inside_every_learner(method, options, tiny_encoder, typing_data, tmp_path):
    from conpet.cli import main

    pet_options = [f"--set=pet.options.{k}={v}" for k, v in options.items()]
    args = ["run", "--model", str(tiny_encoder), "--data", str(typing_data[0]), "--tasks", str(typing_data[1]),
            "--pet", method, "--epochs", "1", "--batch-size", "4", "--no-progress", *pet_options,
            "--learner", ",".join(LEARNERS), "--out", str(tmp_path / "cmp")]
    assert main(args) == 0
    for spec in ["sequential", "joint", "emr-star", "lwf", "dynamic-top_k=2"]:
        assert (tmp_path / "cmp" / spec / "metrics.json").is_file()
    # the saved modules load back for prediction (a dynamic run: every expert and the selector)
    assert main(["predict", str(tmp_path / "cmp" / "dynamic-top_k=2"), "We saw the wolf.", "--entity", "wolf"]) == 0


def test_sparse_ft_keeps_its_density_through_regrowth(backbone_batch):
    bb, batch, targets = backbone_batch
    pet = get_pet("sparse_ft", {"density": 0.1, "regrow_every": 1, "regrow_fraction": 0.5})
    model = pet.attach(_fresh(bb), "m")
    before = {p: site.parts["m"].mask.clone() for p, site in model.sites.items()}
    _train_steps(pet, model, bb, batch, targets, steps=2)
    for path, site in model.sites.items():
        part = site.parts["m"]
        assert int(part.mask.sum()) == int(before[path].sum())  # density kept
        assert not torch.equal(part.mask, before[path])  # entries were pruned and regrown
    assert pet.count(model, "m") == pet.expected_count(model)
    model.eval()
    with torch.no_grad():
        out = cloze_features(model, batch)
        for site in model.sites.values():  # entries outside the mask have no effect
            part = site.parts["m"]
            part.delta.add_(torch.randn_like(part.delta) * (~part.mask))
        assert torch.equal(out, cloze_features(model, batch))


def test_prompt_methods_refuse_a_lower_layer_cache_and_auto_turns_it_off(tiny_decoder, typing_data, tmp_path, capsys):
    from conpet.cli import main

    base = ["run", "--model", str(tiny_decoder), "--data", str(typing_data[0]), "--tasks", str(typing_data[1]),
            "--pet", "prompt_tuning", "--epochs", "1", "--batch-size", "4", "--no-progress"]
    assert main([*base, "--set", "train.top_layers=1", "--out", str(tmp_path / "a")]) == 2
    assert "needs train.top_layers: null" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()
    assert main([*base, "--out", str(tmp_path / "b")]) == 0  # auto: the whole forward pass


def test_dept_trains_prompt_and_low_rank_at_their_own_rates(backbone_batch):
    bb, _, _ = backbone_batch
    pet = get_pet("dept", {"prompt_length": 3, "r": 2, "max_length": 64, "prompt_lr": 0.5, "lowrank_lr": 0.01})
    model = pet.attach(_fresh(bb), "m")
    groups = pet.param_groups(model, "m", lr=1e-3)
    assert [g["lr"] for g in groups] == [0.5, 0.01]
    assert [tuple(p.shape) for p in groups[0]["params"]] == [(3, bb.hidden_size)]
    assert sorted(tuple(p.shape) for p in groups[1]["params"]) == [(2, bb.hidden_size), (64, 2)]
    b = [p for p in groups[1]["params"] if p.shape[0] == 2][0]
    assert torch.count_nonzero(b) == 0, "B starts at zero: the module starts as plain prompt tuning"


def test_adalora_prunes_towards_its_target_rank_and_adds_the_orthogonality_penalty(backbone_batch):
    bb, batch, targets = backbone_batch
    torch.manual_seed(0)
    pet = get_pet("adalora", {"init_r": 4, "target_r": 1, "tinit": 1, "tfinal": 1, "deltaT": 1})
    model = pet.attach(_fresh(bb), "m")
    assert pet.extra_loss(model, "m") is not None
    _train_steps(pet, model, bb, batch, targets, steps=8)
    e = [p for n, p in model.named_parameters() if "lora_E" in n]
    kept = sum(int(torch.count_nonzero(x)) for x in e)
    assert 0 < kept <= len(e) * 1 + 1, f"about target_r=1 of init_r=4 ranks kept per matrix, got {kept} of {4 * len(e)}"


def test_adalora_penalty_is_computed_on_the_modules_device(backbone_batch):
    """The orthogonality penalty builds its identity on P's and Q's device (a CPU identity against
    CUDA tensors raised on every AdaLoRA step). The meta device stands in for a GPU here."""
    bb, _, _ = backbone_batch
    pet = get_pet("adalora", {"init_r": 4, "target_r": 2})
    model = pet.attach(_fresh(bb), "m").to("meta")
    penalty = pet.extra_loss(model, "m")
    assert penalty.device.type == "meta" and penalty.shape == ()


def test_corda_starts_from_the_context_decomposition_without_changing_the_backbone(backbone_batch):
    """At initialisation: the output is the backbone's (dW = 0), the backbone's weights are
    untouched, and the trainable half equals the top-r components of W C (C the covariance of
    the layer's inputs on the calibration rows, V multiplied by C^-1), recomputed here by hand.
    After training steps the frozen half is unchanged and the trainable half has moved."""
    bb, batch, targets = backbone_batch
    torch.manual_seed(0)
    base = _fresh(bb)
    weights_before = {n: p.clone() for n, p in base.named_parameters()}
    with torch.no_grad():
        plain = cloze_features(base, batch)
    r = 2
    pet = get_pet("corda", {"r": r})
    inputs = {}

    def calibration(model, max_rows):
        cloze_features(model, batch)

    model = pet.attach(base, "m", calibration)
    model.eval()
    with torch.no_grad():
        assert torch.allclose(cloze_features(model, batch), plain, atol=1e-5)
    for n, p in model.get_base_model().named_parameters():
        if "lora_" not in n:
            assert torch.equal(p, weights_before[n.replace(".base_layer", "")]), n
    from peft.tuners.lora import LoraLayer

    layer = next(m for m in model.modules() if isinstance(m, LoraLayer))
    lin = layer.get_base_layer()
    # the layer's input on the calibration batch, by hand
    handle = lin.register_forward_hook(lambda m, a, o: inputs.setdefault("x", a[0].detach().float()))
    with torch.no_grad(), model.disable_adapter():
        cloze_features(model, batch)
    handle.remove()
    x = inputs["x"].reshape(-1, inputs["x"].shape[-1])
    x = x / x.abs().max()
    cov = x.T @ x
    damp = 0.01
    while True:
        fixed = cov + torch.eye(cov.shape[0]) * torch.diag(cov).mean() * damp
        inv = torch.linalg.inv(fixed)
        if torch.dist(fixed @ inv, torch.eye(cov.shape[0])) < 0.05:
            break
        damp *= 2
    u, s_, vh = torch.linalg.svd(lin.weight.float() @ fixed, full_matrices=False)
    expected = u[:, :r] @ torch.diag(s_[:r]) @ (vh @ inv)[:r]
    a, b = layer.lora_A["m"].weight, layer.lora_B["m"].weight
    got = layer.scaling["m"] * b[:, :r] @ a[:r]
    assert torch.allclose(got, expected, rtol=1e-3, atol=1e-4 * expected.abs().max())
    frozen_a, frozen_b = a[r:].detach().clone(), b[:, r:].detach().clone()
    trainable_a = a[:r].detach().clone()
    _train_steps(pet, model, bb, batch, targets, steps=3, weight_decay=0.1)
    assert torch.equal(a[r:], frozen_a) and torch.equal(b[:, r:], frozen_b)
    assert not torch.equal(a[:r], trainable_a)


NOT_WEIGHT_UPDATES = {"adapter", "parallel_adapter", "compacter", "bitfit", "mola", "prompt_tuning", "prefix_tuning",
                      "p_tuning", "dept"}


@pytest.mark.parametrize("method,options", METHODS, ids=IDS)
def test_delta_weights_added_to_the_backbone_give_the_modules_function(backbone_batch, method, options):
    """Where a method is an update of the backbone's own weights, W + dW on a plain copy of the
    backbone computes what the wrapped model computes; the others say None."""
    bb, batch, _ = backbone_batch
    torch.manual_seed(0)
    pet = get_pet(method, options)
    model = pet.attach(_fresh(bb), "m")
    with torch.no_grad():
        for p in pet.parameters(model, "m"):
            p.add_(torch.randn_like(p) * 0.05)
    deltas = pet.delta_weights(model, "m")
    if method in NOT_WEIGHT_UPDATES or options.get("use_dora"):  # DoRA renormalises: not additive
        assert deltas is None
        return
    assert deltas
    merged = _fresh(bb)
    params = dict(merged.named_parameters())
    with torch.no_grad():
        for key, delta in deltas.items():
            params[key].add_(delta)
    model.eval()
    merged.eval()
    with torch.no_grad():
        expected, got = cloze_features(model, batch), cloze_features(merged, batch)
    assert not torch.allclose(expected, cloze_features(bb.model, batch), atol=1e-4)
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method,options", METHODS, ids=IDS)
def test_confined_to_the_top_layers_every_trainable_tensor_is_there(backbone_batch, method, options):
    """What train.top_layers relies on: with the engine's layer options a method trains nothing
    below the split (the lower layers' outputs are cached without PET)."""
    from conpet.engine import find_layers
    from conpet.pet import get_pet_class

    bb, batch, _ = backbone_batch
    if get_pet_class(method).input_level:
        pytest.skip("input-level methods refuse train.top_layers (tested above)")
    _, attr, layers = find_layers(bb.model)
    top = len(layers) - 1
    if method == "mos":  # one PET layer: the shared region must hold r - private_r vectors
        options = {**options, "valid_r": 4}
    pet = get_pet(method, options, scope=LayerScope((top,), attr, len(layers)))
    model = pet.attach(_fresh(bb), "m")
    names = [n for n, p in model.named_parameters() if any(p is q for q in pet.parameters(model, "m"))]
    assert names
    names += ["." + p for p in getattr(model, "sites", {})]  # MoS trains global pools only: its sites are where it acts
    for n in names:
        found = re.search(rf"\.{attr}\.(\d+)\.", n)
        assert found is None or int(found.group(1)) == top, n
    assert any(re.search(rf"\.{attr}\.{top}\.", n) for n in names)


def test_prefix_tuning_starts_from_real_tokens_keys_and_values(backbone_batch):
    """Li & Liang's initialisation with real words' activations: the prefix holds the frozen
    backbone's keys and values of the first tokens of the calibration rows. On a decoder that is
    exactly those tokens in context: the prefixed model on a row gives the backbone's features of
    the same row written after them."""
    bb, batch, _ = backbone_batch
    n = 4
    base = _fresh(bb)
    first = batch["input_ids"][0][batch["attention_mask"][0].bool()][:n]
    pet = get_pet("prefix_tuning", {"num_virtual_tokens": n})

    def calibration(model, max_rows):
        cloze_features(model, {k: v[:1] for k, v in batch.items()})

    model = pet.attach(base, "m", calibration)
    model.eval()
    random_pet = get_pet("prefix_tuning", {"num_virtual_tokens": n, "init": "random"})
    random_model = random_pet.attach(_fresh(bb), "m", calibration)
    assert not torch.allclose(model.prompt_encoder["m"].embedding.weight,
                              random_model.prompt_encoder["m"].embedding.weight)
    if not bb.is_decoder:  # bidirectional attention: the prefix tokens did not see the row
        return
    row = batch["input_ids"][1][batch["attention_mask"][1].bool()]
    with torch.no_grad():
        prefixed = cloze_features(model, {"input_ids": row[None], "attention_mask": torch.ones(1, len(row), dtype=torch.long),
                                          "cloze_pos": batch["cloze_pos"][1:2]})
        joined = torch.cat([first, row])[None]
        in_context = cloze_features(base.eval(), {"input_ids": joined, "attention_mask": torch.ones_like(joined),
                                                  "cloze_pos": batch["cloze_pos"][1:2] + n})
    assert torch.allclose(prefixed, in_context, atol=1e-4), (prefixed - in_context).abs().max()


def test_prefix_tuning_init_option_is_checked():
    with pytest.raises(ConfigError, match="real_tokens"):
        get_pet("prefix_tuning", {"init": "zeros"})


@pytest.mark.parametrize("method, kind", [("sparse_ft", "indices"), ("hft", "dense")])
def test_an_update_is_saved_as_coo_or_as_the_matrix_whichever_is_smaller(backbone_batch, method, kind, tmp_path):
    """SpIEL's 1% update costs its non-zeros (int32 index + value); HFT's whole matrices cost
    their plain size, not the 3x of COO."""
    from safetensors.torch import load_file

    bb, _, _ = backbone_batch
    pet = get_pet(method, {})
    model = pet.attach(_fresh(bb), "m")
    with torch.no_grad():
        for p in pet.parameters(model, "m"):
            p.add_(torch.randn_like(p) * 0.05)
    pet.save(model, "m", tmp_path)
    saved = load_file(str(tmp_path / "pet_model.safetensors"))
    kinds = {k.rsplit("::", 1)[1] for k in saved}
    assert kind in kinds and ("dense" in kinds) == (kind == "dense")
    stored = sum(t.numel() * t.element_size() for t in saved.values())
    touched = sum(int((s.parts["m"].weight() != 0).sum()) for s in model.sites.values() if "m" in s.parts)
    entries = sum(s.parts["m"].weight().numel() for s in model.sites.values() if "m" in s.parts)
    assert stored <= min(8 * touched, 4 * entries)  # never more than the cheaper of the two layouts


def test_wrapping_with_peft_does_not_pass_on_its_transformers_deprecation_warning(backbone_batch, tmp_path):
    import warnings

    bb, _, _ = backbone_batch
    pet = get_pet("lora", {"r": 2})
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        model = pet.attach(_fresh(bb), "m")
        pet.save(model, "m", tmp_path)
        get_pet("lora", {"r": 2}).attach_from(_fresh(bb), tmp_path, "m")
        _ = _fresh(bb).is_gradient_checkpointing  # the user's own call still warns
    deprecations = [w for w in seen if "is_gradient_checkpointing" in str(w.message)]
    # transformers deprecates the name from the release that adds is_activation_checkpointing (5.2x);
    # before it (5.17 and older) nothing warns, and wrapping must still add no warning
    from transformers import PreTrainedModel

    deprecated = hasattr(PreTrainedModel, "is_activation_checkpointing")
    assert len(deprecations) == int(deprecated)  # the user's own; wrapping added none
