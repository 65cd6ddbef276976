"""Search space, budget and references on the real teacher's config shape (configs only, no weights)."""

import pytest
from conftest import tiny_config

from slimnas.compress.arch import Architecture, param_count, validate_target
from slimnas.core.errors import SlimnasError
from slimnas.search.constraints import Budget
from slimnas.search.references import depth_only_reference, uniform_reference, width_only_reference
from slimnas.search.space import DimensionSpec, FeasibleEncoding, SearchSpace, SpaceSettings, stratified_sample

SMOLLM2 = dict(
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
    head_dim=64, num_hidden_layers=30, tie_word_embeddings=True,
)  # fmt: skip
SPACE = SpaceSettings(num_hidden_layers=DimensionSpec(max_prune=0.67))  # the defaults, deeper cuts allowed


def test_dimension_values():
    assert DimensionSpec(multiple_of=64, max_prune=0.5).values("h", 576) == [320, 384, 448, 512, 576]
    assert DimensionSpec(min=16, step=2).values("L", 30) == list(range(16, 31, 2))
    assert DimensionSpec(choices=[6, 9, 3]).values("q", 9) == [3, 6, 9]
    with pytest.raises(SlimnasError, match="no values"):
        DimensionSpec(multiple_of=1000).values("h", 576)
    assert DimensionSpec(choices=[6, 12]).values("q", 9) == [6]  # above the teacher: left out (a chain's later stage)
    with pytest.raises(SlimnasError, match="no values"):
        DimensionSpec(choices=[12]).values("q", 9)
    with pytest.raises(SlimnasError, match=r"lie in \[1, 9\]"):
        DimensionSpec(choices=[0, 6]).values("q", 9)


def test_every_feasible_candidate_meets_the_budget_and_can_be_cut():
    teacher = tiny_config(**SMOLLM2)
    space = SearchSpace.from_settings(SPACE, teacher)
    feasible = space.feasible(teacher, Budget(params=0.6, window=0.05))
    target = 0.6 * param_count(teacher)
    assert 0 < len(feasible) < space.size()
    for arch in feasible:
        assert abs(param_count(teacher, arch) - target) <= 0.05 * target
        validate_target(arch, teacher)  # raises if it cannot be cut
        assert arch.hidden_size % arch.num_attention_heads == 0  # the Llama config rule


def test_the_uniform_reference_shrinks_every_dimension_kv_groups_included_by_one_ratio():
    teacher = tiny_config(**SMOLLM2)
    budget = Budget(params=0.37, window=0.05)
    feasible = SearchSpace.from_settings(SPACE, teacher).feasible(teacher, budget)
    reference, note = uniform_reference(feasible, teacher, budget, tolerance=0.1)
    assert reference.arch == Architecture(384, 1024, 6, 2, 20)  # 2/3 of every dimension
    assert "spread 0.00" in note and "kv 0.67" in reference.note


def test_a_space_that_cannot_cut_uniformly_says_so_instead_of_naming_another_candidate():
    teacher = tiny_config(**SMOLLM2)
    budget = Budget(params=0.6, window=0.1)  # SmolLM2: no hidden size between 384 and 576 divides into heads
    feasible = SearchSpace.from_settings(SPACE, teacher).feasible(teacher, budget)
    reference, note = uniform_reference(feasible, teacher, budget, tolerance=0.2)
    assert reference is None and "not expressible" in note and "spread" in note


def test_depth_only_and_width_only_references():
    teacher = tiny_config(**SMOLLM2)
    budget = Budget(params=0.6, window=0.1)
    feasible = SearchSpace.from_settings(SPACE, teacher).feasible(teacher, budget)
    depth, _ = depth_only_reference(feasible, teacher, budget)
    assert (depth.arch.hidden_size, depth.arch.intermediate_size, depth.arch.num_attention_heads) == (576, 1536, 9)
    assert depth.arch.num_hidden_layers < 30 and depth.depth_strategy == "contiguous"
    width, _ = width_only_reference(feasible, teacher, budget)
    assert width.arch.num_hidden_layers == 30 and width.arch in feasible
    nearest = min(abs(budget.target_gap(teacher, a)) for a in feasible if a.num_hidden_layers == 30)
    assert abs(budget.target_gap(teacher, width.arch)) == pytest.approx(nearest, abs=1e-3)


def test_memory_budget_and_unreachable_targets():
    teacher = tiny_config(**SMOLLM2)
    space = SearchSpace.from_settings(SPACE, teacher)
    small = space.feasible(teacher, Budget(params=None, weight_memory_mb=150))
    assert small and all(param_count(teacher, a) * 2 <= 150 * 2**20 for a in small)
    assert space.feasible(teacher, Budget(params=0.05, window=0.1)) == []
    assert Architecture(576, 1536, 9, 3, 30) not in space.feasible(teacher, Budget(params=0.6))


def test_every_point_of_the_samplers_coordinates_is_a_feasible_candidate():
    teacher = tiny_config(**SMOLLM2)
    feasible = SearchSpace.from_settings(SPACE, teacher).feasible(teacher, Budget(params=0.6, window=0.1))
    encoding = FeasibleEncoding.of(feasible)
    grid = [i / 100 for i in range(101)]
    decoded = {encoding.decode(a, d, w) for a in encoding.attention for d in grid for w in grid}
    assert decoded <= set(feasible)
    assert decoded == set(feasible)  # and every feasible candidate can be proposed
    for arch in feasible:
        assert encoding.decode(**{k.split("_")[0]: v for k, v in encoding.encode(arch).items()}) == arch


def test_a_capped_budget_keeps_every_candidate_at_or_below_the_target():
    teacher = tiny_config(**SMOLLM2)
    space = SearchSpace.from_settings(SPACE, teacher)
    target = 0.5 * param_count(teacher)
    capped = space.feasible(teacher, Budget(params=0.5, window=0.05, cap=True))
    assert capped and all(0.95 * target <= param_count(teacher, a) <= target for a in capped)
    both_sides = space.feasible(teacher, Budget(params=0.5, window=0.05))
    assert set(capped) < set(both_sides)


def test_the_stratified_sample_spreads_over_attention_shapes_and_depths():
    teacher = tiny_config(**SMOLLM2)
    feasible = SearchSpace.from_settings(SPACE, teacher).feasible(teacher, Budget(params=0.6, window=0.1))
    groups = {(a.hidden_size, a.num_attention_heads, a.num_key_value_heads, a.num_hidden_layers) for a in feasible}
    sample = stratified_sample(feasible, len(groups), seed=0)
    assert len(sample) == len(set(sample)) == len(groups) < len(feasible)
    assert {
        (a.hidden_size, a.num_attention_heads, a.num_key_value_heads, a.num_hidden_layers) for a in sample
    } == groups
    assert sample == stratified_sample(feasible, len(groups), seed=0) != stratified_sample(feasible, len(groups), 1)
    assert set(stratified_sample(feasible, 10**6, seed=0)) == set(feasible)
