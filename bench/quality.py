"""Quality: score an in-memory model with lm-evaluation-harness, as tidy records with error bars.

lm-eval's own logging and progress bars go to the run's log file (`log_to`), not the screen.
"""

import contextlib
import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from slimnas.bench.tasks import CHANCE, SUMMARY_METRIC, TaskSuite
from slimnas.compress.runtime.device import autocast, model_device
from slimnas.compress.runtime.errors import SlimnasError

BINARY_METRICS = ("acc", "acc_norm")


@dataclass
class ScoreRecord:
    model: str
    task: str
    split: str
    metric: str
    value: float
    stderr: float | None  # binomial standard error for accuracies; None where lm-eval gives none
    n: int
    seconds: float


def subset(n_docs: int, limit: int | None, seed: int) -> list[int] | None:
    """A fixed, seeded choice of `limit` documents (None = all of them)."""
    if limit is None or limit >= n_docs:
        return None
    return sorted(random.Random(seed).sample(range(n_docs), limit))


@contextlib.contextmanager
def quiet(log_to: Path | None):
    """Send lm-eval's logging, prints and tqdm bars to a log file while it runs."""
    if log_to is None:
        yield
        return
    log_to.parent.mkdir(parents=True, exist_ok=True)
    with open(log_to, "a") as log, contextlib.redirect_stderr(log), contextlib.redirect_stdout(log):
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


def score_model(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    suite: TaskSuite,
    limit: int | None = None,
    batch_size: int = 8,
    seed: int = 0,
    model_name: str = "model",
    precision: str = "auto",
    max_length: int | None = 2048,
    log_to: Path | None = None,
) -> list[ScoreRecord]:
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    records = []
    with quiet(log_to):
        device = str(model_device(model))
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device, max_length=max_length)
        for task in suite.tasks:
            name = suite.lm_eval_names[task]
            size = suite.sizes[task]
            chosen = subset(size, limit, seed) if size is not None else None
            started = time.perf_counter()
            with autocast(model_device(model), precision):
                result = simple_evaluate(
                    model=lm,
                    tasks=[name],
                    task_manager=suite.manager,
                    samples={name: chosen} if chosen else None,
                    limit=limit if size is None else None,
                    bootstrap_iters=0,
                    log_samples=False,
                    random_seed=seed,
                    numpy_random_seed=seed,
                    torch_random_seed=seed,
                    fewshot_random_seed=seed,
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
                    ScoreRecord(model_name, task, suite.splits[task], metric, float(value), stderr, n, seconds)
                )
    return records


def summary_score(records: list[ScoreRecord]) -> tuple[float, float]:
    """Mean over accuracy tasks of accuracy normalised by chance (0 = chance, 1 = perfect), with its stderr.

    The tasks' errors are independent, so the stderr of the mean is the root of the summed squares / n.
    """
    values, variances = [], []
    for task, chance in CHANCE.items():
        metric = SUMMARY_METRIC[task]
        found = [r for r in records if r.task == task and r.metric == metric]
        if found:
            values.append((found[0].value - chance) / (1 - chance))
            stderr = math.nan if found[0].stderr is None else found[0].stderr  # unknown stays unknown
            variances.append((stderr / (1 - chance)) ** 2)
    if not values:
        raise SlimnasError("no accuracy task among the scored tasks: the summary score needs one")
    return sum(values) / len(values), math.sqrt(sum(variances)) / len(values)


@dataclass(frozen=True)
class QualitySettings:
    tasks: tuple[str, ...] = ("piqa", "arc_easy_dev", "arc_challenge_dev", "hellaswag", "lambada_openai", "wikitext")
    limit: int | None = 200  # documents per task for final scores (bench, retrain): a fixed seeded subset
    trial_limit: int | None = 40  # documents per task when a search trial is scored
    seed: int = 0  # which documents form the subsets
    batch_size: int = 8
    max_length: int | None = 2048  # context window (rolling windows for wikitext); memory grows with it

    def __post_init__(self):
        for name in ("limit", "trial_limit"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise SlimnasError(f"quality.{name} must be at least 1, or null for the whole split")
        if self.batch_size < 1:
            raise SlimnasError("quality.batch_size must be at least 1")

    def check_summary(self) -> None:
        """The summary score needs at least one accuracy task."""
        if not set(self.tasks) & set(CHANCE):
            raise SlimnasError(f"the summary score needs an accuracy task among quality.tasks ({', '.join(CHANCE)})")
