"""Integration on the real SmolLM2-135M teacher with tiny budgets."""

import json
import math

import pytest
import torch
from conftest import SHARED_DATA, needs_data
from transformers import AutoModelForCausalLM, AutoTokenizer

from slimnas.cli import main
from slimnas.compress.importance import perplexity
from slimnas.compress.models import DEFAULT_TEACHER, load_model

pytestmark = [pytest.mark.real, needs_data]


def wikitext_tokens(tokenizer, n_tokens: int = 1024, seq_len: int = 256) -> torch.Tensor:
    text = (SHARED_DATA / "wikitext2" / "wiki.valid.tokens").read_text()[:20_000]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:n_tokens]
    return torch.tensor(ids).view(-1, seq_len)


def test_prune_smollm2_to_60_percent_export_reload_and_score_wikitext(tmp_path):
    out = tmp_path / "smollm2-60"
    overrides = ["importance.n_samples=16", "target.num_hidden_layers=20", "target.intermediate_size=1024"]
    assert main(["prune", f"out={out}", "data.evaluation_docs=8", "data.selection_docs=8", *overrides]) == 0

    student = AutoModelForCausalLM.from_pretrained(out).eval()  # plain transformers, no project code
    tokenizer = AutoTokenizer.from_pretrained(out)
    teacher = load_model(DEFAULT_TEACHER)
    fraction = sum(p.numel() for p in student.parameters()) / sum(p.numel() for p in teacher.model.parameters())
    assert 0.55 < fraction < 0.65
    record = json.loads((out / "slimnas.json").read_text())
    assert record["corpus"]["source"].endswith("wiki_en_core.jsonl")  # the default corpus where the data has it
    assert record["heldout"]["pruned"]["kl"] > record["heldout"]["teacher"]["kl"] == pytest.approx(0, abs=1e-3)

    tokens = wikitext_tokens(tokenizer)
    teacher_ppl, student_ppl = perplexity(teacher.model, tokens), perplexity(student, tokens)
    assert math.isfinite(student_ppl) and math.isfinite(teacher_ppl)
    assert 5 < teacher_ppl < 100 and student_ppl > teacher_ppl


def test_smollm2_scores_above_chance_on_piqa_and_arc_easy_offline(tmp_path):
    from slimnas.bench.quality import score_model
    from slimnas.bench.settings import QualitySettings
    from slimnas.bench.tasks import prepare_suite

    teacher = load_model(DEFAULT_TEACHER)
    suite = prepare_suite(["piqa", "arc_easy_dev"], None)
    quality = QualitySettings(tasks=["piqa", "arc_easy_dev"], limit=150)
    records = score_model(teacher.model, teacher.tokenizer, suite, quality, "evaluation", log_to=tmp_path / "log")
    # Above chance with ~95% confidence on 150 evaluation-pool documents (measured: piqa acc_norm 0.62 +- 0.04,
    # arc_easy acc 0.56 +- 0.04); 40 documents were too few (piqa acc 0.475 on one draw).
    lower = {(r.task, r.metric): r.value - 2 * r.stderr for r in records}
    assert lower["piqa", "acc_norm"] > 0.5 and lower["arc_easy_dev", "acc"] > 0.25
    assert all(r.pool == "evaluation" and r.n == 150 for r in records)
