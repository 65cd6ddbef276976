"""Benchmark: KD tokens/s with a live teacher and with the top-k cache, beside a plain student step.

    python -m bench.kd_throughput [--batch 2 --seq-len 128 --steps 3]

All three run in one process on the same student shape, so only their ratios are meaningful
(timings on a shared CPU vary by ±30% between runs).
"""

import argparse
import copy
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from compress.arch import Architecture, param_count
from compress.corpus import token_split
from compress.distill import Distiller, DistillSettings, teacher_source
from compress.importance import ImportanceSettings, compute_importance
from compress.models import DEFAULT_TEACHER, load_model
from compress.precision import autocast, pick_device, synchronize
from compress.prune import plan_pruning, prune_model


def time_steps(step, n_steps: int, device) -> float:
    step(0)  # warm-up
    synchronize(device)
    started = time.perf_counter()
    for i in range(1, n_steps + 1):
        step(i)
    synchronize(device)
    return (time.perf_counter() - started) / n_steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default=DEFAULT_TEACHER)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--top-k", type=int, default=64)
    parser.add_argument("--precision", default="auto")
    args = parser.parse_args()

    device = pick_device()
    teacher = load_model(args.teacher)
    teacher.model.to(device)
    data = token_split("builtin", teacher.tokenizer, args.seq_len)
    importance = compute_importance(
        teacher.model, data.train, ImportanceSettings(n_samples=16, precision=args.precision)
    )
    shape = Architecture.of(teacher.model.config)
    target = Architecture(**{**shape.as_dict(), "num_hidden_layers": shape.num_hidden_layers * 2 // 3})
    target = Architecture(**{**target.as_dict(), "intermediate_size": shape.intermediate_size * 2 // 3})
    student = prune_model(teacher.model, plan_pruning(importance, teacher.model.config, target), target)
    tokens_per_step = args.batch * args.seq_len
    print(
        f"device {device}, precision {args.precision}, batch {args.batch} x {args.seq_len} = {tokens_per_step} tokens"
    )
    print(f"teacher {param_count(teacher.model.config):,} params -> student {param_count(student.config):,} params")

    seconds = {}
    with tempfile.TemporaryDirectory() as scratch:
        for mode in ("live", "cache"):
            settings = DistillSettings(
                budget_tokens=tokens_per_step * (args.steps + 1), batch_size=args.batch, teacher_mode=mode,
                top_k=args.top_k, precision=args.precision, eval_rows=1, save_every=10**9, eval_every=10**9,
            )  # fmt: skip
            source = teacher_source(teacher, data, settings, Path(scratch))
            source.prepare(args.batch * (args.steps + 1), 1)  # the cache fill is not part of a KD step
            run = Distiller(copy.deepcopy(student).train(), source, data.train, data.heldout, settings, Path(scratch))
            seconds[mode] = time_steps(run._train_step, args.steps, device)

        plain = copy.deepcopy(student).train()
        optimizer = torch.optim.AdamW(plain.parameters(), lr=1e-5)

        def plain_step(i: int) -> None:
            batch = data.train[i * args.batch : (i + 1) * args.batch].to(device)
            with autocast(device, args.precision):
                logits = plain(input_ids=batch, use_cache=False).logits
            loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), batch[:, 1:].flatten())
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        seconds["student fwd+bwd (CE)"] = time_steps(plain_step, args.steps, device)

    base = seconds["student fwd+bwd (CE)"]
    print(f"{'step':<24}{'s/step':>10}{'tokens/s':>12}{'vs plain':>10}")
    for name, value in seconds.items():
        label = {"live": "KD, live teacher", "cache": f"KD, top-{args.top_k} cache"}.get(name, name)
        print(f"{label:<24}{value:>10.2f}{tokens_per_step / value:>12.1f}{base / value:>10.2f}")
    print(f"cache speed-up over live teacher: {seconds['live'] / seconds['cache']:.2f}x")


if __name__ == "__main__":
    main()
