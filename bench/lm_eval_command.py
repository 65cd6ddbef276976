"""lm-eval's own command line for the scores slimnas computed in memory: the same task files, documents, batch
size, context length and seeds, so a score can be checked with lm-eval alone.

`slimnas bench` writes `lm_eval_command.sh` beside its scores, with `lm_eval_samples.json` (each task's
documents, by index in its split). `--include_path` is the task directory bench/tasks.py prepared in the cache:
`$SLIMNAS_CACHE/lm-eval-tasks/<key>` (default `~/.cache/slimnas`), the key a hash of the tasks, the data
directory and lm-eval's version, so the same run settings always name the same directory, which each run
rewrites with the same content. The script makes one lm-eval call per task, as slimnas scores them, so each
call forms slimnas's batches: one call over several tasks batches their requests together (the same scores on a
tiny model on a CPU, but not the same matrices, which on a GPU may round differently).
"""

import shlex
import sys
from pathlib import Path

from transformers import PreTrainedModel

from slimnas.bench.quality import documents
from slimnas.bench.settings import QualitySettings
from slimnas.bench.tasks import OFFLINE_FLAGS, TaskSuite
from slimnas.compress.arch import PER_LAYER_PREFIX
from slimnas.core.device import autocasts_bf16, model_device
from slimnas.core.files import atomic_write_text, write_json

SCRIPT = "lm_eval_command.sh"
SAMPLES = "lm_eval_samples.json"
RESULTS = "lm_eval_cli"  # where the script's lm-eval writes its results, under the bench output
# lm-eval's CLI for a per-layer student: its class loads only once slimnas.models has registered it with transformers
PER_LAYER_CLI = "import slimnas.models; from lm_eval.__main__ import cli_evaluate; cli_evaluate()"


def model_location(model: PreTrainedModel) -> str:
    """What the model was loaded from (a hub id, or a directory made absolute): lm-eval loads it from there."""
    location = model.name_or_path
    return str(Path(location).resolve()) if Path(location).is_dir() else location


def lm_eval_commands(
    model: PreTrainedModel, suite: TaskSuite, quality: QualitySettings, samples: Path, results: Path
) -> list[list[str]]:
    """One lm-eval command per task, with the settings `score_model` gives HFLM and simple_evaluate."""
    model_args = f"pretrained={model_location(model)},dtype=float32"
    if quality.max_length is not None:
        model_args += f",max_length={quality.max_length}"
    per_layer = model.config.model_type.startswith(PER_LAYER_PREFIX)
    program = [sys.executable, "-c", PER_LAYER_CLI] if per_layer else ["lm_eval"]
    tasks_dir = Path(suite.manager.include_path).resolve()  # type: ignore[attr-defined]
    seed = str(quality.seed)
    return [
        [
            *program, "--model", "hf", "--model_args", model_args, "--tasks", suite.lm_eval_names[task],
            "--include_path", str(tasks_dir), "--samples", str(samples),
            "--batch_size", str(quality.batch_size), "--device", str(model_device(model)),
            "--seed", ",".join([seed] * 4), "--output_path", str(results),
        ]
        for task in suite.tasks
    ]  # fmt: skip


def write_lm_eval_command(
    model: PreTrainedModel, suite: TaskSuite, quality: QualitySettings, pool_name: str, precision: str, out: Path
) -> Path:
    """Write the documents and the script into `out`; return the script's path."""
    out = out.resolve()
    samples, script = out / SAMPLES, out / SCRIPT
    write_json(samples, documents(suite, quality, pool_name))
    lines = [
        "#!/bin/sh",
        f"# lm-eval's own CLI on the documents `slimnas bench` scored ({pool_name} pool); results in {out / RESULTS}",
        f"# --include_path: the task files slimnas prepared ({suite.describe()})",
    ]
    if autocasts_bf16(model_device(model), precision):
        lines.append(f"# slimnas scored under bf16 autocast (precision={precision}): lm-eval in float32 differs by "
                     "bf16 rounding; slimnas bench precision=fp32 scores what this script does")  # fmt: skip
    lines.append("set -e")
    if suite.offline:
        lines.append("export " + " ".join(f"{key}={value}" for key, value in OFFLINE_FLAGS.items()))
    lines += [shlex.join(command) for command in lm_eval_commands(model, suite, quality, samples, out / RESULTS)]
    atomic_write_text(script, "\n".join(lines) + "\n")
    script.chmod(0o755)
    return script
