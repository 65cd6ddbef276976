"""Per-layer (heterogeneous) students downstream: KD, held-out KL, lm-eval, speed, memory, torch.compile."""

import json
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from conftest import FAST, SHARED_DATA, matched_outputs, needs_data, tiny_model, tiny_tokenizer
from test_heterogeneous import MIXED, SETTINGS, calibration, shape, zeroed_teacher
from transformers import AutoModelForCausalLM

from slimnas.bench.memory import measure_memory
from slimnas.bench.quality import score_model
from slimnas.bench.settings import QualitySettings, SpeedSettings
from slimnas.bench.speed import compare_speed
from slimnas.bench.tasks import prepare_suite
from slimnas.cli import main
from slimnas.compress.arch import PerLayerArchitecture, architecture_of, flops_per_token, param_count
from slimnas.compress.corpus import load_corpus
from slimnas.compress.distill import HiddenStateMatch, build_distiller, distill_to_budget
from slimnas.compress.heldout import HeldoutSet
from slimnas.compress.importance import compute_importance
from slimnas.compress.models import LoadedModel
from slimnas.compress.prune import plan_pruning, prune_model, save_checkpoint
from slimnas.compress.settings import BUILTIN, DataSettings, DistillSettings

VOCAB = 300
IDENTITY = {"student": "s", "teacher": "t", "corpus": "c"}
# Of a 5-layer teacher (4 heads in 2 KV groups, 96 neurons, hidden 64): layers 0 and 1 whole, layer 2 dropped,
# layer 3 narrower with one KV group, layer 4 attention-free.
DROPPED = shape((96, 4, 2), (96, 4, 2), (0, 0, 0), (40, 2, 1), (64, 0, 0))


@pytest.fixture(scope="module")
def data():
    return load_corpus(
        tiny_tokenizer(VOCAB), DataSettings(corpus=BUILTIN, seq_len=32, selection_docs=8, evaluation_docs=8)
    )


def sharp_teacher(**overrides):
    """A random teacher with peaked next-token distributions, so a pruned student starts far from it."""
    teacher = tiny_model(vocab_size=VOCAB, tie_word_embeddings=False, num_hidden_layers=5, **overrides)
    with torch.no_grad():
        teacher.lm_head.weight.mul_(25)
    return teacher


def cut(teacher, rows, target: PerLayerArchitecture):
    importance = compute_importance(teacher, rows[:16], SETTINGS)
    plan = plan_pruning(importance, teacher.config, target)
    student = prune_model(teacher, plan, target)
    assert type(student).__name__.startswith("Slimnas")  # the per-layer modeling, not the plain family
    return student, plan


def kd_settings(**overrides):
    values = dict(batch_size=4, lr=2e-3, precision="fp32", eval_every=1000, save_every=1000, top_k=32)
    return DistillSettings(**(values | overrides))


def test_kd_from_the_teachers_top_k_cache_trains_a_per_layer_student(data, tmp_path):
    teacher = sharp_teacher()
    student, _ = cut(teacher, data.train, PerLayerArchitecture(48, MIXED.layers))
    settings = kd_settings(budget_tokens=48 * 4 * 32, teacher_mode="cache", lr=4e-3)
    loaded = LoadedModel(teacher, None, "teacher", "test")
    kd = build_distiller(student, loaded, data.train, settings, settings.budget_tokens, tmp_path / "cache")
    evaluation = HeldoutSet("evaluation", data.evaluation, teacher, "fp32")
    result = distill_to_budget(kd, evaluation, tmp_path / "run", IDENTITY, progress_bar=False)
    assert result.steps == 48
    assert result.final["kl"] < 0.7 * result.initial["kl"], (result.initial["kl"], result.final["kl"])
    assert len(list((tmp_path / "cache").rglob("values.npy"))) == 1  # the targets came from the top-k cache on disk


def test_hidden_state_loss_matches_each_student_layer_to_its_teacher_layer_across_a_dropped_one(data, tmp_path):
    """Student layer j was teacher layer plan.layers[j]: after the dropped layer 2 the pairs shift by one, and the
    whole layers before it reproduce the teacher's states exactly (zero loss before any training)."""
    teacher = sharp_teacher()
    student, plan = cut(teacher, data.train, DROPPED)
    assert plan.layers == [0, 1, 3, 4]
    match = HiddenStateMatch.build((1, 2, -1), plan.layers, plan.channels, teacher_hidden=64)
    assert match.pairs == [(1, 1), (2, 3), (3, 4)]
    rows = data.train[:4]
    student_out, teacher_out = matched_outputs(student, teacher, match, rows)
    torch.testing.assert_close(student_out[1], teacher_out[1])
    assert HiddenStateMatch.build((1,), plan.layers, plan.channels, 64).loss(student_out, teacher_out) < 1e-10
    assert match.loss(student_out, teacher_out) > 1e-3

    settings = kd_settings(budget_tokens=40 * 4 * 32, teacher_mode="live", hidden_weight=1.0, hidden_layers=(2, -1))
    loaded = LoadedModel(teacher, None, "teacher", "test")
    kd = build_distiller(
        student, loaded, data.train, settings, settings.budget_tokens, tmp_path, (plan.layers, plan.channels)
    )
    evaluation = HeldoutSet("evaluation", data.evaluation, teacher, "fp32")
    result = distill_to_budget(kd, evaluation, tmp_path / "hidden", IDENTITY, progress_bar=False)
    lines = [json.loads(line) for line in (tmp_path / "hidden" / "metrics.jsonl").read_text().splitlines()]
    hidden = [line["train_hidden"] for line in lines if "train_hidden" in line]
    first, last = sum(hidden[:8]) / 8, sum(hidden[-8:]) / 8
    assert first > 0 and last < 0.95 * first, (first, last)
    assert result.final["kl"] < result.initial["kl"]


PER_LAYER_ARGS = [  # a 4-layer teacher: layer 1 narrower, layer 2 dropped, layer 3 without its MLP
    "target.hidden_size=48",
    "target.intermediate_size=[96,40,0,0]",
    "target.num_attention_heads=[4,2,0,2]",
    "target.num_key_value_heads=[2,1,0,2]",
]


def test_distill_command_trains_a_per_layer_student_and_saves_it_in_the_per_layer_format(tiny_checkpoint, tmp_path):
    pruned, distilled = tmp_path / "pruned", tmp_path / "distilled"
    teacher = f"teacher={tiny_checkpoint}"
    assert main(["prune", teacher, f"out={pruned}", *FAST, "eval_heldout=false", *PER_LAYER_ARGS]) == 0
    distill = [
        "distill", teacher, f"student={pruned}", f"out={distilled}", "distill.budget_tokens=1024",
        "distill.batch_size=4", "distill.lr=2e-3", "distill.eval_every=8", "distill.teacher_mode=live",
        "distill.hidden_weight=1.0", "distill.hidden_layers=[1,-1]", *FAST,  # -1: student layer 2, teacher layer 3
    ]  # fmt: skip
    assert main(distill) == 0
    metrics = [json.loads(line) for line in (distilled / "metrics.jsonl").read_text().splitlines()]
    evaluations = [m["heldout"]["kl"] for m in metrics if "heldout" in m]
    assert len(evaluations) == 2 and evaluations[-1] < evaluations[0]
    assert all(m["train_hidden"] > 0 for m in metrics if "train_hidden" in m)

    config = json.loads((distilled / "model" / "config.json").read_text())
    assert config["model_type"] == "slimnas_llama" and config["per_layer_config"]["2"]["skip"] == ["mlp"]
    before = AutoModelForCausalLM.from_pretrained(pruned)
    after = AutoModelForCausalLM.from_pretrained(distilled / "model").eval()
    expected = shape((96, 4, 2), (40, 2, 1), (0, 2, 2), hidden=48)
    assert architecture_of(after.config) == architecture_of(before.config) == expected
    trained = after.state_dict()
    assert any(not torch.equal(value, trained[name]) for name, value in before.state_dict().items())
    bench = ["bench", teacher, f"model={distilled / 'model'}", f"out={tmp_path / 'bench'}", "quality.tasks=[]"]
    assert main([*bench, "measure_speed=false", "measure_memory=false", *FAST]) == 0
    heldout = json.loads((tmp_path / "bench" / "heldout.json").read_text())[0]
    assert heldout["kl"] == pytest.approx(evaluations[-1], rel=1e-4)  # the checkpoint is the trained student


def equivalent_pair(**overrides):
    """A per-layer student of the teacher's hidden size and the teacher with what it removed zeroed: the same
    function (logits within 1e-5), one as the per-layer modeling, one as the plain family."""
    teacher = tiny_model(num_hidden_layers=5, vocab_size=VOCAB, **overrides)
    tokens = calibration(VOCAB)
    target = PerLayerArchitecture(64, MIXED.layers)
    importance = compute_importance(teacher, tokens, SETTINGS)
    plan = plan_pruning(importance, teacher.config, target)
    student = prune_model(teacher, plan, target)
    assert type(student).__name__ == "SlimnasLlamaForCausalLM"
    return student, zeroed_teacher(teacher, plan, target)


@needs_data
def test_heldout_kl_and_lm_eval_in_memory_score_a_per_layer_student_as_its_uniform_equivalent(tmp_path):
    student, equivalent = equivalent_pair(max_position_embeddings=512)
    reference = tiny_model(seed=1, num_hidden_layers=2, vocab_size=VOCAB)
    rows = torch.randint(3, VOCAB, (6, 20), generator=torch.Generator().manual_seed(0))
    heldout = HeldoutSet("evaluation", rows, reference, "fp32", batch_size=4)
    metrics, expected = heldout.evaluate(student), heldout.evaluate(equivalent)
    assert metrics.kl > 0.01
    assert metrics.kl_per_doc == pytest.approx(expected.kl_per_doc, abs=1e-5)
    assert metrics.nll_per_doc == pytest.approx(expected.nll_per_doc, rel=1e-5)
    with torch.no_grad():  # and a direct full-vocabulary KL to the reference
        log_p = F.log_softmax(reference(rows).logits, -1)
        log_q = F.log_softmax(student(rows).logits, -1)
    assert metrics.kl_per_doc == pytest.approx((log_p.exp() * (log_p - log_q)).sum(-1).mean(1).tolist(), abs=1e-4)

    suite = prepare_suite(["piqa"], str(SHARED_DATA))
    quality = QualitySettings(limit=4)
    scores = [
        {(r.task, r.metric): (r.value, r.n) for r in score_model(model, tiny_tokenizer(VOCAB), suite, quality,
                                                                 "evaluation", precision="fp32")}
        for model in (student, equivalent)
    ]  # fmt: skip
    assert scores[0].keys() == scores[1].keys() == {("piqa", "acc"), ("piqa", "acc_norm")}
    for key, (value, n) in scores[0].items():
        assert n == scores[1][key][1] and value == pytest.approx(scores[1][key][0], rel=1e-4), key


def test_speed_flops_and_memory_of_a_per_layer_student(tmp_path):
    teacher = tiny_model(num_hidden_layers=5, vocab_size=VOCAB, max_position_embeddings=256)
    student, _ = cut(teacher, calibration(VOCAB), MIXED)
    settings = SpeedSettings(prompt_len=16, new_tokens=4, repeats=2, precision="fp32", retimes=0)
    comparison = compare_speed(student, teacher, settings, "per-layer", "teacher")
    assert comparison.model.params == param_count(teacher.config, MIXED) == sum(p.numel() for p in student.parameters())
    assert comparison.model.flops_per_token == flops_per_token(teacher.config, 16, MIXED)  # from the per-layer shape
    assert comparison.flops_reduction == flops_per_token(teacher.config, 16) / flops_per_token(
        teacher.config, 16, MIXED
    )
    assert comparison.flops_reduction > 1.5 and comparison.model.decode_tokens_per_s > 0

    save_checkpoint(student, tiny_tokenizer(VOCAB), tmp_path / "student", {"note": "test"})
    memory = measure_memory(str(tmp_path / "student"), settings, torch.device("cpu"))  # loaded in a fresh process
    buffers = sum(b.numel() * b.element_size() for b in student.buffers())  # RoPE's frequencies
    assert memory.weight_bytes == 4 * param_count(teacher.config, MIXED) + buffers
    assert memory.weight_bytes <= memory.peak_bytes < memory.weight_bytes + 24 * 2**20


def test_a_compiled_per_layer_student_captures_one_graph_and_gives_the_same_logits_with_and_without_a_cache():
    """fullgraph=True: dynamo traces the whole model (removed attention and MLP, a layer without a cache entry)
    with no graph break, as it does the plain family. aot_eager runs the captured graph through AOTAutograd
    without generating C++ (inductor's compile of the same graph takes a minute on a CPU)."""
    teacher = tiny_model(num_hidden_layers=5)
    tokens = calibration()[:2]
    student, _ = cut(teacher, calibration(), MIXED)
    torch._dynamo.reset()
    compiled = torch.compile(student, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        eager, graph = student(tokens, use_cache=True), compiled(tokens, use_cache=True)
        assert torch.equal(graph.logits, eager.logits)
        next_token = eager.logits[:, -1:].argmax(-1)
        step = compiled(next_token, cache=graph.cache, use_cache=True).logits
        assert torch.equal(step, student(next_token, cache=eager.cache, use_cache=True).logits)


def test_a_per_layer_students_card_has_its_shape_by_layer_as_a_table_and_a_plot(tmp_path):
    from matplotlib.image import imread
    from test_model_card import ARCH, record

    from slimnas.retrain.model_card import WIDTHS_PLOT, Lineage, save_model_card

    teacher_arch = {"hidden_size": 64, "intermediate_size": 96, "num_attention_heads": 4, "num_key_value_heads": 2,
                    "num_hidden_layers": 5}  # fmt: skip
    student = replace(record("0003", "c.jsonl"), architecture=MIXED.as_dict())
    teacher = replace(record("teacher", "c.jsonl"), architecture=teacher_arch)
    save_model_card(student, teacher, Lineage.of("smollm2-135m"), {"layers": [0, 1, 2, 3]}, tmp_path / "mixed")
    text = (tmp_path / "mixed" / "README.md").read_text()
    assert "after `import slimnas.models`" in text and "with no other code" not in text
    assert "| hidden / FFN | 48 / 0-96 by layer | 64 / 96 |" in text and "| layers | 4 | 5 |" in text
    table = text.split("## Shape by layer")[1].split("![widths by layer]")[0].strip().splitlines()[2:]
    assert table == [
        "| 0 | 4 / 2 of 4 / 2 | 96 of 96 |",
        "| 1 | 2 / 1 of 4 / 2 | 40 of 96 |",
        "| 2 | removed | 64 of 96 |",
        "| 3 | 2 / 2 of 4 / 2 | removed |",
        "| 4 | dropped | dropped |",
    ]
    assert f"![widths by layer]({WIDTHS_PLOT})" in text
    height, width, _ = imread(tmp_path / "mixed" / WIDTHS_PLOT).shape
    assert (width, height) == (700, 400)

    uniform = replace(record("0003", "c.jsonl"), architecture=ARCH)
    save_model_card(uniform, replace(teacher, architecture=ARCH), Lineage.of("smollm2-135m"), {"layers": [0, 1]},
                    tmp_path / "uniform")  # fmt: skip
    text = (tmp_path / "uniform" / "README.md").read_text()
    assert "| hidden / FFN | 48 / 64 | 48 / 64 |" in text and "loads it with no other code" in text
    assert "Shape by layer" not in text and "slimnas.models" not in text
    assert not (tmp_path / "uniform" / WIDTHS_PLOT).exists()
