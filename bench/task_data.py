"""Prepare the offline task suite: public benchmark files -> lm-eval-ready JSONL + task YAMLs.

The task definitions (prompts, choices, metrics) are YAML in bench/tasks/, mirroring the standard
lm-eval tasks of the same names; this module only reshapes the raw files found under the data
directory into the fields those YAMLs read, and writes each YAML with its data file's absolute path.
"""

import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

from compress.errors import SlimnasError

TASK_TEMPLATES = Path(__file__).parent / "tasks"
LOCAL_PREFIX = "slimnas_"


def default_data_dir() -> Path:
    """$SLIMNAS_DATA, else the shared/data folder beside the project checkout."""
    return Path(os.environ.get("SLIMNAS_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _lambada(data: Path) -> list[dict]:
    return _read_jsonl(data / "lambada" / "lambada_test.jsonl")


def _piqa(data: Path) -> list[dict]:
    docs = _read_jsonl(data / "piqa" / "valid.jsonl")
    labels = (data / "piqa" / "valid-labels.lst").read_text().split()
    if len(labels) != len(docs):
        raise SlimnasError(f"PIQA has {len(docs)} questions but {len(labels)} labels under {data / 'piqa'}")
    return [
        {"goal": d["goal"], "sol1": d["sol1"], "sol2": d["sol2"], "label": int(label)}
        for d, label in zip(docs, labels, strict=True)
    ]


def _arc(file_name: str) -> Callable[[Path], list[dict]]:
    def load(data: Path) -> list[dict]:
        docs = []
        for row in _read_jsonl(data / "arc" / file_name):
            choices = row["question"]["choices"]
            docs.append(
                {
                    "id": row["id"],
                    "question": row["question"]["stem"],
                    "choices": {"text": [c["text"] for c in choices], "label": [c["label"] for c in choices]},
                    "answerKey": row["answerKey"],
                }
            )
        return docs

    return load


def _hellaswag_preprocess(text: str) -> str:
    """lm-eval's hellaswag preprocess (tasks/hellaswag/utils.py)."""
    text = text.strip().replace(" [title]", ". ")
    return re.sub("\\[.*?\\]", "", text).replace("  ", " ")


def _hellaswag(data: Path) -> list[dict]:
    """Parse the llama.cpp text format: 'label: context', gold index, four endings per item.

    lm-eval builds the query as activity_label + ': ' + ctx_a + ' ' + ctx_b.capitalize(); the text
    format joined ctx_b uncapitalised, so the fragment after the context's last sentence is
    capitalised here when it starts lower-case.
    """
    lines = (data / "hellaswag" / "derived-llama-cpp-text" / "hellaswag_val_full.txt").read_text().split("\n")
    docs = []
    for start in range(0, len(lines) - 5, 6):
        query, gold, endings = lines[start], lines[start + 1], lines[start + 2 : start + 6]
        label, _, context = query.partition(": ")
        head, dot, tail = context.rpartition(". ")
        if tail[:1].islower():
            context = f"{head}{dot}{tail[0].upper()}{tail[1:]}"
        docs.append(
            {
                "query": _hellaswag_preprocess(f"{label}: {context}"),
                "choices": [_hellaswag_preprocess(e) for e in endings],
                "label": int(gold),
            }
        )
    return docs


def _wikitext(data: Path) -> list[dict]:
    """Split the test file into articles at their top-level ' = Title = ' headings."""
    pages: list[list[str]] = []
    for line in (data / "wikitext2" / "wiki.test.tokens").read_text().splitlines(keepends=True):
        if re.fullmatch(r" = [^=].* = \n", line):
            pages.append([])
        if pages:
            pages[-1].append(line)
    return [{"page": "".join(page)} for page in pages]


SUITE: dict[str, tuple[Callable[[Path], list[dict]], list[str]]] = {
    "lambada_openai": (_lambada, ["lambada/lambada_test.jsonl"]),
    "piqa": (_piqa, ["piqa/valid.jsonl", "piqa/valid-labels.lst"]),
    "arc_easy": (_arc("ARC-Easy-Dev.jsonl"), ["arc/ARC-Easy-Dev.jsonl"]),
    "arc_challenge": (_arc("ARC-Challenge-Dev.jsonl"), ["arc/ARC-Challenge-Dev.jsonl"]),
    "hellaswag": (_hellaswag, ["hellaswag/derived-llama-cpp-text/hellaswag_val_full.txt"]),
    "wikitext": (_wikitext, ["wikitext2/wiki.test.tokens"]),
}


def check_files(data_dir: Path, tasks: list[str]) -> None:
    missing = [str(data_dir / f) for task in tasks for f in SUITE[task][1] if not (data_dir / f).is_file()]
    if missing:
        raise SlimnasError(
            f"missing benchmark data files: {', '.join(missing)}; place them under bench.data_dir "
            f"(default: shared/data beside the checkout, or $SLIMNAS_DATA); sources: see README 'Benchmark data'"
        )


def prepare_suite(data_dir: Path, tasks: list[str], out_dir: Path) -> dict[str, int]:
    """Write JSONL + YAML for each local task into out_dir; returns the number of documents per task."""
    check_files(data_dir, tasks)
    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(TASK_TEMPLATES / "wikitext_functions.py", out_dir / "wikitext_functions.py")
    sizes = {}
    for task in tasks:
        docs = SUITE[task][0](data_dir)
        data_file = (out_dir / f"{task}.jsonl").resolve()
        data_file.write_text("".join(json.dumps(doc) + "\n" for doc in docs))
        template = (TASK_TEMPLATES / f"{task}.yaml").read_text()
        (out_dir / f"{task}.yaml").write_text(template.replace(f"test: {task}.jsonl", f"test: {data_file}"))
        sizes[task] = len(docs)
    return sizes
