"""Benchmark: KD tokens/s with a live teacher and with the top-k cache, beside a plain student step.

    python scripts/kd_throughput.py [--batch 2 --seq-len 128 --steps 3 --rounds 6]

All three run in one process on the same student shape, in alternating rounds (live, cache, plain,
live, ...), so a slow spell of the machine hits every mode alike; the ratios to the plain step are
per-round ratios, mean ± standard error. Only the ratios are meaningful (timings on a shared CPU vary
by ±30% between runs).
"""

import argparse
import copy
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from slimnas.compress.arch import Architecture, param_count
from slimnas.compress.corpus import load_corpus
from slimnas.compress.distill import build_distiller
from slimnas.compress.importance import compute_importance
from slimnas.compress.models import DEFAULT_TEACHER, load_model
from slimnas.compress.prune import plan_pruning, prune_model
from slimnas.compress.settings import DataSettings, DistillSettings, ImportanceSettings
from slimnas.core.device import autocast, pick_device, synchronize
from slimnas.core.stats import mean_and_stderr

Steps = Callable[[int], object]  # runs n training steps


def kd_steps(mode: str, student, teacher, rows: torch.Tensor, args, scratch: Path) -> Steps:
    """n KD steps of a copy of the student, with the teacher live or read from a filled top-k cache."""
    tokens_per_step = args.batch * args.seq_len
    budget = tokens_per_step * (1 + args.rounds * args.steps)
    settings = DistillSettings(batch_size=args.batch, teacher_mode=mode, top_k=args.top_k, precision=args.precision)
    kd = build_distiller(copy.deepcopy(student), teacher, rows, settings, budget, scratch)
    kd.teacher_targets.prepare(kd.n_rows)  # the cache fill is not part of a KD step
    return lambda n: kd.train_until(kd.step + n)


def plain_steps(student, rows: torch.Tensor, args) -> Steps:
    """n steps of the same student on next-token cross-entropy alone: the cost KD is compared against."""
    plain = copy.deepcopy(student).train()
    optimizer = torch.optim.AdamW(plain.parameters(), lr=1e-5)
    device = next(plain.parameters()).device

    def run(n: int) -> None:
        for i in range(n):
            batch = rows[i * args.batch : (i + 1) * args.batch].to(device)
            with autocast(device, args.precision):
                logits = plain(input_ids=batch, use_cache=False).logits
            F.cross_entropy(logits[:, :-1].float().flatten(0, 1), batch[:, 1:].flatten()).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default=DEFAULT_TEACHER)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per mode and round")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--top-k", type=int, default=64)
    parser.add_argument("--precision", default="auto")
    args = parser.parse_args()

    # 1. The teacher and a student cut to two thirds of its depth and FFN
    device = pick_device()
    teacher = load_model(args.teacher, device)
    rows = load_corpus(teacher.tokenizer, DataSettings(corpus="builtin", seq_len=args.seq_len)).train
    importance = compute_importance(teacher.model, rows, ImportanceSettings(n_samples=16))
    shape = Architecture.of(teacher.model.config).as_dict()
    target = Architecture(**shape | {"num_hidden_layers": shape["num_hidden_layers"] * 2 // 3,
                                     "intermediate_size": shape["intermediate_size"] * 2 // 3})  # fmt: skip
    student = prune_model(teacher.model, plan_pruning(importance, teacher.model.config, target), target)
    tokens_per_step = args.batch * args.seq_len
    print(
        f"device {device}, precision {args.precision}, batch {args.batch} x {args.seq_len} = {tokens_per_step} tokens"
    )
    print(f"teacher {param_count(teacher.model.config):,} params -> student {param_count(student.config):,} params")

    # 2. The three kinds of step, warmed up, then timed in alternating rounds
    with tempfile.TemporaryDirectory() as scratch:
        steppers = {
            "live": kd_steps("live", student, teacher, rows, args, Path(scratch)),
            "cache": kd_steps("cache", student, teacher, rows, args, Path(scratch)),
            "plain": plain_steps(student, rows, args),
        }
        for step in steppers.values():
            step(1)
        seconds: dict[str, list[float]] = {mode: [] for mode in steppers}
        for _ in range(args.rounds):
            for mode, step in steppers.items():
                synchronize(device)
                started = time.perf_counter()
                step(args.steps)
                synchronize(device)
                seconds[mode].append((time.perf_counter() - started) / args.steps)

    # 3. Tokens/s and each mode's speed as a share of the plain step's, round by round
    labels = {"live": "KD, live teacher", "cache": f"KD, top-{args.top_k} cache", "plain": "student fwd+bwd (CE)"}
    print(f"{'step':<24}{'s/step':>10}{'tokens/s':>12}{'vs plain':>18}")
    for mode, values in seconds.items():
        ratio, stderr = mean_and_stderr([p / v for p, v in zip(seconds["plain"], values, strict=True)])
        per_step = statistics.median(values)
        print(f"{labels[mode]:<24}{per_step:>10.2f}{tokens_per_step / per_step:>12.1f}{ratio:>12.2f} ± {stderr:.2f}")


if __name__ == "__main__":
    main()
