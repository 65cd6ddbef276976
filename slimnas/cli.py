"""The `slimnas` console script: `slimnas COMMAND [PATH ...] [key=value ...]`.

One dispatcher for every stage. Each command is a recipe (slimnas/recipes/COMMAND.py: `main(cfg)`, numbered
steps, top to bottom, over the stages' components), with its settings composed by Hydra from
conf/COMMAND.yaml and the settings dataclasses (slimnas.config). The configuration is composed and every
section checked before the recipe (and torch behind it) is imported, so bad settings fail in about a second.
Every user-facing failure ends as one line on stderr and exit status 2; Ctrl-C ends with status 130 and
keeps completed work.
"""

import importlib
import os
import sys
from pathlib import Path

from slimnas.core.errors import SlimnasError, one_line

COMMANDS = {  # name: (config, what it does); the recipe is slimnas.recipes.NAME
    "importance": ("common", "score heads, neurons, channels and layers"),
    "prune": ("prune", "cut the teacher to a target architecture, save a HF checkpoint"),
    "distill": ("distill", "retrain a student by knowledge distillation"),
    "correct": ("correct", "fine-tune the teacher on the KD corpus (Minitron)"),
    "bench": ("bench", "score quality (lm-eval), held-out KL, speed and memory of a model"),
    "search": ("search", "Optuna search over pruned architectures: Pareto front"),
    "retrain": ("retrain", "fully distil and score a search's best candidates"),
    "report": ("report", "leaderboard, plots and a page from run directories"),
    "export": ("export", "write a checkpoint as a GGUF file (llama.cpp)"),
    "pipeline": ("pipeline", "[correct ->] search -> retrain -> report; chains of stages"),
    "chains": ("chains", "does a chain of stages, or a corrected teacher, beat one cut?"),
    "baselines": ("baselines", "the search against simple choices, over seeds"),
}
POSITIONAL = {"retrain": "run_dir", "report": "run_dirs", "export": "model"}  # what bare paths stand for
FLAGS = {"export": ("--format",)}  # `--format gguf` is format=gguf
USAGE = "usage: slimnas COMMAND [PATH ...] [key=value ...]\n\ncommands:\n" + "\n".join(
    f"  {name:<11} {help_text}" for name, (_, help_text) in COMMANDS.items()
)


def flags_as_settings(command: str, arguments: list[str]) -> list[str]:
    """`--name value` (or `--name=value`) of the command's known flags as `name=value`."""
    result, arguments = [], list(arguments)
    while arguments:
        argument = arguments.pop(0)
        flag, _, value = argument.partition("=")
        if flag in FLAGS.get(command, ()):
            if not value and not arguments:
                raise SlimnasError(f"{flag} needs a value")
            result.append(f"{flag.removeprefix('--')}={value or arguments.pop(0)}")
        elif argument.startswith("--"):
            raise SlimnasError(f"unknown option {flag} for slimnas {command}: settings are key=value")
        else:
            result.append(argument)
    return result


def overrides_of(command: str, arguments: list[str]) -> list[str]:
    """key=value arguments as they are; bare paths become the command's positional setting."""
    arguments = flags_as_settings(command, arguments)
    paths = [a for a in arguments if "=" not in a]
    rest = [a for a in arguments if "=" in a]
    if not paths:
        return rest
    if command not in POSITIONAL:
        raise SlimnasError(f"'{paths[0]}' is not key=value: slimnas {command} takes only settings")
    key = POSITIONAL[command]
    value = f"[{','.join(paths)}]" if key == "run_dirs" else paths[0]
    if key != "run_dirs" and len(paths) > 1:
        raise SlimnasError(f"slimnas {command} takes one path, not {len(paths)}")
    return [f"{key}={value}", *rest]


def command_help(command: str) -> str:
    """`slimnas COMMAND --help`: what the command does and every setting it reads, with its default (the composed
    configuration, so the structured configs' defaults show too, not only the command's YAML file)."""
    from omegaconf import OmegaConf

    from slimnas.config import compose

    config_name, help_text = COMMANDS[command]
    paths = {"run_dirs": " RUN_DIR [RUN_DIR ...]", "run_dir": " RUN_DIR", "model": " MODEL"}  # POSITIONAL's settings
    path = paths.get(POSITIONAL.get(command, ""), "")
    flags = "".join(f" [{flag} VALUE]" for flag in FLAGS.get(command, ()))
    settings = OmegaConf.to_yaml(compose(config_name, []))
    return (
        f"usage: slimnas {command}{path}{flags} [key=value ...]\n\n{help_text}\n\n"
        f"settings (key=value; presets: preset=NAME; ??? must be given):\n{settings}"
    )


def quiet_transformers() -> None:
    """No per-tensor progress bars or advisory warnings from transformers (also when it was imported earlier)."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    command, arguments = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"slimnas: error: unknown command '{command}' (choose from {', '.join(COMMANDS)})", file=sys.stderr)
        return 2
    if any(argument in ("-h", "--help") for argument in arguments):
        print(command_help(command))
        return 0
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # per-tensor loading / saving bars
    from hydra.errors import HydraException
    from omegaconf import open_dict
    from omegaconf.errors import OmegaConfBaseException

    from slimnas.core import interrupt

    interrupt.install()
    config_name = COMMANDS[command][0]
    interrupted = False
    try:
        from slimnas.config import check, compose

        overrides = overrides_of(command, arguments)
        launcher = [o for o in overrides if o.lstrip("+~").startswith(("hydra/", "hydra."))]  # for search.launch
        if launcher and not any(o.lstrip("+~").startswith("hydra/launcher=") for o in launcher):
            overrides.append("hydra/launcher=joblib")  # the default launcher, so hydra.launcher.x=y is checked
        cfg = compose(config_name, overrides)
        with open_dict(cfg):
            cfg.command = " ".join(["slimnas", *argv])
            cfg.launcher = launcher
        check(cfg)  # every section from the configuration alone, before the recipe and torch are imported
        if cfg.get("cache_dir"):  # every cache (converted teacher, importance, teacher logits) follows it
            os.environ["SLIMNAS_CACHE"] = str(Path(cfg.cache_dir).expanduser().resolve())
        recipe = importlib.import_module(f"slimnas.recipes.{command}")
        quiet_transformers()
        recipe.main(cfg)
    except (SlimnasError, HydraException, OmegaConfBaseException) as error:
        print(f"slimnas: error: {one_line(error)}", file=sys.stderr)
        return 2
    except (OSError, MemoryError) as error:  # an unwritable directory, a full disk, no memory left
        print(f"slimnas: error: {type(error).__name__}: {one_line(error)}", file=sys.stderr)
        return 2
    except RuntimeError as error:
        if "out of memory" not in str(error).lower():
            raise
        print(f"slimnas: error: out of memory: {one_line(error)[:300]}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        interrupted = True
    if interrupted or interrupt.requested():
        print("slimnas: interrupted; completed work is kept", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
