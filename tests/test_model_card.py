"""Model cards: `base_model` is a hub id or left out, `datasets` names no local path, the lineage is in the text."""

import json

import pytest
from huggingface_hub import ModelCard

from slimnas.core.rundir import RetrainRecord
from slimnas.retrain.model_card import Lineage, model_card

ARCH = {"hidden_size": 48, "intermediate_size": 64, "num_attention_heads": 2, "num_key_value_heads": 1,
        "num_hidden_layers": 2}  # fmt: skip
SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"


def record(name: str, source: str) -> RetrainRecord:
    heldout = {"kl": 0.5, "kl_stderr": 0.01, "perplexity": 20.0, "perplexity_stderr": 1.0, "documents": 8}
    return RetrainRecord(
        name=name, trial=3, label="h48-f64", architecture=ARCH, params=1000, params_fraction=0.5, reference=None,
        kd_tokens=4096, search={}, kd={}, heldout=heldout, scores=[], summary={"value": None, "stderr": None},
        speed={}, flops_per_token=1, memory={}, generations=[], model_dir=None, seconds={},
        command="slimnas retrain runs/x", hardware={"name": "cpu", "threads": 2, "torch": "2"}, settings_hash="h",
        corpus={"source": source},
    )  # fmt: skip


def written(tmp_path, lineage: Lineage, source: str = "/data/corpus/wiki_en_core.jsonl") -> ModelCard:
    """The card as the hub reads it back from README.md."""
    card = model_card(record("0003", source), record("teacher", source), lineage, {"layers": [0, 2]})
    tmp_path.mkdir(exist_ok=True)
    card.save(tmp_path / "README.md")
    return ModelCard.load(tmp_path / "README.md")


def slimnas_checkpoint(path, **made):
    path.mkdir(parents=True)
    (path / "slimnas.json").write_text(json.dumps({"architecture": ARCH, **made}))
    return str(path)


@pytest.mark.parametrize(
    "teacher, base_model",
    [("smollm2-135m", SMOLLM2), ("Qwen/Qwen3-0.6B", "Qwen/Qwen3-0.6B"), ("local", None)],
)
def test_base_model_is_a_hub_id_or_left_out(tmp_path, teacher, base_model):
    if teacher == "local":  # a directory here: no hub id, even one that looks like org/name
        (tmp_path / "org" / "teacher").mkdir(parents=True)
        teacher = str(tmp_path / "org" / "teacher")
    card = written(tmp_path, Lineage.of(teacher))
    assert card.data.base_model == base_model
    assert ("base_model:" in card.content.split("---")[1]) == (base_model is not None)  # left out of the YAML
    assert card.data.datasets is None  # a local corpus file is no hub dataset
    assert {r.dataset_name for r in card.data.eval_results} == {"wiki_en_core.jsonl"}  # its name, not its path


def test_a_chain_stage_of_a_corrected_teacher_names_the_original_and_its_lineage(tmp_path):
    corrected = slimnas_checkpoint(tmp_path / "corrected", corrected_from="smollm2-135m", params=134_515_008,
                                   correct={"budget_tokens": 49_152})  # fmt: skip
    stage_1 = slimnas_checkpoint(tmp_path / "stage_1", teacher=corrected, params=80_000_000, kd_tokens=400_000,
                                 trial=5, plan={"layers": [0, 1]})  # fmt: skip
    lineage = Lineage.of(stage_1)
    assert (lineage.teacher, lineage.original) == (stage_1, "smollm2-135m")
    card = written(tmp_path, lineage)
    assert card.data.base_model == SMOLLM2
    assert card.data.slimnas["teacher"] == stage_1  # the teacher it was cut from, in slimnas's own block
    assert f"a pruned and distilled {SMOLLM2}" in card.text
    steps = [line for line in card.text.splitlines() if line[:3] in ("1. ", "2. ", "3. ", "4. ")]
    assert steps == [
        f"1. {SMOLLM2} (slimnas's default teacher `smollm2-135m`, from SmolLM2-135M-Instruct.Q4_1.gguf)",
        "2. corrected (Minitron): fine-tuned with the next-token loss on the KD corpus for 49,152 tokens",
        "3. pruned to 80,000,000 parameters, distilled with 400,000 KD tokens (search trial 5)",
        "4. this model: pruned from the model above, distilled with 4,096 KD tokens",
    ]


def test_a_checkpoint_without_its_origin_falls_back_on_the_runs_original_teacher(tmp_path):
    older = slimnas_checkpoint(tmp_path / "older", params=80_000_000, kd_tokens=400_000, trial=5)  # no "teacher"
    assert Lineage.of(older).original is None
    assert written(tmp_path / "a", Lineage.of(older)).data.base_model is None
    assert written(tmp_path / "b", Lineage.of(older, "smollm2-135m")).data.base_model == SMOLLM2


def test_datasets_names_a_hub_corpus_only(tmp_path):
    card = written(tmp_path, Lineage.of("smollm2-135m"), source="hf:Salesforce/wikitext:wikitext-2-raw-v1:train")
    assert card.data.datasets == ["Salesforce/wikitext"]
    assert {r.dataset_name for r in card.data.eval_results} == {"Salesforce/wikitext"}
