"""Optuna storage: a SQLite file in the run directory by default, any RDB URL (PostgreSQL) for many workers.

Heartbeats mark a killed worker's trial as failed once its grace period passes, and the retry
callback puts that candidate back in the queue, so a crashed worker loses no candidate.
"""

import time
import warnings
from pathlib import Path

import optuna
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

from compress.errors import SlimnasError

SETTINGS_KEY = "slimnas_settings"


def storage_url(url: str | None, run_dir: Path) -> str:
    return url or f"sqlite:///{(run_dir / 'study.db').resolve()}"


def open_storage(url: str, heartbeat_interval: int, grace_period: int, max_retry: int, attempts: int = 5) -> RDBStorage:
    """Connect, creating the tables if needed; retried because workers starting together race to create them."""
    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    attempt = 0
    while True:
        attempt += 1
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            try:
                return RDBStorage(
                    url,
                    engine_kwargs=engine_kwargs,
                    heartbeat_interval=heartbeat_interval,
                    grace_period=grace_period,
                    heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=max_retry),
                )
            except ImportError as error:  # no driver for this URL: retrying cannot help
                raise SlimnasError(f"cannot open study storage {url}: {error}") from error
            except Exception as error:  # sqlalchemy raises many types for bad URLs, races and dead servers
                if attempt == attempts:
                    raise SlimnasError(f"cannot open study storage {url}: {str(error).splitlines()[0]}") from error
                time.sleep(0.5 * attempt)


def open_study(
    storage: RDBStorage, name: str, directions: list[str], sampler: optuna.samplers.BaseSampler, settings_key: str
) -> optuna.Study:
    """Create the study, or load it when the same command runs again (refusing other settings)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        storage=storage, study_name=name, directions=directions, sampler=sampler, load_if_exists=True
    )
    existing = study.user_attrs.get(SETTINGS_KEY)
    if existing is None:
        study.set_user_attr(SETTINGS_KEY, settings_key)
    elif existing != settings_key:
        raise SlimnasError(f"study '{name}' was created with other search settings: use another run_dir or study_name")
    return study
