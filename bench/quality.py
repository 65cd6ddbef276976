"""Quality: score an in-memory model with lm-evaluation-harness, as tidy records.

Local tasks (the offline suite of bench/tasks/, names as the standard lm-eval tasks they mirror) run
with the hub switched off; any other task name passes straight to lm-eval (network needed).
"""

import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from bench.task_data import LOCAL_PREFIX, SUITE, prepare_suite
from compress.errors import SlimnasError
from compress.precision import autocast

OFFLINE_FLAGS = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
CHANCE = {"piqa": 0.5, "arc_easy": 0.25, "arc_challenge": 0.25, "hellaswag": 0.25, "lambada_openai": 0.0}
SUMMARY_METRIC = {"piqa": "acc_norm", "arc_easy": "acc_norm", "arc_challenge": "acc_norm", "hellaswag": "acc_norm"}
BINARY_METRICS = ("acc", "acc_norm")


@dataclass
class ScoreRecord:
    model: str
    task: str
    metric: str
    value: float
    stderr: float | None
    n: int
    seconds: float


def go_offline() -> None:
    """Switch the hub off for everything that reads these flags, also modules imported earlier."""
    os.environ.update(OFFLINE_FLAGS)
    if "datasets" in sys.modules:
        import datasets

        datasets.config.HF_HUB_OFFLINE = True
        datasets.config.HF_DATASETS_OFFLINE = True
    import huggingface_hub.constants

    huggingface_hub.constants.HF_HUB_OFFLINE = True


def subset(n_docs: int, limit: int | None, seed: int) -> list[int] | None:
    """A fixed, seeded choice of `limit` documents (None = all of them)."""
    if limit is None or limit >= n_docs:
        return None
    return sorted(random.Random(seed).sample(range(n_docs), limit))


def score_model(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    tasks: list[str],
    work_dir: Path,
    data_dir: Path,
    limit: int | None = None,
    batch_size: int = 8,
    seed: int = 0,
    model_name: str = "model",
    precision: str = "auto",
    max_length: int | None = 2048,
) -> list[ScoreRecord]:
    local = [t for t in tasks if t in SUITE]
    if local:
        go_offline()
    sizes = prepare_suite(data_dir, local, work_dir / "tasks") if local else {}
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(work_dir / "tasks") if local else None)
    unknown = [t for t in tasks if t not in SUITE and not manager.match_tasks([t])]
    if unknown:
        raise SlimnasError(f"unknown task(s): {', '.join(unknown)} (offline suite: {', '.join(SUITE)})")
    device = str(next(model.parameters()).device)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device, max_length=max_length)
    records = []
    for task in tasks:
        lm_eval_name = LOCAL_PREFIX + task if task in SUITE else task
        chosen = subset(sizes[task], limit, seed) if task in SUITE else None
        started = time.perf_counter()
        with autocast(model.device, precision):
            result = simple_evaluate(
                model=lm,
                tasks=[lm_eval_name],
                task_manager=manager,
                samples={lm_eval_name: chosen} if chosen else None,
                limit=None if task in SUITE else limit,
                bootstrap_iters=0,
                log_samples=False,
                random_seed=seed,
                numpy_random_seed=seed,
                torch_random_seed=seed,
                fewshot_random_seed=seed,
            )
        seconds = time.perf_counter() - started
        n = int(result["n-samples"][lm_eval_name]["effective"])
        for key, value in result["results"][lm_eval_name].items():
            metric, _, _filter = key.partition(",")
            if metric in ("alias", "sample_len") or metric.endswith("_stderr") or not isinstance(value, int | float):
                continue
            stderr = math.sqrt(value * (1 - value) / (n - 1)) if metric in BINARY_METRICS and n > 1 else None
            records.append(ScoreRecord(model_name, task, metric, float(value), stderr, n, seconds))
    return records


def summary_score(records: list[ScoreRecord]) -> float:
    """Mean over multiple-choice / accuracy tasks of accuracy normalised by chance: 0 = chance, 1 = perfect."""
    values = []
    for task, chance in CHANCE.items():
        metric = SUMMARY_METRIC.get(task, "acc")
        found = [r.value for r in records if r.task == task and r.metric == metric]
        if found:
            values.append((found[0] - chance) / (1 - chance))
    if not values:
        raise SlimnasError("no accuracy task among the scored tasks: the summary score needs one")
    return sum(values) / len(values)
