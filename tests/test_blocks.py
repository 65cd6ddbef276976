"""The block library (single-block cuts of a tiny teacher), the MIP pick over it, and the proportional allocation."""

import itertools
import random
import tempfile
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import tiny_model

import slimnas.compress.blocks as blocks_module
from slimnas.compress.arch import Architecture, LayerShape, PerLayerArchitecture
from slimnas.compress.blocks import (
    ATTENTION,
    FFN,
    BlockVariants,
    Sizes,
    TeacherActivations,
    build_block_library,
)
from slimnas.compress.heldout import HeldoutSet
from slimnas.compress.importance import compute_importance
from slimnas.compress.prune import plan_pruning, prune_model
from slimnas.compress.settings import ImportanceSettings
from slimnas.core.errors import SlimnasError
from slimnas.core.files import read_jsonl
from slimnas.search.allocation import proportional_allocation
from slimnas.search.mip import BlockBudget, mip_pick

SETTINGS = ImportanceSettings(n_samples=16, batch_size=8, precision="fp32")
VARIANTS = BlockVariants(ffn=(0, 48), kv_groups=(0, 1))  # + the teacher's 96 neurons and 2 groups
CUTS = 4 * 2 + (4 + 3)  # FFN 0 and 48 in every layer; attention 1 group in every layer, removed in layers 1-3


def teacher_and_documents(model_type: str = "llama", **overrides):
    """A tiny 4-layer teacher (4 heads in 2 KV groups, 96 neurons), its importance and 6 documents in 2 batches."""
    teacher = tiny_model(model_type, **overrides)
    calibration = torch.randint(3, 128, (16, 24), generator=torch.Generator().manual_seed(1))
    rows = torch.randint(3, 128, (6, 20), generator=torch.Generator().manual_seed(2))
    documents = HeldoutSet("selection", rows, teacher, "fp32", batch_size=4)
    return teacher, compute_importance(teacher, calibration, SETTINGS), documents


def single_cut(library, layer: int, kind: str, size: int) -> tuple[list[int], list[int]]:
    """The choice that replaces one sub-block of the teacher."""
    kv = [shape.num_key_value_heads for shape in library.teacher.layers]
    ffn = [shape.intermediate_size for shape in library.teacher.layers]
    (kv if kind == ATTENTION else ffn)[layer] = size
    return kv, ffn


@pytest.mark.parametrize(
    "model_type, overrides", [("llama", {}), ("llama", {"attention_bias": True, "mlp_bias": True}), ("qwen3", {})]
)
def test_each_block_costs_what_a_whole_pruned_model_with_only_that_cut_scores(tmp_path, model_type, overrides):
    teacher, importance, documents = teacher_and_documents(model_type, **overrides)
    library = build_block_library(teacher, importance, documents, VARIANTS, tmp_path / "library.jsonl")
    assert len(read_jsonl(tmp_path / "library.jsonl")) == CUTS
    assert [b.size for b in library.options(0, ATTENTION)] == [1, 2]  # layer 0 keeps its attention
    assert [b.size for b in library.options(1, ATTENTION)] == [0, 1, 2]
    assert [b.size for b in library.options(3, FFN)] == [0, 48, 96]
    config = teacher.config
    for block in library.blocks:
        arch = library.architecture(*single_cut(library, block.layer, block.kind, block.size))
        assert Sizes.of(config, arch, 20) == library.teacher_sizes + block.sizes
        if block.size in (2, 96):  # the teacher's own block
            assert (block.kl, block.sizes) == (0.0, Sizes(0, 0, 0))
            continue
        assert block.kl > 0 and block.sizes.params < 0 and block.sizes.flops_per_token < 0
        naive = documents.evaluate(prune_model(teacher, plan_pruning(importance, config, arch), arch))
        assert block.kl == pytest.approx(naive.kl, rel=1e-5, abs=1e-6), block
        assert block.kl_per_doc == pytest.approx(naive.kl_per_doc, rel=1e-5, abs=1e-6)
        assert block.kl_stderr == pytest.approx(naive.kl_stderr, rel=1e-4, abs=1e-6)


def test_a_library_on_fewer_documents_and_positions_scores_like_whole_models_on_that_subset(tmp_path):
    """search.blocks.documents / positions: all positions give exactly today's library; the last 7 positions of the
    first 4 documents give each cut the KL a whole pruned model scores there (whole rows through the layers)."""
    teacher, importance, documents = teacher_and_documents()
    whole = build_block_library(teacher, importance, documents, VARIANTS, tmp_path / "whole.jsonl")
    every_position = documents.subset(positions=documents.rows.shape[1])
    same = build_block_library(teacher, importance, every_position, VARIANTS, tmp_path / "same.jsonl")
    assert [replace(b, seconds=0.0) for b in same.blocks] == [replace(b, seconds=0.0) for b in whole.blocks]
    subset = documents.subset(documents=4, positions=7)
    part = build_block_library(teacher, importance, subset, VARIANTS, tmp_path / "part.jsonl")
    config = teacher.config
    for block in part.blocks:
        assert len(block.kl_per_doc) == 4
        if block.size in (2, 96):
            continue
        arch = part.architecture(*single_cut(part, block.layer, block.kind, block.size))
        naive = subset.evaluate(prune_model(teacher, plan_pruning(importance, config, arch), arch))
        assert (naive.documents, naive.tokens) == (4, 28)
        assert block.kl == pytest.approx(naive.kl, rel=1e-5, abs=1e-6), block
    assert [b.kl for b in part.blocks] != [b.kl for b in whole.blocks]
    assert part.context == whole.context == 20  # FLOPs at the rows' whole length


def test_a_cut_that_keeps_the_teachers_layer_gives_the_teachers_hidden_states_and_zero_kl():
    teacher, _, documents = teacher_and_documents()
    activations = TeacherActivations(teacher, documents)
    expected = documents.hidden_states(teacher)
    for index, layer in enumerate(teacher.model.layers):
        hidden = activations.final_hidden(index, layer)
        assert torch.equal(hidden, expected)
        assert documents.score(hidden, teacher.lm_head).kl == pytest.approx(0, abs=1e-6)


def test_the_library_is_read_back_and_a_partial_file_is_completed(tmp_path, monkeypatch):
    teacher, importance, documents = teacher_and_documents()
    path = tmp_path / "library.jsonl"
    first = build_block_library(teacher, importance, documents, VARIANTS, path)
    lines = path.read_text().splitlines(keepends=True)

    def refuse(*args, **kwargs):
        raise AssertionError("measured again")

    with monkeypatch.context() as patch:
        patch.setattr(blocks_module, "prune_model", refuse)
        assert build_block_library(teacher, importance, documents, VARIANTS, path) == first

    path.write_text("".join(lines[:5]))  # a build killed after five cuts
    measured = []
    cut = TeacherActivations.final_hidden
    monkeypatch.setattr(
        TeacherActivations, "final_hidden", lambda self, *args: measured.append(args) or cut(self, *args)
    )
    again = build_block_library(teacher, importance, documents, VARIANTS, path)
    assert len(measured) == CUTS - 5
    assert path.read_text().splitlines(keepends=True)[:5] == lines[:5]
    assert [(b.layer, b.kind, b.size, b.kl) for b in again.blocks] == [
        (b.layer, b.kind, b.size, b.kl) for b in first.blocks
    ]


def test_bad_variants_and_a_per_layer_teacher_are_refused_in_one_line(tmp_path):
    teacher, importance, documents = teacher_and_documents()
    with pytest.raises(SlimnasError, match=r"ffn \[0, 200\] must lie in \[0, 96\]"):
        build_block_library(teacher, importance, documents, BlockVariants((0, 200), (1,)), tmp_path / "x.jsonl")
    with pytest.raises(SlimnasError, match=r"kv_groups \[3\] must lie in \[0, 2\]"):
        build_block_library(teacher, importance, documents, BlockVariants((0,), (3,)), tmp_path / "x.jsonl")
    assert not (tmp_path / "x.jsonl").exists()


@pytest.fixture(scope="module")
def random_library():
    """A real tiny teacher's library (exact sizes) with random block costs: 4 layers x 3 attention x 3 FFN variants
    (layer 0: 2 attention variants)."""
    teacher, importance, documents = teacher_and_documents()
    with tempfile.TemporaryDirectory() as folder:
        library = build_block_library(teacher, importance, documents, VARIANTS, Path(folder) / "library.jsonl")
    rng = random.Random(0)
    costs = tuple(replace(b, kl=0.0 if b.size in (2, 96) else rng.uniform(0.01, 1.0)) for b in library.blocks)
    return teacher.config, replace(library, blocks=costs)


def every_choice(library):
    """(predicted KL, choice) of every choice, by brute force, best first."""
    layers = range(len(library.teacher.layers))
    kv_options = [[b.size for b in library.options(i, ATTENTION)] for i in layers]
    ffn_options = [[b.size for b in library.options(i, FFN)] for i in layers]
    choices = []
    for kv in itertools.product(*kv_options):
        for ffn in itertools.product(*ffn_options):
            choices.append((library.predict(library.architecture(kv, ffn)), kv, ffn))
    return sorted(choices)


def test_the_prediction_sums_the_blocks_of_a_candidate_made_of_them_and_of_no_other(random_library):
    _, library = random_library
    kl = {(b.layer, b.kind, b.size): b.kl for b in library.blocks}
    kv, ffn = (1, 0, 2, 1), (48, 96, 0, 0)  # layer 3 dropped whole
    expected = sum(kl[i, ATTENTION, g] + kl[i, FFN, w] for i, (g, w) in enumerate(zip(kv, ffn, strict=True)))
    assert library.predict(library.architecture(kv, ffn)) == pytest.approx(expected, rel=1e-12) and expected > 0
    assert library.predict(library.teacher) == 0.0
    shape = library.architecture(kv, ffn)
    unmeasured = PerLayerArchitecture(64, (replace(shape.layers[0], intermediate_size=24), *shape.layers[1:]))
    other_hidden = PerLayerArchitecture(48, shape.layers)
    no_attention_in_layer_0 = library.architecture((0, 0, 2, 1), ffn)
    for outside in (unmeasured, other_hidden, no_attention_in_layer_0, Architecture(64, 48, 2, 1, 4)):
        assert library.predict(outside) is None


BUDGETS = [
    ("params", 0.75),
    ("params", 0.6),
    ("flops_per_token", 0.7),
    ("weight_bytes", 0.8),
    ("params+flops", 0.7),
]


@pytest.mark.parametrize("caps, fraction", BUDGETS)
def test_the_mip_returns_the_n_best_choices_found_by_brute_force_and_honours_every_cap(random_library, caps, fraction):
    config, library = random_library
    teacher = library.teacher_sizes
    names = {"params+flops": ["params", "flops_per_token"]}.get(caps, [caps])
    budget = BlockBudget(**{name: int(fraction * getattr(teacher, name)) for name in names})
    feasible = [
        (kl, kv, ffn)
        for kl, kv, ffn in every_choice(library)
        if budget.allows(Sizes.of(config, library.architecture(kv, ffn), library.context))
    ]
    picks = mip_pick(library, budget, n=5)
    assert len(picks) == 5 and len({(p.kv_groups, p.ffn) for p in picks}) == 5
    assert [p.kl for p in picks] == pytest.approx([kl for kl, _, _ in feasible[:5]], abs=1e-9)
    assert [p.kl for p in picks] == sorted(p.kl for p in picks)
    for pick in picks:
        exact = Sizes.of(config, pick.arch, library.context)
        assert pick.sizes == exact and budget.allows(exact)
        assert pick.arch == library.architecture(pick.kv_groups, pick.ffn)


def test_the_mip_honours_a_floor_on_parameters_where_smaller_blocks_cost_less(random_library):
    """A search's budget is a window: with the teacher's own blocks the dearest, the best choices are the smallest,
    and the floor keeps them inside the window (checked against brute force)."""
    config, library = random_library
    library = replace(library, blocks=tuple(replace(b, kl=2.0) if b.size in (2, 96) else b for b in library.blocks))
    teacher = library.teacher_sizes.params
    budget = BlockBudget(params=int(0.8 * teacher), min_params=int(0.7 * teacher))
    sizes = {(kv, ffn): Sizes.of(config, library.architecture(kv, ffn), library.context) for _, kv, ffn in
             every_choice(library)}  # fmt: skip
    feasible = [kl for kl, kv, ffn in every_choice(library) if budget.allows(sizes[kv, ffn])]
    picks = mip_pick(library, budget, n=3)
    assert [p.kl for p in picks] == pytest.approx(feasible[:3], abs=1e-9)
    assert all(0.7 * teacher <= p.sizes.params <= 0.8 * teacher for p in picks)
    unfloored = mip_pick(library, BlockBudget(params=int(0.8 * teacher)))[0]
    assert unfloored.sizes.params < 0.7 * teacher and unfloored.kl < picks[0].kl  # the floor binds
    assert budget.describe() == f"params >= {int(0.7 * teacher):,}, params <= {int(0.8 * teacher):,}"


def test_picks_differ_by_at_least_the_asked_number_of_sub_blocks(random_library):
    _, library = random_library
    picks = mip_pick(library, BlockBudget(params=int(0.7 * library.teacher_sizes.params)), n=4, differ_by=3)
    for a, b in itertools.combinations(picks, 2):
        changed = sum(x != y for x, y in zip(a.kv_groups + a.ffn, b.kv_groups + b.ffn, strict=True))
        assert changed >= 3


def test_an_unreachable_budget_is_one_line_and_a_loose_one_keeps_the_teacher(random_library):
    config, library = random_library
    with pytest.raises(SlimnasError, match=r"^budget unreachable: .* params <= 1,000 \(the smallest: params [\d,]+\)$"):
        mip_pick(library, BlockBudget(params=1000))
    (best,) = mip_pick(library, BlockBudget(params=library.teacher_sizes.params))
    assert best.kl == 0 and best.arch == library.teacher
    sizes = sorted(
        Sizes.of(config, library.architecture(kv, ffn), library.context).params for _, kv, ffn in every_choice(library)
    )
    tight = BlockBudget(params=sizes[6])  # a handful of choices fit: asked for more, the MIP returns them all
    assert len(mip_pick(library, tight, n=50)) == sum(size <= sizes[6] for size in sizes) < 50


def test_the_proportional_allocation_gives_wider_ffns_to_more_important_layers_and_fills_the_budget():
    config = tiny_model(num_hidden_layers=4).config
    scores = [0.9, 0.1, 0.3, 0.6]
    context = 20
    budget = BlockBudget(params=int(0.8 * Sizes.of(config, PerLayerArchitecture.of(config), context).params))
    arch = proportional_allocation(config, scores, budget, context, widths=range(0, 97, 8))
    widths = [layer.intermediate_size for layer in arch.layers]
    assert widths[0] == 96 and widths[1] < widths[2] < widths[3]  # layer 0 capped at the teacher's width
    assert all(w % 8 == 0 for w in widths) and all(layer.num_attention_heads == 4 for layer in arch.layers)
    assert budget.allows(Sizes.of(config, arch, context))
    # the next step of the rule (8 more neurons to the layer whose turn it is) breaks the budget
    turn = min((i for i in range(4) if widths[i] < 96), key=lambda i: (widths[i] + 8) / scores[i])
    wider = PerLayerArchitecture(
        arch.hidden_size,
        tuple(replace(s, intermediate_size=s.intermediate_size + 8 * (i == turn)) for i, s in enumerate(arch.layers)),
    )
    assert not budget.allows(Sizes.of(config, wider, context))
    with pytest.raises(SlimnasError, match="budget unreachable: params <= 10 is not met even with every FFN at 0 neu"):
        proportional_allocation(config, scores, BlockBudget(params=10), context)


@pytest.mark.parametrize("widths", [(0, 40, 96), (24, 40, 64, 80), (0, 40, 64)])
def test_the_proportional_allocation_stays_on_the_grid_of_widths_and_fills_the_budget(widths):
    """Widths off a per-layer space's grid (56 is no FFN variant of (0, 40, 96), nor a multiple of its step) never
    come out: each layer takes the widest grid width its turn reaches, with the KV groups asked for, under the cap."""
    config = tiny_model(num_hidden_layers=4).config
    scores, context = [0.9, 0.1, 0.3, 0.6], 20
    grid = list(widths)
    narrowest, widest = (
        Sizes.of(config, PerLayerArchitecture(64, (LayerShape(width, 2, 1),) * 4), context).params
        for width in (grid[0], grid[-1])
    )
    for fraction in (0.3, 0.6, 0.9):  # of the way from every layer at the narrowest width to every one at the widest
        budget = BlockBudget(params=int(narrowest + fraction * (widest - narrowest)))
        arch = proportional_allocation(config, scores, budget, context, widths=widths, kv_groups=1)
        assert all(layer.intermediate_size in grid for layer in arch.layers)
        assert {(layer.num_attention_heads, layer.num_key_value_heads) for layer in arch.layers} == {(2, 1)}
        assert budget.allows(Sizes.of(config, arch, context))
        sizes = [layer.intermediate_size for layer in arch.layers]
        below_top = [i for i, w in enumerate(sizes) if w < grid[-1]]
        assert below_top  # the cap binds
        # the rule's next step (the next grid width for the layer whose turn it is) breaks the cap
        turn = min(below_top, key=lambda i: (grid[grid.index(sizes[i]) + 1] / scores[i], i))
        grown = tuple(
            replace(layer, intermediate_size=grid[grid.index(layer.intermediate_size) + 1]) if i == turn else layer
            for i, layer in enumerate(arch.layers)
        )
        assert not budget.allows(Sizes.of(config, PerLayerArchitecture(arch.hidden_size, grown), context))
