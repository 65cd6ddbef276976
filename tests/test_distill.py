import copy
import json
import signal

import pytest
import torch
from conftest import tiny_model, tiny_tokenizer

from compress import interrupt
from compress.arch import Architecture
from compress.corpus import token_split
from compress.distill import STATE_FILE, Distiller, DistillSettings, teacher_source
from compress.errors import SlimnasError
from compress.importance import ImportanceSettings, compute_importance
from compress.kd_loss import LiveTarget, distillation_losses, next_token_labels
from compress.models import LoadedModel
from compress.prune import plan_pruning, prune_model
from compress.teacher_cache import TeacherLogitCache

VOCAB = 300


@pytest.fixture(scope="module")
def data():
    return token_split("builtin", tiny_tokenizer(VOCAB), seq_len=32, heldout_fraction=0.05)


def sharp_teacher():
    """A random teacher with peaked next-token distributions, so a pruned student starts far from it."""
    teacher = tiny_model(vocab_size=VOCAB, tie_word_embeddings=False)
    with torch.no_grad():
        teacher.lm_head.weight.mul_(25)
    return teacher


def pruned_student(teacher, rows):
    importance = compute_importance(teacher, rows[:16], ImportanceSettings(n_samples=16, precision="fp32"))
    target = Architecture(
        hidden_size=48, intermediate_size=48, num_attention_heads=2, num_key_value_heads=1, num_hidden_layers=2
    )
    return prune_model(teacher, plan_pruning(importance, teacher.config, target), target)


def settings(**overrides):
    values = dict(batch_size=4, lr=2e-3, precision="fp32", eval_every=1000, save_every=1000, eval_rows=8, top_k=VOCAB)
    values.update(overrides)
    return DistillSettings(**values)


def distiller(teacher, student, data, run_settings, out, cache_dir):
    source = teacher_source(LoadedModel(teacher, None, "teacher", "test"), data, run_settings, cache_dir)
    return Distiller(student, source, data.train, data.heldout, run_settings, out, teacher.config.hidden_size)


def test_kd_lowers_heldout_kl_substantially(data, tmp_path):
    teacher = sharp_teacher()
    student = pruned_student(teacher, data.train)
    result = distiller(teacher, student, data, settings(budget_tokens=300 * 4 * 32), tmp_path / "run", tmp_path).run()
    assert result.steps == 300
    assert result.final["heldout_kl"] < 0.5 * result.initial["heldout_kl"]
    assert result.final["heldout_perplexity"] < result.initial["heldout_perplexity"]
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["step"] == 0 and "heldout_kl" in lines[0] and lines[-1]["step"] == 300


@pytest.fixture
def sigint_flag():
    previous = signal.getsignal(signal.SIGINT)
    interrupt.install()
    yield
    interrupt.install()  # clears the flag for the tests that follow
    signal.signal(signal.SIGINT, previous)


def test_interrupt_and_resume_gives_the_same_final_weights(data, tmp_path, sigint_flag):
    teacher = sharp_teacher()
    student = pruned_student(teacher, data.train)
    run_settings = settings(budget_tokens=12 * 4 * 32, save_every=4, top_k=16)
    reference = copy.deepcopy(student)
    distiller(teacher, reference, data, run_settings, tmp_path / "straight", tmp_path).run()

    def lost_ctrl_c(step, metrics):
        if step == 6:
            try:
                signal.raise_signal(signal.SIGINT)
            except KeyboardInterrupt:
                pass  # what Python does to an exception raised in a weakref callback or __del__

    interrupted = copy.deepcopy(student)
    with pytest.raises(KeyboardInterrupt):
        distiller(teacher, interrupted, data, run_settings, tmp_path / "resumed", tmp_path).run(on_step=lost_ctrl_c)
    assert torch.load(tmp_path / "resumed" / STATE_FILE, weights_only=False)["step"] == 4
    interrupt.install()  # a fresh process starts with no Ctrl-C pending
    resumed = copy.deepcopy(student)  # and from the pruned weights again
    distiller(teacher, resumed, data, run_settings, tmp_path / "resumed", tmp_path).run()
    for (name, expected), actual in zip(reference.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(expected, actual), name
    steps = [json.loads(line)["step"] for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps[-1] == 12


@pytest.mark.parametrize("top_k, tolerance", [(VOCAB, 0.005), (32, 0.05)])
def test_cached_teacher_loss_matches_live_teacher_loss(data, tmp_path, top_k, tolerance):
    teacher = sharp_teacher()
    student = pruned_student(teacher, data.train)
    rows = torch.arange(4)
    cache = TeacherLogitCache.open(tmp_path, "teacher", data.train[:8], top_k, 1.0, VOCAB)
    cache.ensure(8, teacher, precision="fp32")
    input_ids = data.train[rows]
    with torch.no_grad():
        hidden = student.model(input_ids=input_ids).last_hidden_state.flatten(0, 1)
        live_hidden = teacher.model(input_ids=input_ids).last_hidden_state.flatten(0, 1)
        labels = next_token_labels(input_ids).flatten()
        live, _ = distillation_losses(hidden, student.lm_head, labels, LiveTarget(live_hidden, teacher.lm_head))
        cached, _ = distillation_losses(hidden, student.lm_head, labels, cache.target(rows))
    assert float(cached) == pytest.approx(float(live), rel=tolerance)


def test_chunked_loss_and_gradient_equal_the_unchunked_ones():
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False)
    teacher_head = torch.nn.Linear(16, 50, bias=False)
    hidden = torch.randn(37, 16, requires_grad=True)
    target = LiveTarget(torch.randn(37, 16), teacher_head)
    labels = torch.randint(0, 50, (37,))
    gradients, losses = [], []
    for chunk in (5, 1000):
        hidden.grad = None
        kl, ce = distillation_losses(hidden, head, labels, target, temperature=2.0, chunk_tokens=chunk)
        (kl + ce).backward()
        losses.append((kl.item(), ce.item()))
        gradients.append(hidden.grad.clone())
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    torch.testing.assert_close(gradients[0], gradients[1])


def test_non_finite_loss_stops_with_a_clear_error_and_keeps_the_last_checkpoint(data, tmp_path):
    teacher = sharp_teacher()
    student = pruned_student(teacher, data.train)
    run = distiller(
        teacher, student, data, settings(budget_tokens=10 * 4 * 32, save_every=2), tmp_path / "nan", tmp_path
    )

    def poison(step, metrics):
        if step == 3:
            with torch.no_grad():
                student.model.layers[0].mlp.up_proj.weight.fill_(float("nan"))

    with pytest.raises(SlimnasError, match="non-finite loss at step 4"):
        run.run(on_step=poison)
    state = torch.load(tmp_path / "nan" / STATE_FILE, weights_only=False)
    assert state["step"] == 2
    assert all(torch.isfinite(t).all() for t in state["model"].values())


def test_hidden_state_loss_with_learned_map_trains(data, tmp_path):
    teacher = sharp_teacher()
    student = pruned_student(teacher, data.train)
    run_settings = settings(
        budget_tokens=40 * 4 * 32, teacher_mode="live", hidden_weight=1.0, hidden_layers=((0, 1), (1, 3))
    )
    result = distiller(teacher, student, data, run_settings, tmp_path / "hidden", tmp_path).run()
    lines = [json.loads(line) for line in (tmp_path / "hidden" / "metrics.jsonl").read_text().splitlines()]
    hidden = [line["hidden"] for line in lines if "hidden" in line]
    assert hidden[0] > 0 and hidden[-1] < 0.7 * hidden[0]
    assert result.final["heldout_kl"] < result.initial["heldout_kl"]


def test_hidden_loss_needs_live_teacher():
    with pytest.raises(SlimnasError, match="teacher_mode=live"):
        DistillSettings(hidden_weight=1.0, hidden_layers=((0, 1),))
