"""Search space and budget on the real teacher's config shape (configs only, no weights)."""

import pytest
from conftest import tiny_config

from compress.arch import Architecture, param_count, validate_target
from compress.errors import SlimnasError
from search.constraints import Budget
from search.space import DimensionSpec, SearchSpace, depth_only_candidate, uniform_candidate

SMOLLM2 = dict(
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
    head_dim=64, num_hidden_layers=30, tie_word_embeddings=True,
)  # fmt: skip
SPACE = {
    "hidden_size": {"multiple_of": 64, "max_prune": 0.5},
    "intermediate_size": {"multiple_of": 64, "max_prune": 0.6},
    "num_attention_heads": {"max_prune": 0.67},
    "num_key_value_heads": {"max_prune": 0.67},
    "num_hidden_layers": {"max_prune": 0.5},
}


def test_dimension_values():
    assert DimensionSpec(multiple_of=64, max_prune=0.5).values("h", 576) == [320, 384, 448, 512, 576]
    assert DimensionSpec(min=16, step=2).values("L", 30) == list(range(16, 31, 2))
    assert DimensionSpec(choices=(6, 9, 3)).values("q", 9) == [3, 6, 9]
    with pytest.raises(SlimnasError, match="no values"):
        DimensionSpec(multiple_of=1000).values("h", 576)
    with pytest.raises(SlimnasError, match=r"lie in \[1, 9\]"):
        DimensionSpec(choices=(12,)).values("q", 9)


def test_every_feasible_candidate_meets_the_budget_and_can_be_cut():
    teacher = tiny_config(**SMOLLM2)
    space = SearchSpace.from_config(SPACE, teacher)
    budget = Budget(params=0.6, window=0.05)
    feasible = space.feasible(teacher, budget)
    target = 0.6 * param_count(teacher)
    assert 0 < len(feasible) < space.size()
    for arch in feasible:
        assert abs(param_count(teacher, arch) - target) <= 0.05 * target
        validate_target(arch, teacher)  # raises if it cannot be cut
        assert arch.hidden_size % arch.num_attention_heads == 0  # the Llama config rule

    uniform = uniform_candidate(feasible, teacher, budget)
    depth = depth_only_candidate(feasible, teacher, budget)
    assert uniform in feasible and depth in feasible
    assert (depth.hidden_size, depth.intermediate_size, depth.num_attention_heads) == (576, 1536, 9)
    assert depth.num_hidden_layers < 30

    def spread(a):
        ratios = [a.hidden_size / 576, a.intermediate_size / 1536, a.num_attention_heads / 9, a.num_hidden_layers / 30]
        return max(ratios) - min(ratios)

    assert all(spread(uniform) <= spread(a) + 1e-9 for a in feasible)


def test_memory_budget_and_unreachable_targets():
    teacher = tiny_config(**SMOLLM2)
    space = SearchSpace.from_config(SPACE, teacher)
    small = space.feasible(teacher, Budget(params=None, weight_memory_mb=150))
    assert small and all(param_count(teacher, a) * 2 <= 150 * 2**20 for a in small)
    assert space.feasible(teacher, Budget(params=0.05, window=0.1)) == []
    assert Architecture(576, 1536, 9, 3, 30) not in space.feasible(teacher, Budget(params=0.6))
