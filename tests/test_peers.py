"""The peer benchmark (slimnas.bench.peers, bench.roofline): slimnas's Distiller against TRL's GKDTrainer on one job.

Tiny random models and a few hundred tokens: the arms must run the same job (the guard refuses any that would not,
before anything is timed), reach the same held-out KL (the same forward KL on the same rows, schedule and
optimizer), and the FLOPs accounting must charge the teacher's forward to live arms only.
"""

import json
import math
from dataclasses import replace

import pytest
import torch
from conftest import save_tiny_checkpoint, tiny_config, tiny_model, tiny_tokenizer
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoConfig

from slimnas.bench import peers
from slimnas.bench.roofline import PHASES, head_flops, heldout_flops, kd_step_flops
from slimnas.compress.arch import flops_per_token, param_count
from slimnas.compress.corpus import load_corpus
from slimnas.compress.heldout import HeldoutSet
from slimnas.compress.importance import compute_importance
from slimnas.compress.kd_loss import LiveTarget, token_losses
from slimnas.compress.models import LoadedModel
from slimnas.compress.prune import plan_pruning, prune_model
from slimnas.compress.settings import BUILTIN, DataSettings, DistillSettings, ImportanceSettings
from slimnas.core.errors import SlimnasError

VOCAB = 300
STEPS, BATCH, SEQ_LEN = 8, 2, 32
NO_TRL = "trl is not installed: pip install 'slimnas[peers]' (trl==1.16.0)"


def needs_trl():
    pytest.importorskip("trl", reason=NO_TRL)


@pytest.fixture(scope="module")
def setup():
    """A sharp random teacher (a student cut from it starts far from it), its 60% uniform cut, the built-in corpus."""
    tokenizer = tiny_tokenizer(VOCAB)
    data = load_corpus(tokenizer, DataSettings(corpus=BUILTIN, seq_len=SEQ_LEN, selection_docs=8, evaluation_docs=8))
    teacher = tiny_model(vocab_size=VOCAB, tie_word_embeddings=False)
    with torch.no_grad():
        teacher.lm_head.weight.mul_(25)
    importance = compute_importance(teacher, data.train[:16], ImportanceSettings(n_samples=16, precision="fp32"))
    target = peers.uniform_cut(teacher.config, 0.6)
    student = prune_model(teacher, plan_pruning(importance, teacher.config, target), target)
    settings = DistillSettings(batch_size=BATCH, lr=1e-3, precision="fp32", top_k=VOCAB)  # top-k = all: the full KL
    job = peers.Job(
        LoadedModel(teacher, tokenizer, "tiny", "tiny"), student, data.train, settings, STEPS * BATCH * SEQ_LEN
    )
    return job, HeldoutSet("evaluation", data.evaluation, teacher, "fp32")


def available_arms() -> list[str]:
    try:
        import trl  # noqa: F401
    except ImportError:
        return [arm for arm in peers.ARMS if arm != peers.TRL]
    return list(peers.ARMS)


def test_uniform_cut_is_one_ratio_near_the_parameter_share():
    smollm2 = AutoConfig.for_model(
        "llama", hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
        num_hidden_layers=30, vocab_size=49152, tie_word_embeddings=True,
    )  # fmt: skip
    cut = peers.uniform_cut(smollm2, 0.6)
    assert param_count(smollm2, cut) / param_count(smollm2) == pytest.approx(0.6, abs=0.02)
    ratios = cut.ratios(type(cut).of(smollm2))
    assert max(ratios.values()) - min(ratios.values()) < 0.25  # KV groups come in thirds: the rest near one ratio
    assert cut.hidden_size % 32 == 0 and cut.intermediate_size % 32 == 0
    assert cut.num_attention_heads % cut.num_key_value_heads == 0


def test_trl_gkd_loss_at_beta_0_is_slimnas_forward_kl_over_the_whole_vocabulary(monkeypatch):
    """GKDTrainer.generalized_jsd_loss(beta=0) against compress.kd_loss's live (full-vocabulary) KL: the same number."""
    needs_trl()
    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")  # experimental, as bench.peers says
    from trl.experimental.gkd import GKDTrainer

    torch.manual_seed(0)
    student_hidden, teacher_hidden = torch.randn(40, 16), torch.randn(40, 24)
    student_head, teacher_head = torch.nn.Linear(16, VOCAB, bias=False), torch.nn.Linear(24, VOCAB, bias=False)
    with torch.no_grad():
        kl, _ = token_losses(
            student_hidden, student_head, torch.zeros(40, dtype=torch.long), LiveTarget(teacher_hidden, teacher_head)
        )
        trl = GKDTrainer.generalized_jsd_loss(
            student_head(student_hidden)[None], teacher_head(teacher_hidden)[None], labels=torch.zeros(1, 40), beta=0.0
        )
    assert kl.mean().item() > 0.1
    assert trl.item() == pytest.approx(kl.mean().item(), rel=1e-5)


def test_the_guard_refuses_arms_that_would_not_run_the_same_job(setup, tmp_path):
    job, _ = setup
    arms = available_arms()
    plans = [peers.build_arm(name, job, tmp_path / name).plan() for name in arms]
    peers.check_equal_settings(plans)  # the same job: accepted
    assert plans[0].tokens == STEPS * BATCH * SEQ_LEN and len(plans[0].schedule) == STEPS
    other = arms[-1]  # TRL's when it is installed
    changes = {
        "tokens": replace(job, tokens=2 * job.tokens),
        "batch_size": replace(job, settings=replace(job.settings, batch_size=2 * BATCH)),
        "seq_len": replace(job, rows=job.rows[:, : SEQ_LEN // 2]),
        "schedule": replace(job, settings=replace(job.settings, lr=2e-3)),
        "rows": replace(job, settings=replace(job.settings, seed=1)),
    }
    for field, changed in changes.items():
        plan = peers.build_arm(other, changed, tmp_path / f"{other}-{field}").plan()
        with pytest.raises(SlimnasError, match=f"their {field} differ") as refused:
            peers.check_equal_settings([plans[0], plan])
        assert "\n" not in str(refused.value) and "refusing to compare" in str(refused.value)


def test_run_kd_refuses_before_timing_when_trl_would_see_other_rows(setup, monkeypatch):
    """TRL's dataset in another order than the Distiller's: read back from the built trainer, refused before any run."""
    needs_trl()
    job, evaluation = setup
    distiller_order = peers.Job.order
    monkeypatch.setattr(peers.Job, "order", lambda self: distiller_order(self).flip(0))  # only TRL's dataset uses it
    monkeypatch.setattr(peers, "timed_run", lambda *args: pytest.fail("timed a run of a refused comparison"))
    with pytest.raises(SlimnasError, match="slimnas-cache and trl-gkd would not run the same job: their rows differ"):
        peers.run_kd(job, evaluation, list(peers.ARMS), repeats=1)


def test_the_trl_arm_is_gkd_with_forward_kl_on_the_packed_rows(setup, tmp_path):
    needs_trl()
    job, _ = setup
    trainer = peers.build_arm(peers.TRL, job, tmp_path).trainer
    args = trainer.args
    assert (args.lmbda, args.beta, args.seq_kd, args.temperature) == (0.0, 0.0, False, 1.0)
    assert args.activation_checkpointing is False and args.train_sampling_strategy == "sequential"
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(BATCH)])
    assert torch.equal(batch["input_ids"], job.rows[job.order()[:BATCH]])
    assert batch["attention_mask"].all() and (batch["labels"][:, 1:] == batch["input_ids"][:, 1:]).all()


def test_all_arms_distil_to_the_same_kl_with_finite_speed_and_a_profile(setup):
    job, evaluation = setup
    arms = available_arms()
    initial = evaluation.evaluate(job.student).kl
    report = peers.run_kd(job, evaluation, arms, repeats=2)
    summary = {row["arm"]: row for row in report.summary}
    assert list(summary) == arms and len(report.runs) == 2 * len(arms)
    assert [run["arm"] for run in report.runs] == arms * 2  # A B C A B C
    for row in summary.values():
        assert math.isfinite(row["tokens_per_s"]) and row["tokens_per_s"] > 0 and row["repeats"] == 2
        # the MFU is the achieved rate over the peak measured in the same run; no bound: a peak timed while the
        # machine is busy (a parallel job) comes out low, and a tiny model's MFU then exceeds 1
        assert 0 < row["achieved_flops_per_s"] and math.isfinite(row["mfu"]) and row["mfu"] > 0
        assert row["achieved_flops_per_s"] == pytest.approx(row["mfu"] * report.peak["step_peak_flops_per_s"])
        assert row["peak_mib"] >= 0
        assert row["kl"] < 0.9 * initial  # every arm distils
    # One objective (forward KL over the whole vocabulary: the cache holds every logit here), rows, schedule and
    # optimizer: the arms end at the same KL
    reference = summary[arms[-1]]["kl"]
    for row in summary.values():
        assert row["kl"] == pytest.approx(reference, rel=0.03)
    if peers.TRL in arms:
        live = summary["slimnas-live"]
        assert live["vs_trl"] > 0 and abs(live["kl_minus_trl"]) < 0.03 * reference
    assert report.peak["bf16_flops_per_s"] > 0 and report.peak["fp32_flops_per_s"] > 0
    for arm in ("slimnas-cache", "slimnas-live"):
        phases = {row["phase"]: row for row in report.profile[arm]}
        assert set(phases) == {*PHASES, "other"}
        assert sum(row["share"] for row in phases.values()) == pytest.approx(1, abs=1e-6)
        assert phases["kd.backward"]["flops_per_s"] > 0 and phases["kd.optimizer"]["flops_per_s"] is None
    assert report.profile["slimnas-cache"][0]["flops_per_s"] is None  # a cache read multiplies nothing
    assert report.profile["slimnas-live"][0]["flops_per_s"] > 0  # the live teacher's forward
    text = peers.format_report(report)
    assert all(arm in text for arm in arms) and "MFU" in text


def test_the_teacher_forward_is_counted_for_live_arms_only(setup):
    job, _ = setup
    student, teacher = job.student.config, job.teacher.model.config
    flops = {name: peers.arm_flops(name, job).total for name in peers.ARMS}
    assert flops["slimnas-cache"] == 3 * flops_per_token(student, SEQ_LEN)
    assert flops["slimnas-live"] - flops["slimnas-cache"] == flops_per_token(teacher, SEQ_LEN)
    assert flops["trl-gkd"] == flops["slimnas-live"]
    # more positions than one loss chunk: slimnas recomputes the student's head in the backward
    assert kd_step_flops(student, None, SEQ_LEN, head_recomputed=True).total == flops["slimnas-cache"] + head_flops(
        student
    )


def test_the_command_writes_its_table_and_json_and_refuses_in_one_line(tmp_path, capsys, monkeypatch):
    needs_trl()
    teacher = save_tiny_checkpoint(tmp_path / "teacher", max_position_embeddings=64)
    out = tmp_path / "kd.json"
    common = ["--teacher", str(teacher), "--corpus", BUILTIN, "--seq-len", "32", "--batch", "2", "--precision", "fp32"]
    assert peers.main(["kd", *common, "--tokens", "128", "--repeats", "1", "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    assert [row["arm"] for row in record["summary"]] == list(peers.ARMS) and record["job"]["steps"] == 2
    assert "x TRL" in capsys.readouterr().out
    assert peers.main(["kd", *common, "--arms", "slimnas-cache,nccl"]) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0
    monkeypatch.setattr(
        peers.Job, "order", lambda self: torch.arange(len(self.rows)).repeat(8)[: 2 * self.steps].flip(0)
    )
    assert peers.main(["kd", *common, "--tokens", "128", "--out", str(tmp_path / "refused.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("slimnas: error: peers kd:") and "\n" not in err and not (tmp_path / "refused.json").exists()


def test_heldout_flops_are_the_hand_count_and_what_an_evaluation_multiplies():
    """3 documents of 10 tokens, the last 4 of each scored. Per layer of the tiny config (hidden 64, 4 query and 2 KV
    heads of 16, FFN 96): q 64x64, k and v 64x32, o 64x64, gate/up/down 3 x 64x96 = 30,720 weights, 2 FLOPs each,
    and QK^T + AV = 4 x 4 heads x 16 x 10 positions; the head 2 x 128 x 64, on the scored positions only."""
    config = tiny_config()
    layer = 2 * (64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 96) + 4 * 4 * 16 * 10
    flops = heldout_flops(config, documents=3, tokens=10, scored=4)
    assert flops.body == 4 * layer * 3 * 10 == 7_680_000
    assert flops.head == 2 * 128 * 64 * 3 * 4 == 196_608
    # what HeldoutSet.evaluate really multiplies (no teacher, the head once): torch's FLOP counter agrees
    teacher, student = tiny_model(), tiny_model(seed=1, num_hidden_layers=3, intermediate_size=64)
    student.set_attn_implementation("eager")  # the counter sees QK^T and AV as matmuls, not inside CPU SDPA
    rows = torch.randint(3, 128, (3, 10), generator=torch.Generator().manual_seed(0))
    scored = HeldoutSet("evaluation", rows, teacher, "fp32").subset(positions=4)
    with FlopCounterMode(display=False) as counter:
        scored.evaluate(student)
    assert counter.get_total_flops() == heldout_flops(student.config, 3, 10, 4).total


def test_the_roofline_command_times_the_screen_and_evaluation_against_the_peak(tmp_path, capsys):
    teacher = save_tiny_checkpoint(tmp_path / "teacher", max_position_embeddings=64)
    out = tmp_path / "roofline.json"
    common = ["--teacher", str(teacher), "--corpus", BUILTIN, "--seq-len", "32", "--heldout-tokens", "16"]
    assert peers.main(["roofline", *common, "--precision", "fp32", "--repeats", "2", "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    rows = {row["name"]: row for row in record["rows"]}
    assert list(rows) == ["screen", "evaluation", "teacher targets"]
    student = (
        AutoConfig.from_pretrained(teacher).to_dict()
        | peers.uniform_cut(AutoConfig.from_pretrained(teacher), 0.6).as_dict()
    )
    config = AutoConfig.for_model("llama", **{k: v for k, v in student.items() if k != "model_type"})
    documents, tokens = record["job"]["selection"]
    assert tokens == 16 and rows["screen"]["body_flops"] + rows["screen"]["head_flops"] == (
        heldout_flops(config, documents, tokens, tokens).total
    )
    for row in rows.values():
        assert len(row["seconds"]) == 2 and all(s > 0 for s in row["seconds"])
        assert math.isfinite(row["mfu"]) and 0 < row["mfu"] <= 1.5
        assert row["achieved_flops_per_s"] == pytest.approx(row["mfu"] * row["peak_flops_per_s"])
    assert 0 < rows["screen"]["prune_seconds"] < rows["screen"]["seconds_mean"]
    assert rows["evaluation"]["prune_seconds"] is None
    assert record["peak"]["fp32_flops_per_s"] > 0 and "MFU" in capsys.readouterr().out
    assert peers.main(["roofline", *common, "--repeats", "1", "--out", str(tmp_path / "refused.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert "--repeats must be at least 2" in err and "\n" not in err and not (tmp_path / "refused.json").exists()
