"""Integration on the real SmolLM2-135M teacher with tiny budgets."""

import json
import math

import pytest
import torch
from conftest import SHARED_DATA, needs_data
from test_llamacpp import assert_same_logits_in_llama_cpp, llama_cpp
from transformers import AutoModelForCausalLM, AutoTokenizer

from slimnas.cli import main
from slimnas.compress.export import export_gguf
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

    # llama.cpp runs the f32 export as `llama` with PyTorch's logits, and tokenises like transformers
    gguf_file = export_gguf(out, tmp_path / "smollm2-60.gguf", "f32")
    text = (SHARED_DATA / "wikitext2" / "wiki.valid.tokens").read_text()[:400]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:64]
    llm = llama_cpp().Llama(model_path=str(gguf_file), n_ctx=128, vocab_only=True, verbose=False)
    assert llm.tokenize(text.encode(), add_bos=False)[:64] == ids
    assert_same_logits_in_llama_cpp(gguf_file, student, ids, "SmolLM2 cut to 60%")


# Every third layer attention-free, FFNs narrowed per layer, KV groups 1-3 per layer, layer 29 dropped, 28 FFN-free.
PER_LAYER_TARGET = [
    "target.hidden_size=512",
    "target.intermediate_size=[" + ",".join(str(1536 - 32 * i) for i in range(28)) + ",0,0]",
    "target.num_attention_heads=[" + ",".join("0" if i % 3 == 2 else str(3 * (1 + i % 3)) for i in range(29)) + ",0]",
    "target.num_key_value_heads=[" + ",".join("0" if i % 3 == 2 else str(1 + i % 3) for i in range(29)) + ",0]",
]


def test_a_per_layer_smollm2_student_runs_in_llama_cpp_as_deci_with_pytorchs_logits(tmp_path):
    out = tmp_path / "smollm2-mixed"
    assert main(["prune", f"out={out}", "importance.n_samples=16", "eval_heldout=false", *PER_LAYER_TARGET]) == 0
    import slimnas.models  # noqa: F401  (the documented import: registers the per-layer students)

    student = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(student).__name__ == "SlimnasLlamaForCausalLM" and student.config.num_hidden_layers == 29
    gguf_file = export_gguf(out, tmp_path / "smollm2-mixed.gguf", "f32")
    ids = wikitext_tokens(AutoTokenizer.from_pretrained(out), n_tokens=64, seq_len=64)[0].tolist()
    assert_same_logits_in_llama_cpp(gguf_file, student, ids, "per-layer SmolLM2 (deci)")


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
