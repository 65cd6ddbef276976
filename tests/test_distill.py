import copy
import json
import pickle
import signal

import pytest
import torch
from conftest import matched_outputs, tiny_model, tiny_tokenizer

from slimnas.compress.arch import Architecture
from slimnas.compress.corpus import load_corpus
from slimnas.compress.distill import HiddenStateMatch, build_distiller, distill_to_budget
from slimnas.compress.heldout import HeldoutSet
from slimnas.compress.importance import compute_importance
from slimnas.compress.kd_loss import LiveTarget, next_token_labels, token_losses
from slimnas.compress.models import LoadedModel
from slimnas.compress.prune import PrunePlan, plan_pruning, prune_model
from slimnas.compress.settings import BUILTIN, DataSettings, DistillSettings, ImportanceSettings
from slimnas.compress.teacher_targets import MAX_CACHE_BYTES, TopKLogitCache
from slimnas.core import interrupt
from slimnas.core.errors import SlimnasError
from slimnas.core.rundir import STATE_FILE

VOCAB = 300
IDENTITY = {"student": "s", "teacher": "t", "corpus": "c"}


@pytest.fixture(scope="module")
def data():
    return load_corpus(
        tiny_tokenizer(VOCAB), DataSettings(corpus=BUILTIN, seq_len=32, selection_docs=8, evaluation_docs=8)
    )


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
    values = dict(batch_size=4, lr=2e-3, precision="fp32", eval_every=1000, save_every=1000, top_k=VOCAB)
    values.update(overrides)
    return DistillSettings(**values)


def distiller(teacher, student, data, run_settings, cache_dir, cut=None):
    """The KD run the commands build, to the settings' budget (slimnas distill's: distill.budget_tokens)."""
    loaded = LoadedModel(teacher, None, "teacher", "test")
    return build_distiller(student, loaded, data.train, run_settings, run_settings.budget_tokens, cache_dir, cut)


def evaluation(teacher, data):
    return HeldoutSet("evaluation", data.evaluation, teacher, "fp32")


def test_kd_lowers_heldout_kl_substantially(data, tmp_path):
    teacher = sharp_teacher()
    student = pruned_student(teacher, data.train)
    kd = distiller(teacher, student, data, settings(budget_tokens=300 * 4 * 32), tmp_path)
    result = distill_to_budget(kd, evaluation(teacher, data), tmp_path / "run", IDENTITY, progress_bar=False)
    assert result.steps == 300
    assert result.final["kl"] < 0.5 * result.initial["kl"]
    assert result.final["perplexity"] < result.initial["perplexity"]
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["step"] == 0 and "heldout" in lines[0] and lines[-1]["step"] == 300


class InterruptAt:
    """Teacher targets that deliver a Ctrl-C swallowed the way Python swallows one in a weakref callback."""

    def __init__(self, targets, call: int):
        self.inner, self.calls, self.call = targets, 0, call

    def prepare(self, n_rows):
        self.inner.prepare(n_rows)

    def targets(self, rows, input_ids):
        self.calls += 1
        if self.calls == self.call:
            try:
                signal.raise_signal(signal.SIGINT)
            except KeyboardInterrupt:
                pass
        return self.inner.targets(rows, input_ids)


@pytest.fixture
def sigint_flag():
    previous = signal.getsignal(signal.SIGINT)
    interrupt.install()
    yield
    interrupt.install()  # clears the flag for the tests that follow
    signal.signal(signal.SIGINT, previous)


def test_interrupt_and_resume_give_the_same_final_weights(data, tmp_path, sigint_flag):
    teacher = sharp_teacher()
    student = pruned_student(teacher, data.train)
    run_settings = settings(budget_tokens=12 * 4 * 32, save_every=4, eval_every=4, top_k=16)
    heldout = evaluation(teacher, data)
    reference = copy.deepcopy(student)
    distill_to_budget(distiller(teacher, reference, data, run_settings, tmp_path), heldout, tmp_path / "a", IDENTITY)

    interrupted = distiller(teacher, copy.deepcopy(student), data, run_settings, tmp_path)
    interrupted.teacher_targets = InterruptAt(interrupted.teacher_targets, call=7)
    with pytest.raises(KeyboardInterrupt):
        distill_to_budget(interrupted, heldout, tmp_path / "b", IDENTITY)
    interrupt.install()  # a fresh process starts with no Ctrl-C pending
    resumed = copy.deepcopy(student)  # and from the pruned weights again
    distill_to_budget(distiller(teacher, resumed, data, run_settings, tmp_path), heldout, tmp_path / "b", IDENTITY)
    for (name, expected), actual in zip(reference.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(expected, actual), name
    steps = [json.loads(line)["step"] for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps[-1] == 12


class Payload:
    def __reduce__(self):
        import pathlib

        return (pathlib.Path.write_text, (pathlib.Path("/tmp/slimnas-pwned"), "ran"))


def test_a_tampered_resume_file_is_refused_without_running_its_code(data, tmp_path):
    teacher = sharp_teacher()
    out = tmp_path / "run"
    out.mkdir()
    (out / STATE_FILE).write_bytes(pickle.dumps(Payload()))
    marker = __import__("pathlib").Path("/tmp/slimnas-pwned")
    marker.unlink(missing_ok=True)
    kd = distiller(teacher, pruned_student(teacher, data.train), data, settings(budget_tokens=512), tmp_path)
    with pytest.raises(SlimnasError, match="corrupt or foreign resume state"):
        distill_to_budget(kd, evaluation(teacher, data), out, IDENTITY)
    assert not marker.exists()


def test_a_checkpoint_of_another_run_is_refused(data, tmp_path):
    teacher = sharp_teacher()
    run_settings = settings(budget_tokens=4 * 4 * 32, save_every=2)
    kd = distiller(teacher, pruned_student(teacher, data.train), data, run_settings, tmp_path)
    distill_to_budget(kd, evaluation(teacher, data), tmp_path / "run", IDENTITY, progress_bar=False)
    other_student = distiller(teacher, pruned_student(teacher, data.train), data, run_settings, tmp_path)
    with pytest.raises(SlimnasError, match="another student, teacher, corpus or settings"):
        distill_to_budget(other_student, evaluation(teacher, data), tmp_path / "run", {**IDENTITY, "student": "x"})


class PoisonAt(InterruptAt):
    def __init__(self, targets, call, student):
        super().__init__(targets, call)
        self.student = student

    def targets(self, rows, input_ids):
        self.calls += 1
        if self.calls == self.call:
            with torch.no_grad():
                self.student.model.layers[0].mlp.up_proj.weight.fill_(float("nan"))
        return self.inner.targets(rows, input_ids)


def test_non_finite_loss_stops_with_a_clear_error_and_keeps_the_last_checkpoint(data, tmp_path):
    teacher = sharp_teacher()
    student = pruned_student(teacher, data.train)
    kd = distiller(teacher, student, data, settings(budget_tokens=10 * 4 * 32, save_every=2), tmp_path)
    kd.teacher_targets = PoisonAt(kd.teacher_targets, call=4, student=student)
    with pytest.raises(SlimnasError, match="non-finite loss at step 4; the last good checkpoint is kept"):
        distill_to_budget(kd, evaluation(teacher, data), tmp_path / "nan", IDENTITY, progress_bar=False)
    resumed = distiller(
        teacher, pruned_student(teacher, data.train), data, settings(budget_tokens=10 * 4 * 32, save_every=2), tmp_path
    )
    resumed.load(tmp_path / "nan" / STATE_FILE, kd_key(resumed))
    assert resumed.step == 2 and all(torch.isfinite(p).all() for p in resumed.student.parameters())


def kd_key(kd):
    from dataclasses import asdict

    from slimnas.core.files import hash_json

    return hash_json([IDENTITY, asdict(kd.settings)])


def dead_channel_teacher():
    teacher = tiny_model(vocab_size=VOCAB)
    with torch.no_grad():
        teacher.model.embed_tokens.weight[:, 3] = 0
        for layer in teacher.model.layers:
            layer.self_attn.o_proj.weight[3] = 0
            layer.mlp.down_proj.weight[3] = 0
    return teacher


def test_hidden_state_maps_start_where_each_student_channel_came_from(data):
    """A student that kept all of the teacher's signal has zero hidden-state loss before any training."""
    teacher = dead_channel_teacher()
    channels = [c for c in range(64) if c != 3]  # not a prefix: the channels after 3 shift by one
    plan = PrunePlan(list(range(4)), channels, [[0, 1, 2, 3]] * 4, [[0, 1]] * 4, [list(range(96))] * 4)
    student = prune_model(teacher, plan, Architecture(63, 96, 4, 2, 4))
    match = HiddenStateMatch.build((1, -1), plan.layers, plan.channels, teacher_hidden=64)
    prefix = HiddenStateMatch.build((1, -1), plan.layers, list(range(63)), teacher_hidden=64)  # the old eye map
    rows = data.train[:4]
    student_out, teacher_out = matched_outputs(student, teacher, match, rows)
    assert match.pairs == [(1, 1), (3, 3)]
    assert match.loss(student_out, teacher_out).item() < 1e-6
    assert prefix.loss(student_out, teacher_out).item() > 0.1


def test_hidden_state_loss_with_learned_map_trains(data, tmp_path):
    teacher = sharp_teacher()
    importance = compute_importance(teacher, data.train[:16], ImportanceSettings(n_samples=16, precision="fp32"))
    target = Architecture(48, 48, 2, 1, 2)
    plan = plan_pruning(importance, teacher.config, target)
    student = prune_model(teacher, plan, target)
    run_settings = settings(budget_tokens=40 * 4 * 32, teacher_mode="live", hidden_weight=1.0, hidden_layers=(0, -1))
    kd = distiller(teacher, student, data, run_settings, tmp_path, cut=(plan.layers, plan.channels))
    result = distill_to_budget(kd, evaluation(teacher, data), tmp_path / "hidden", IDENTITY, progress_bar=False)
    lines = [json.loads(line) for line in (tmp_path / "hidden" / "metrics.jsonl").read_text().splitlines()]
    hidden = [line["train_hidden"] for line in lines if "train_hidden" in line]
    first, last = sum(hidden[:8]) / 8, sum(hidden[-8:]) / 8  # one batch a step: compare the ends, not two steps
    assert first > 0 and last < 0.95 * first, (first, last)
    assert result.final["kl"] < result.initial["kl"]


def test_hidden_loss_needs_live_teacher():
    with pytest.raises(SlimnasError, match="teacher_mode=live"):
        DistillSettings(hidden_weight=1.0, hidden_layers=(0,))


@pytest.mark.parametrize("top_k, tolerance", [(VOCAB, 0.005), (32, 0.05)])
def test_cached_teacher_loss_matches_live_teacher_loss(data, tmp_path, top_k, tolerance):
    teacher = sharp_teacher()
    student = pruned_student(teacher, data.train)
    rows = torch.arange(4)
    cache = TopKLogitCache.open(tmp_path, "teacher", data.train[:8], top_k, 1.0, VOCAB, "fp32")
    cache.ensure(8, teacher, precision="fp32")
    input_ids = data.train[rows]
    with torch.no_grad():
        hidden = student.model(input_ids=input_ids).last_hidden_state.flatten(0, 1)
        live_hidden = teacher.model(input_ids=input_ids).last_hidden_state.flatten(0, 1)
        labels = next_token_labels(input_ids).flatten()
        live = token_losses(hidden, student.lm_head, labels, LiveTarget(live_hidden, teacher.lm_head))[0].mean()
        cached = token_losses(hidden, student.lm_head, labels, cache.target(rows))[0].mean()
    assert float(cached) == pytest.approx(float(live), rel=tolerance)
    assert float(cached) <= float(live) * (1 + 1e-3)  # a lower bound of the full KL


def test_the_cache_grows_for_a_longer_run_and_keeps_what_it_had(data, tmp_path):
    teacher = sharp_teacher()
    cache = TopKLogitCache.open(tmp_path, "teacher", data.train[:64], 8, 1.0, VOCAB, "fp32")
    cache.ensure(4, teacher, precision="fp32")
    first = cache.target(torch.arange(4))
    cache.ensure(40, teacher, precision="fp32")
    assert cache.filled == 40
    again = cache.target(torch.arange(4))
    assert torch.equal(first.values, again.values) and torch.equal(first.indices, again.indices)


def test_a_cache_too_large_is_refused_before_anything_is_written(data, tmp_path):
    rows = torch.zeros(2 * MAX_CACHE_BYTES // (32 * VOCAB * 4), 32, dtype=torch.int64)
    cache = TopKLogitCache.open(tmp_path, "teacher", rows, VOCAB, 1.0, VOCAB, "fp32")
    with pytest.raises(SlimnasError, match="GiB: lower distill.top_k or use distill.teacher_mode=live"):
        cache.ensure(len(rows), sharp_teacher(), precision="fp32")
    assert not (cache.directory / "values.npy").exists()
