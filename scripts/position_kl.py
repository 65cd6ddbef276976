"""Analysis: does a student's distance to the teacher grow along the context? KL and perplexity by position half.

    python scripts/position_kl.py runs/proof-hetero/seed_0/finalists/*/model [--teacher smollm2-135m --seq-len 128]

The per-layer proof scores its candidates on 64-token rows (the block library on their last 32 positions) and
reports perplexity on 128-token WikiText rows, where the order of the finalists reversed. This prints, for each
model, the KL to the teacher and the perplexity in the first and second half of each row of WikiText-2 valid (one
row per article, as the proof's unseen text), and for each pair of models how much more one's KL grows from the
first half to the second than the other's, with an interval over articles at 95% family-wise over those pairs
(Bonferroni). A model that loses only in the second half has a cost a short-row score cannot see; for the per-layer
proof's finalists this was a suspect, and the proof scored on 128-token rows ruled it out as the reason for the
reversal (RESULTS.md, "The per-layer proof scored on 128-token rows").
"""

import argparse
import itertools
import math
from pathlib import Path

import torch
from scipy.stats import norm

import slimnas.models  # noqa: F401 (per-layer students load through it)
from slimnas.compress.corpus import text_rows
from slimnas.compress.models import DEFAULT_TEACHER, load_model
from slimnas.core.data import find_data_dir


def log_probs(model: torch.nn.Module, rows: torch.Tensor, batch: int = 8) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([torch.log_softmax(model(rows[i : i + batch]).logits[:, :-1].float(), -1)
                          for i in range(0, len(rows), batch)])  # fmt: skip


def mean_and_interval(values: torch.Tensor, comparisons: int = 1) -> str:
    """Mean ± a 95% interval over the rows (documents), Bonferroni-widened when it is one of several comparisons."""
    z = norm.ppf(1 - 0.025 / comparisons)
    return f"{values.mean():.3f} ± {z * values.std() / math.sqrt(len(values)):.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", help="student checkpoint directories")
    parser.add_argument("--teacher", default=DEFAULT_TEACHER)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0, help="where in each article its row starts")
    args = parser.parse_args()
    torch.set_num_threads(2)

    teacher = load_model(args.teacher)
    data_dir = find_data_dir()
    if data_dir is None:
        raise SystemExit("no data directory: set SLIMNAS_DATA to the folder with wikitext2/wiki.valid.tokens")
    rows, unit = text_rows(data_dir / "wikitext2" / "wiki.valid.tokens", teacher.tokenizer, args.seq_len, args.seed)
    print(f"{len(rows)} {unit}s of WikiText-2 valid, {args.seq_len} tokens each; 95% intervals over {unit}s")
    reference = log_probs(teacher.model, rows)
    targets = rows[:, 1:, None]
    half = (args.seq_len - 1) // 2
    halves = {f"1-{half}": slice(0, half), f"{half + 1}-{args.seq_len - 1}": slice(half, args.seq_len - 1)}

    growth = {}
    for directory in args.models:
        student = log_probs(load_model(directory).model, rows)
        nll = -student.gather(-1, targets)[..., 0]
        kl = (reference.exp() * (reference - student)).sum(-1)
        cells = [f"positions {name}: KL {mean_and_interval(kl[:, part].mean(1))}, perplexity "
                 f"{math.exp(nll[:, part].mean()):.1f}" for name, part in halves.items()]  # fmt: skip
        name = Path(directory).parent.name or directory  # a run's finalist: its folder, not "model"
        print(f"{name}: " + "; ".join(cells))
        first, second = (kl[:, part].mean(1) for part in halves.values())
        growth[name] = second - first
    pairs = list(itertools.combinations(growth, 2))
    for a, b in pairs:
        print(f"KL growth from the first half to the second, {a} minus {b}: "
              f"{mean_and_interval(growth[a] - growth[b], len(pairs))} (95% over {len(pairs)} pairs)")  # fmt: skip


if __name__ == "__main__":
    main()
