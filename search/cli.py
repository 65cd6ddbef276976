"""The `slimnas` console script: `slimnas COMMAND [hydra.overrides ...]`.

Each command's defaults live in conf/COMMAND.yaml; overrides use Hydra syntax (key=value, +key=value).
Every user-facing failure ends as one line on stderr and exit status 2.
"""

import importlib
import os
import sys
from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent.parent / "conf"
COMMANDS = {
    "importance": ("compress.commands", "run_importance", "score heads, neurons, channels and layers of the teacher"),
    "prune": ("compress.commands", "run_prune", "cut the teacher to a target architecture, save a HF checkpoint"),
    "distill": ("compress.commands", "run_distill", "retrain a student from the teacher by knowledge distillation"),
    "bench": ("bench.commands", "run_bench", "score quality (lm-eval) and speed / memory of a model"),
    "search": (
        "search.study",
        "run_search",
        "Optuna search over pruned architectures, Pareto front of quality vs size",
    ),
}
USAGE = "usage: slimnas COMMAND [key=value ...]\n\ncommands:\n" + "\n".join(
    f"  {name:<11} {help_text}" for name, (_, _, help_text) in COMMANDS.items()
)


def compose(command: str, overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        return hydra_compose(config_name=command, overrides=overrides)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    command, overrides = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"slimnas: error: unknown command '{command}' (choose from {', '.join(COMMANDS)})", file=sys.stderr)
        return 2
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException
    from transformers.utils import logging as transformers_logging

    from compress import interrupt
    from compress.errors import SlimnasError

    interrupt.install()
    transformers_logging.disable_progress_bar()  # per-tensor loading bars drown the real progress

    module_name, function_name, _ = COMMANDS[command]
    interrupted = False
    try:
        cfg = compose(command, overrides)
        getattr(importlib.import_module(module_name), function_name)(cfg)
    except (SlimnasError, HydraException, OmegaConfBaseException) as error:
        message = " ".join(str(error).split())
        print(f"slimnas: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        interrupted = True
    if interrupted or interrupt.requested():
        print("slimnas: interrupted; completed work is kept", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
