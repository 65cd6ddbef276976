"""The task suite: public benchmark files -> lm-eval's own task definitions, prepared once per run.

Each local task is lm-eval's YAML for that task, `include:`d from the installed lm-eval, with only its
data source replaced by a JSON-lines file written here: prompts, targets, choices, preprocessing and
metrics are lm-eval's, by construction. This module only reshapes the raw files into the fields those
YAMLs read. Without local files (no data directory), the same names run lm-eval's hub tasks.
"""

import json
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

from slimnas.compress.models import cache_root
from slimnas.core.data import find_data_dir
from slimnas.core.errors import SlimnasError
from slimnas.core.files import atomic_write_text, hash_json, read_jsonl

LOCAL_PREFIX = "slimnas_"
OFFLINE_FLAGS = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def _lambada(files: list[Path]) -> list[dict]:
    return read_jsonl(files[0])


def _piqa(files: list[Path]) -> list[dict]:
    questions, labels = read_jsonl(files[0]), files[1].read_text().split()
    if len(labels) != len(questions):
        raise SlimnasError(f"PIQA has {len(questions)} questions but {len(labels)} labels in {files[1]}")
    return [{**q, "label": int(label)} for q, label in zip(questions, labels, strict=True)]


def _arc(files: list[Path]) -> list[dict]:
    docs = []
    for row in read_jsonl(files[0]):
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


def _hellaswag(files: list[Path]) -> list[dict]:
    """Parse the llama.cpp text format (6 lines an item) back into the fields lm-eval's hellaswag reads.

    The format joined ctx_a and ctx_b into one line; the fragment after the context's last sentence is
    taken as ctx_b when it starts lower-case (lm-eval capitalises ctx_b), else ctx_b is empty.
    """
    lines = files[0].read_text().split("\n")
    docs = []
    for start in range(0, len(lines) - 5, 6):
        query, gold, endings = lines[start], lines[start + 1], lines[start + 2 : start + 6]
        activity, _, context = query.partition(": ")
        head, dot, tail = context.rpartition(". ")
        ctx_a, ctx_b = (head + dot.rstrip(), tail) if dot and tail[:1].islower() else (context, "")
        docs.append({"activity_label": activity, "ctx_a": ctx_a, "ctx_b": ctx_b, "endings": endings, "label": gold})
    return docs


def _wikitext(files: list[Path]) -> list[dict]:
    """Split the test file into articles at their top-level ' = Title = ' headings."""
    pages: list[list[str]] = []
    for line in files[0].read_text().splitlines(keepends=True):
        if re.fullmatch(r" = [^=].* = \n", line):
            pages.append([])
        if pages:
            pages[-1].append(line)
    return [{"page": "".join(page)} for page in pages]


@dataclass(frozen=True)
class LocalTask:
    """One task of the suite: lm-eval's own definition, scored on a named split of a public file."""

    name: str  # says the split where it differs from the standard task's (arc_easy_dev: ARC's dev split)
    lm_eval_yaml: str  # the standard task's YAML inside lm_eval/tasks
    files: tuple[str, ...]  # under the data directory
    split: str  # the benchmark split the files hold: comparisons are only valid on the same split
    read: Callable[[list[Path]], list[dict]]  # files -> documents in the fields lm-eval's YAML reads
    chance: float | None = None  # accuracy of guessing (None: not an accuracy task)
    summary_metric: str = "acc"  # the accuracy the summary score uses
    hub_split: str | None = None  # without local files: the hub dataset's split to score (None: the task's own)


SUITE = {
    task.name: task
    for task in (
        LocalTask(
            "lambada_openai", "lambada/lambada_openai.yaml", ("lambada/lambada_test.jsonl",), "test", _lambada, 0.0,
        ),
        LocalTask(
            "piqa", "piqa/piqa.yaml", ("piqa/valid.jsonl", "piqa/valid-labels.lst"), "validation", _piqa, 0.5,
            "acc_norm",
        ),
        LocalTask(
            "arc_easy_dev", "arc/arc_easy.yaml", ("arc/ARC-Easy-Dev.jsonl",), "validation", _arc, 0.25, "acc_norm",
            "validation",
        ),
        LocalTask(
            "arc_challenge_dev", "arc/arc_challenge.yaml", ("arc/ARC-Challenge-Dev.jsonl",), "validation", _arc, 0.25,
            "acc_norm", "validation",
        ),
        LocalTask(
            "hellaswag", "hellaswag/hellaswag.yaml", ("hellaswag/derived-llama-cpp-text/hellaswag_val_full.txt",),
            "validation (llama.cpp text)", _hellaswag, 0.25, "acc_norm",
        ),
        LocalTask(
            "wikitext", "wikitext/wikitext.yaml", ("wikitext2/wiki.test.tokens",), "test (tokenised v1)", _wikitext,
        ),
    )
}  # fmt: skip
CHANCE = {name: task.chance for name, task in SUITE.items() if task.chance is not None}
SUMMARY_METRIC = {name: task.summary_metric for name, task in SUITE.items() if task.chance is not None}


def lm_eval_tasks_dir() -> Path:
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).parent


def go_offline() -> None:
    """Switch the hub off for everything that reads these flags, also modules imported earlier."""
    os.environ.update(OFFLINE_FLAGS)
    if "datasets" in sys.modules:
        import datasets

        datasets.config.HF_HUB_OFFLINE = True
        datasets.config.HF_DATASETS_OFFLINE = True
    import huggingface_hub.constants

    huggingface_hub.constants.HF_HUB_OFFLINE = True


@dataclass
class TaskSuite:
    """The tasks of a run, resolved once: which lm-eval task each runs as, on which split, from where."""

    tasks: list[str]
    lm_eval_names: dict[str, str]
    splits: dict[str, str]
    sizes: dict[str, int | None]  # documents per task (None: a hub task, counted by lm-eval)
    source: str  # for records: the data directory, or "lm-eval hub"
    manager: object  # lm_eval.tasks.TaskManager
    offline: bool  # every task reads local files, so lm-eval runs with the hub switched off

    def describe(self) -> str:
        return ", ".join(f"{t} ({self.splits[t]})" for t in self.tasks) + f" from {self.source}"


def _hub_split(task: str) -> str:
    from lm_eval.tasks._yaml_loader import load_yaml

    config = load_yaml(lm_eval_tasks_dir() / SUITE[task].lm_eval_yaml, resolve_func=False)
    return SUITE[task].hub_split or config.get("test_split") or config.get("validation_split") or "?"


def check_local_files(data_dir: Path, tasks: list[str]) -> None:
    missing = [
        str(data_dir / f) for task in tasks if task in SUITE for f in SUITE[task].files if not (data_dir / f).is_file()
    ]
    if missing:
        raise SlimnasError(
            f"missing benchmark data files: {', '.join(missing)}; put them under data.dir "
            f"(sources and checksums: shared/data/SOURCES.md), or unset data.dir to use lm-eval's hub tasks"
        )


def _task_yaml(task: str, data_file: Path | None) -> dict:
    """lm-eval's YAML for the task, included, with only its data source (local file or hub split) replaced."""
    config = {"include": str(lm_eval_tasks_dir() / SUITE[task].lm_eval_yaml), "task": LOCAL_PREFIX + task, "tag": []}
    if data_file is not None:
        config |= {
            "dataset_path": "json",
            "dataset_name": None,
            "dataset_kwargs": {"data_files": {"test": str(data_file)}},
            "training_split": None,
            "validation_split": None,
            "test_split": "test",
            "fewshot_split": None,
        }
    elif SUITE[task].hub_split:
        config |= {"test_split": SUITE[task].hub_split}
    return config


def prepare_suite(tasks: list[str], data_dir_setting: str | None) -> TaskSuite:
    """Write each suite task's YAML (and local data) into the cache, and index them with lm-eval's once.

    With a data directory, suite tasks read its files and everything runs offline; without one (a user
    elsewhere), they read the hub datasets on the same splits. Any other name is passed to lm-eval as is.
    Nothing is written beside the user's runs: a bad task name fails before any run directory exists.
    """
    data_dir = find_data_dir(data_dir_setting)
    import lm_eval

    key = hash_json([sorted(tasks), str(data_dir), lm_eval.__version__])[:16]
    work_dir = cache_root() / "lm-eval-tasks" / key
    offline = data_dir is not None and all(t in SUITE for t in tasks)
    if data_dir is not None:
        check_local_files(data_dir, tasks)
        if offline:
            go_offline()
    elif any(t in SUITE for t in tasks):
        print("note: no benchmark data directory (data.dir, $SLIMNAS_DATA or shared/data): using lm-eval's hub tasks")
    from lm_eval.tasks import TaskManager

    sizes: dict[str, int | None] = {}
    splits = {}
    work_dir.mkdir(parents=True, exist_ok=True)
    for task in [t for t in tasks if t in SUITE]:
        data_file = None
        if data_dir is not None:
            docs = SUITE[task].read([data_dir / f for f in SUITE[task].files])
            data_file = (work_dir / f"{task}.jsonl").resolve()
            atomic_write_text(data_file, "".join(json.dumps(doc) + "\n" for doc in docs))
            sizes[task], splits[task] = len(docs), SUITE[task].split
        else:
            sizes[task], splits[task] = None, _hub_split(task)
        atomic_write_text(work_dir / f"{task}.yaml", yaml.safe_dump(_task_yaml(task, data_file), sort_keys=False))
    manager = TaskManager(include_path=str(work_dir))
    unknown = [t for t in tasks if t not in SUITE and not manager.match_tasks([t])]
    if unknown:
        raise SlimnasError(f"unknown task(s): {', '.join(unknown)} (the suite: {', '.join(SUITE)})")
    for task in [t for t in tasks if t not in SUITE]:
        sizes[task], splits[task] = None, "lm-eval default"
    names = {t: LOCAL_PREFIX + t if t in SUITE else t for t in tasks}
    source = str(data_dir) if data_dir is not None else "lm-eval hub"
    return TaskSuite(tasks, names, splits, sizes, source, manager, offline)
