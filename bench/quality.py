"""Quality: score an in-memory model with lm-evaluation-harness, as tidy records with error bars.

Each task's documents are split once, seeded by `quality.seed`, into two disjoint pools: the
selection pool, from which search trials draw (`trial_limit` documents), and the evaluation pool,
from which retrain, bench and the report draw (`limit` documents). A document that helped choose a
candidate is never scored again as a final number, and every record says which pool it came from.
lm-eval's own logging and progress bars go to the run's log file (`log_to`), not the screen.
"""

import contextlib
import logging
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from slimnas.bench.settings import QualitySettings
from slimnas.bench.tasks import CHANCE, SUMMARY_METRIC, TaskSuite
from slimnas.core.device import autocast, model_device
from slimnas.core.errors import SlimnasError

BINARY_METRICS = ("acc", "acc_norm")


POOLS = ("selection", "evaluation")


@dataclass
class ScoreRecord:
    model: str
    task: str
    split: str
    pool: str  # selection (trials) or evaluation (final numbers): disjoint documents of the split
    metric: str
    value: float
    stderr: float | None  # binomial standard error for accuracies; None where lm-eval gives none
    n: int
    seconds: float


def pool(n_docs: int, share: float, seed: int, name: str) -> list[int]:
    """The documents of one pool: a seeded split of the task's documents, the first `share` for selection."""
    order = list(range(n_docs))
    random.Random(seed).shuffle(order)
    cut = round(share * n_docs)
    return order[:cut] if name == "selection" else order[cut:]


def subset(n_docs: int, share: float, seed: int, name: str, limit: int | None) -> list[int]:
    """`limit` documents of the pool (all of it for None), in index order."""
    chosen = pool(n_docs, share, seed, name)
    return sorted(chosen[:limit] if limit is not None else chosen)


@contextlib.contextmanager
def quiet(log_to: Path | None):
    """Send lm-eval's logging, prints and tqdm bars to a log file while it runs."""
    if log_to is None:
        yield
        return
    log_to.parent.mkdir(parents=True, exist_ok=True)
    sys.stderr.flush()
    saved_fd = os.dup(2)
    with open(log_to, "a") as log, contextlib.redirect_stderr(log), contextlib.redirect_stdout(log):
        os.dup2(log.fileno(), 2)  # also what subprocesses write (lm-eval asks git for a commit hash)
        handler = logging.StreamHandler(log)
        loggers = [logging.getLogger(name) for name in ("lm_eval", "lm-eval")]
        saved = [(lg.handlers, lg.propagate) for lg in loggers]
        for lg in loggers:
            lg.handlers, lg.propagate = [handler], False
        try:
            yield
        finally:
            for lg, (handlers, propagate) in zip(loggers, saved, strict=True):
                lg.handlers, lg.propagate = handlers, propagate
            os.dup2(saved_fd, 2)
            os.close(saved_fd)


def task_size(suite: TaskSuite, task: str) -> int:
    """Documents of a task: known for local files, counted by lm-eval (once per process) for hub tasks."""
    if suite.sizes[task] is None:
        from lm_eval.tasks import get_task_dict

        name = suite.lm_eval_names[task]
        suite.sizes[task] = len(get_task_dict([name], suite.manager)[name].eval_docs)
    return suite.sizes[task]


def documents(suite: TaskSuite, quality: QualitySettings, pool_name: str) -> dict[str, list[int]]:
    """The documents scored of each task, by its lm-eval name: `trial_limit` of the selection pool, `limit` of the
    evaluation pool."""
    limit = quality.trial_limit if pool_name == "selection" else quality.limit
    return {
        suite.lm_eval_names[task]: subset(
            task_size(suite, task), quality.selection_share, quality.seed, pool_name, limit
        )
        for task in suite.tasks
    }


def score_model(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    suite: TaskSuite,
    quality: QualitySettings,
    pool_name: str,
    model_name: str = "model",
    precision: str = "auto",
    log_to: Path | None = None,
) -> list[ScoreRecord]:
    """lm-eval on the documents of one pool (`documents`), one task at a time."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    records = []
    with quiet(log_to):
        device = str(model_device(model))
        lm = HFLM(
            pretrained=model, tokenizer=tokenizer, batch_size=quality.batch_size, device=device,
            max_length=quality.max_length,
        )  # fmt: skip
        chosen = documents(suite, quality, pool_name)
        for task in suite.tasks:
            name = suite.lm_eval_names[task]
            started = time.perf_counter()
            with autocast(model_device(model), precision):
                result = simple_evaluate(
                    model=lm,
                    tasks=[name],
                    task_manager=suite.manager,
                    samples={name: chosen[name]},
                    bootstrap_iters=0,
                    log_samples=False,
                    random_seed=quality.seed,
                    numpy_random_seed=quality.seed,
                    torch_random_seed=quality.seed,
                    fewshot_random_seed=quality.seed,
                )
            seconds = time.perf_counter() - started
            n = int(result["n-samples"][name]["effective"])
            for key, value in result["results"][name].items():
                metric = key.partition(",")[0]
                if (
                    metric in ("alias", "sample_len")
                    or metric.endswith("_stderr")
                    or not isinstance(value, int | float)
                ):
                    continue
                stderr = math.sqrt(value * (1 - value) / (n - 1)) if metric in BINARY_METRICS and n > 1 else None
                records.append(
                    ScoreRecord(
                        model_name, task, suite.splits[task], pool_name, metric, float(value), stderr, n, seconds
                    )
                )
    return records


@dataclass
class Summary:
    """The mean over the suite's accuracy tasks of accuracy above chance (0 = chance, 1 = perfect)."""

    value: float | None  # None when no suite accuracy task was scored
    stderr: float | None
    tasks: list[str]  # the tasks it averages
    excluded: list[str]  # scored tasks it leaves out: no known chance level (not in the suite) or not accuracies


def summary_score(records: list[ScoreRecord]) -> Summary:
    """Tasks' errors are independent, so the stderr of the mean is the root of the summed squares over n."""
    values, variances, tasks = [], [], []
    for task, chance in CHANCE.items():
        found = [r for r in records if r.task == task and r.metric == SUMMARY_METRIC[task]]
        if found:
            tasks.append(task)
            values.append((found[0].value - chance) / (1 - chance))
            stderr = math.nan if found[0].stderr is None else found[0].stderr  # unknown stays unknown
            variances.append((stderr / (1 - chance)) ** 2)
    excluded = sorted({r.task for r in records} - set(tasks))
    if not values:
        return Summary(None, None, [], excluded)
    return Summary(sum(values) / len(values), math.sqrt(sum(variances)) / len(values), tasks, excluded)


def check_summary(quality: QualitySettings) -> None:
    """The summary score needs at least one accuracy task of the suite."""
    if not set(quality.tasks) & set(CHANCE):
        raise SlimnasError(f"the summary score needs an accuracy task among quality.tasks ({', '.join(CHANCE)})")
