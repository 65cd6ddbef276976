"""Search workers started by Hydra's launcher plugins: no scheduler of our own.

    slimnas search search.workers=8 search.gpus=[0,1,2,3,4,5,6,7] search.storage.url=postgresql://...
    slimnas search search.workers=32 hydra/launcher=submitit_slurm hydra.launcher.partition=gpu \
        hydra.launcher.gpus_per_node=1 search.storage.url=postgresql://...

With `search.workers > 1`, or a `hydra/launcher=...` override, the command's composed configuration
goes to Hydra as one sweep over `worker=0..N-1`, run by the launcher chosen: `joblib` (the default:
processes on this machine), `submitit_local` (the same jobs as SLURM would run them, on this
machine), `submitit_slurm`, or `ray`. Each job is a worker of the one study: it joins the study in
the shared storage and works until the study has its trials; the caches (teacher conversion,
importance, logit cache, screen) are computed once under file locks and read by the others. Worker i
sees GPU `search.gpus[i % len]` alone (CUDA_VISIBLE_DEVICES, set before anything touches CUDA).
A worker killed anywhere is recovered through the study's heartbeat (search.storage.grace_period).
Hydra writes multirun.yaml (and submitit its logs, .submitit/) into the run directory.
"""

import functools
import os
import traceback
from collections.abc import Callable

from hydra import initialize_config_module
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf, open_dict

from slimnas.core.errors import SlimnasError, one_line

CONFIG_MODULE = "slimnas.conf"
WORKER_CONFIG = "slimnas_worker"  # the composed command, stored for Hydra to sweep over `worker`
ONE_MACHINE = ("basic", "joblib", "submitit_local")  # launchers whose jobs share this machine's disk and SQLite


def launcher_of(overrides: list[str]) -> str:
    chosen = [o.split("=", 1)[1] for o in overrides if o.lstrip("+~").startswith("hydra/launcher=")]
    return chosen[-1] if chosen else "joblib"


def wants_workers(cfg: DictConfig) -> bool:
    return cfg.search.workers > 1 or any(o.lstrip("+~").startswith("hydra/launcher=") for o in cfg.get("launcher", []))


def check_storage(cfg: DictConfig, launcher: str) -> None:
    """Workers on other machines cannot share a SQLite file: refused before anything starts."""
    url = cfg.search.storage.url
    if launcher not in ONE_MACHINE and (url is None or url.startswith("sqlite")):
        raise SlimnasError(
            f"hydra/launcher={launcher} starts workers on other machines, which cannot share a SQLite file (its locks "
            "do not hold over network filesystems): set search.storage.url=postgresql://USER@HOST/DB"
        )


def _traced(task: Callable[[DictConfig], None], cfg: DictConfig) -> None:
    """In the job: its GPU, Ctrl-C handling, then the task; a failure keeps the job's traceback."""
    gpus = list(OmegaConf.select(cfg, "search.gpus", default=[]))
    if gpus:  # before anything initialises CUDA in this process
        os.environ["CUDA_VISIBLE_DEVICES"] = str(gpus[int(cfg.get("worker", 0)) % len(gpus)])
    from slimnas.core import interrupt

    interrupt.install()
    try:
        task(cfg)
    except Exception as error:
        error.add_note(f"in job {cfg.get('worker', '')} (pid {os.getpid()}):\n{traceback.format_exc()}")
        raise


def launch(cfg: DictConfig, task: Callable[[DictConfig], None], sweep: str, jobs: int, what: str) -> None:
    """task(cfg) once per value of the `sweep` override (`jobs` values: worker=range(N) for search workers,
    retrain.only=A,B,... for retraining) through the chosen Hydra launcher; returns when all ended. A killed job
    ends it with one line saying to rerun."""
    overrides = list(cfg.get("launcher", []))
    launcher = launcher_of(overrides)
    given = {o.split("=", 1)[0].lstrip("+~") for o in overrides}
    node = worker_config(cfg)  # the sections keep their dataclass types
    ConfigStore.instance().store(name=WORKER_CONFIG, node=node)  # travels to the jobs with Hydra's state
    extra = [] if "hydra/launcher" in given else [f"hydra/launcher={launcher}"]
    if launcher == "joblib" and "hydra.launcher.n_jobs" not in given:
        extra.append(f"hydra.launcher.n_jobs={jobs}")  # one process per job
    if launcher.startswith("submitit") and "hydra.launcher.timeout_min" not in given:
        extra.append("hydra.launcher.timeout_min=10080")  # submitit's default (60) would kill a job after an hour
    arguments = [
        *overrides,
        *extra,
        sweep,  # one job per value
        f"hydra.sweep.dir={cfg.run_dir}",  # multirun.yaml (and .submitit/) in the run directory
        "hydra.sweep.subdir=.",  # no folder per job
        "hydra.output_subdir=null",  # no .hydra/ folders
        "hydra.job.chdir=false",  # jobs keep the caller's working directory
        "hydra/job_logging=none",  # slimnas prints its own lines
        "hydra/hydra_logging=none",
    ]
    print(f"starting {jobs} {what} through hydra/launcher={launcher}", flush=True)
    try:
        with initialize_config_module(config_module=CONFIG_MODULE, job_name="slimnas", version_base=None):
            GlobalHydra.instance().hydra.multirun(
                config_name=WORKER_CONFIG,
                task_function=functools.partial(_traced, task),
                overrides=arguments,
                with_log_configuration=False,
            )
    except SlimnasError:
        raise  # a job's one-line error (bad input found where the job looked)
    except Exception as error:  # a job killed or lost: its work is kept (the study, the KD checkpoints)
        raise SlimnasError(
            f"one of the {what} ended abnormally ({type(error).__name__}: {one_line(error)[:200]}); finished work "
            "is kept: rerun the same command to finish it"
        ) from error


def worker_config(cfg: DictConfig) -> DictConfig:
    """A job's own configuration: the same command, one process (it must not launch more)."""
    single = cfg.copy()
    with open_dict(single):
        if "search" in single:
            single.search.workers = 1
        if "retrain" in single:
            single.retrain.jobs = False
        single.launcher = []
    return single
