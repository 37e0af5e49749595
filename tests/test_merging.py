"""Merging per-task updates (conpet.merging) and ComPEFT compression (conpet.compress)."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from conpet.compress import (
    compress_state,
    compress_tensor,
    decompress,
    decompress_state,
    load_compressed,
    save_compressed,
)
from conpet.errors import ConfigError
from conpet.merging import (
    MERGE_METHODS,
    breadcrumbs,
    dare,
    get_merge_method,
    linear,
    magnitude_prune,
    merge_state,
    task_arithmetic,
    ties,
)
from conpet.adapters import lora_delta, to_lora


def T(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- registry


def test_registry_lists_every_method_with_its_paper_and_defaults():
    assert set(MERGE_METHODS) >= {
        "linear", "task_arithmetic", "ties", "dare", "breadcrumbs", "magnitude_prune"
    }
    for name, method in MERGE_METHODS.items():
        assert method.name == name
        assert "arXiv" in method.paper and "20" in method.paper
        assert callable(method.fn)
    # defaults from the reference notes
    assert get_merge_method("ties").defaults["density"] == 0.2
    assert get_merge_method("dare").defaults["drop_rate"] == 0.1
    crumbs = get_merge_method("breadcrumbs").defaults
    assert (crumbs["drop_top"], 1 - crumbs["drop_top"] - crumbs["drop_bottom"]) == pytest.approx(
        (0.006, 0.15)
    )
    assert crumbs["scaling"] == 0.2


def test_unknown_method_or_option_is_a_config_error_naming_the_choices():
    with pytest.raises(ConfigError, match="unknown merge method 'tie'.*breadcrumbs.*ties"):
        get_merge_method("tie")
    with pytest.raises(ConfigError, match="no option 'k'.*density"):
        merge_state([{"w": T(1.0)}], "ties", k=0.2)


# ----------------------------------------------------------------------------- linear / TA


def test_linear_of_identical_deltas_is_the_delta_and_weights_give_a_weighted_mean():
    a, b = rand(4, 3, seed=1), rand(4, 3, seed=2)
    torch.testing.assert_close(linear([a, a, a]), a)
    torch.testing.assert_close(linear([a, b], weights=[3, 1]), (3 * a + b) / 4)
    torch.testing.assert_close(linear([a, b], weights=[3, 1], normalize=False), 3 * a + b)


def test_task_arithmetic_is_scaled_sum():
    a, b = rand(5, seed=1), rand(5, seed=2)
    torch.testing.assert_close(task_arithmetic([a, b]), a + b)
    torch.testing.assert_close(task_arithmetic([a, b], scaling=0.3), 0.3 * (a + b))


def test_low_precision_inputs_keep_their_dtype():
    a = rand(6, seed=1).to(torch.bfloat16)
    for name in MERGE_METHODS:
        assert get_merge_method(name)([a, a]).dtype == torch.bfloat16


# ----------------------------------------------------------------------------- TIES


def test_ties_trims_elects_sign_by_mass_and_takes_disjoint_mean():
    t1 = T(4, -1, 2, 0.5, -3, 1)  # keeps 4, 2, -3
    t2 = T(-2, 5, 1, -0.5, -1, 3)  # keeps -2, 5, 3
    t3 = T(3, -2, -6, 0.2, 2.5, -1)  # keeps 3, -6, 2.5
    merged = ties([t1, t2, t3], density=0.5)
    # entry 0: sum 4-2+3 > 0 -> mean of agreeing (4, 3); the -2 is left out
    # entry 1: only 5 survives trimming; entry 2: 2-6 < 0 -> -6 alone
    # entry 3: everything trimmed; entry 4: mass -3+2.5 < 0 -> -3 (one vs one, mass decides)
    torch.testing.assert_close(merged, T(3.5, 5, -6, 0, -3, 3))
    torch.testing.assert_close(ties([t1, t2, t3], density=0.5, scaling=2.0), 2 * merged)


def test_ties_zero_mass_takes_the_majority_sign():
    merged = ties([T(1, 2, 1), T(-1, 1, 3)], density=1.0)
    # entry 0: 1 - 1 = 0 -> majority of elected signs (+, +) is + -> mean of {1}
    torch.testing.assert_close(merged, T(1, 1.5, 2))


def test_ties_in_merge_state_trims_over_the_whole_update_unless_told_per_tensor():
    update = {"a": T(10, 9), "b": T(0.1, 0.2)}
    global_trim = merge_state([update], "ties", density=0.5)
    torch.testing.assert_close(global_trim["a"], T(10, 9))
    torch.testing.assert_close(global_trim["b"], T(0, 0))
    per_tensor = merge_state([update], "ties", density=0.5, trim_scope="tensor")
    torch.testing.assert_close(per_tensor["a"], T(10, 0))
    torch.testing.assert_close(per_tensor["b"], T(0, 0.2))


def test_magnitude_prune_keeps_top_density_then_sums_without_sign_election():
    merged = magnitude_prune([T(4, -1, 2, 0.5), T(-3, 1, 0.1, 2)], density=0.5)
    torch.testing.assert_close(merged, T(1, 0, 2, 2))
    mean = magnitude_prune([T(4, -1, 2, 0.5), T(-3, 1, 0.1, 2)], density=0.5, combine="mean")
    torch.testing.assert_close(mean, T(0.5, 0, 1, 1))


# ----------------------------------------------------------------------------- DARE


def test_dare_with_no_drop_is_the_input():
    a, b = rand(7, 3, seed=1), rand(7, 3, seed=2)
    torch.testing.assert_close(dare([a], drop_rate=0.0), a)
    torch.testing.assert_close(dare([a, b], drop_rate=0.0, combine="mean"), (a + b) / 2)


def test_dare_drops_and_rescales_so_the_expectation_is_the_input():
    x = rand(64, seed=3)
    p = 0.5
    draws = torch.stack([dare([x], drop_rate=p, seed=s) for s in range(2000)])
    kept = draws != 0
    assert kept.float().mean().item() == pytest.approx(1 - p, abs=0.02)
    # every survivor is rescaled by 1 / (1 - p)
    torch.testing.assert_close(draws[kept], (x / (1 - p)).expand_as(draws)[kept])
    torch.testing.assert_close(draws.mean(dim=0), x, atol=0.15, rtol=0)


def test_dare_is_deterministic_under_a_seed():
    a, b = rand(50, seed=1), rand(50, seed=2)
    assert torch.equal(dare([a, b], drop_rate=0.9, seed=7), dare([a, b], drop_rate=0.9, seed=7))
    assert not torch.equal(dare([a, b], drop_rate=0.9, seed=7), dare([a, b], drop_rate=0.9, seed=8))
    states = [{"u": a, "v": b}, {"u": b, "v": a}]
    first = merge_state(states, "dare", drop_rate=0.5, seed=3)
    again = merge_state(states, "dare", drop_rate=0.5, seed=3)
    assert all(torch.equal(first[k], again[k]) for k in first)


# ----------------------------------------------------------------------------- Breadcrumbs


def test_breadcrumbs_masks_the_largest_outliers_and_the_smallest_entries():
    t = T(0.1, -5, 0.3, 2, -0.2, 1, 10, -0.4, 0.5, 3)
    # drop_top 0.2 -> 10 and -5; drop_bottom 0.3 -> 0.1, -0.2, 0.3
    expected = T(0, 0, 0, 2, 0, 1, 0, -0.4, 0.5, 3)
    torch.testing.assert_close(breadcrumbs([t], drop_top=0.2, drop_bottom=0.3, scaling=1.0), expected)
    # per layer, not per row: the same entries go in a 2 x 5 layer
    layer = breadcrumbs([t.reshape(2, 5)], drop_top=0.2, drop_bottom=0.3, scaling=1.0)
    torch.testing.assert_close(layer, expected.reshape(2, 5))
    # masked updates are summed and scaled
    two = breadcrumbs([t, t], drop_top=0.2, drop_bottom=0.3, scaling=0.5)
    torch.testing.assert_close(two, expected)


def test_breadcrumbs_rejects_fractions_that_drop_more_than_everything():
    with pytest.raises(ConfigError, match="drop_top \\+ drop_bottom"):
        breadcrumbs([T(1, 2)], drop_top=0.6, drop_bottom=0.6)


# ----------------------------------------------------------------------------- merge_state


def test_merge_state_merges_tensor_by_tensor_and_names_a_mismatching_key():
    s1 = {"q.lora_A": rand(2, 4, seed=1), "q.lora_B": rand(4, 2, seed=2)}
    s2 = {"q.lora_A": rand(2, 4, seed=3), "q.lora_B": rand(4, 2, seed=4)}
    merged = merge_state([s1, s2], "task_arithmetic", scaling=0.5)
    assert list(merged) == list(s1)
    torch.testing.assert_close(merged["q.lora_B"], 0.5 * (s1["q.lora_B"] + s2["q.lora_B"]))
    with pytest.raises(ConfigError, match="task 1's update has no tensor 'q.lora_B'"):
        merge_state([s1, {"q.lora_A": s2["q.lora_A"]}], "linear")
    with pytest.raises(ConfigError, match="tensor 'q.lora_A'.*shape"):
        merge_state([s1, {**s2, "q.lora_A": rand(3, 4)}], "linear")


# ----------------------------------------------------------------------------- LoRA


def test_to_lora_is_exact_for_a_rank_r_update():
    B0, A0 = rand(20, 3, seed=1), rand(3, 15, seed=2)
    dW = lora_delta(A0, B0, scaling=2.0)
    A, B, err = to_lora(dW, 3)
    assert A.shape == (3, 15) and B.shape == (20, 3)
    assert err < 1e-5
    torch.testing.assert_close(B @ A, dW, atol=1e-4, rtol=1e-4)
    A, B, _ = to_lora(dW, 3, scaling=2.0)  # factors meant for a LoRA with scaling 2
    torch.testing.assert_close(lora_delta(A, B, 2.0), dW, atol=1e-4, rtol=1e-4)


def test_to_lora_error_is_the_tail_singular_values_norm_ratio():
    dW = rand(20, 15, seed=5)
    s = torch.linalg.svdvals(dW)
    for r in (1, 4, 10):
        _, _, err = to_lora(dW, r)
        assert err == pytest.approx(math.sqrt(float((s[r:] ** 2).sum() / (s**2).sum())), rel=1e-4)


def test_merging_lora_factors_separately_is_not_merging_the_update():
    A1, A2 = rand(4, 16, seed=1), rand(4, 16, seed=2)
    B1, B2 = rand(8, 4, seed=3), rand(8, 4, seed=4)
    merged_update = linear([lora_delta(A1, B1), lora_delta(A2, B2)])
    factors_merged = lora_delta(linear([A1, A2]), linear([B1, B2]))
    gap = float((factors_merged - merged_update).norm() / merged_update.norm())
    assert gap > 0.3  # averaging A and B separately adds cross terms B1 A2 + B2 A1
    # merging the update and refactoring at rank 2r is exact
    A, B, err = to_lora(merged_update, 8)
    assert err < 1e-5
    torch.testing.assert_close(B @ A, merged_update, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------- ComPEFT


def test_compress_keeps_density_top_magnitudes_as_sign_times_alpha_std():
    t = rand(100, 40, seed=6)
    ct = compress_tensor(t, density=0.1, alpha=2.0)
    restored = decompress(ct)
    assert restored.shape == t.shape and restored.dtype == t.dtype
    kept = restored != 0
    assert kept.sum().item() == 400  # exactly density * numel
    assert ct.scale == pytest.approx(2.0 * t.std().item(), rel=1e-6)
    # the kept entries are the largest magnitudes
    assert t[kept].abs().min() >= t[~kept].abs().max()
    expected = torch.where(kept, torch.sign(t) * torch.tensor(ct.scale).float(), torch.zeros(()))
    assert torch.equal(restored, expected)


@pytest.mark.parametrize("layout", ["bitmap", "indices", "auto"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compressed_file_round_trips_exactly(tmp_path, layout, dtype):
    state = {"layer.0.q": rand(32, 8, seed=7).to(dtype), "layer.0.v": rand(300, seed=8).to(dtype)}
    compressed = compress_state(state, density=0.05, layout=layout)
    save_compressed(compressed, tmp_path / "task0.safetensors")
    loaded = load_compressed(tmp_path / "task0.safetensors")
    assert list(loaded) == list(state)
    before, after = decompress_state(compressed), decompress_state(loaded)
    for name in state:
        assert after[name].dtype == dtype
        assert torch.equal(before[name], after[name])
        assert loaded[name].scale == compressed[name].scale


def test_compressed_file_is_plain_safetensors_and_much_smaller_than_dense(tmp_path):
    t = rand(256, 256, seed=9)
    path = tmp_path / "tau.safetensors"
    size = save_compressed({"w": compress_tensor(t, density=0.1)}, path)
    assert size.bytes_on_disk == path.stat().st_size
    assert size.dense_fp32_bytes == 4 * t.numel()
    assert size.bytes_on_disk < size.dense_fp32_bytes / 8
    raw = load_file(path)  # safetensors, no pickle
    assert {v.dtype for v in raw.values()} == {torch.uint8}
    assert not list(tmp_path.glob(".*.tmp"))  # the atomic write left no temp file


def test_very_sparse_tensors_store_indices_instead_of_a_bitmap():
    t = rand(100, 100, seed=10)
    sparse = compress_tensor(t, density=0.01)
    assert sparse.layout == "indices"
    assert sparse.packed_nbytes < compress_tensor(t, density=0.01, layout="bitmap").packed_nbytes
    assert (decompress(sparse) != 0).sum().item() == 100
