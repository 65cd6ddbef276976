"""Where the public benchmark files and the corpus live: one lookup for every command.

data.dir when given, else $SLIMNAS_DATA, else the shared/data folder beside the project checkout (this
project's machines); None when none exists, so a user elsewhere gets the built-in corpus and lm-eval's
hub tasks, and is told so.
"""

import os
from pathlib import Path

from slimnas.core.errors import SlimnasError

DATA_DIR_ENV = "SLIMNAS_DATA"
CHECKOUT_DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data"  # core/ -> checkout -> its parent


def find_data_dir(explicit: str | None = None) -> Path | None:
    for origin, value in (("data.dir", explicit), (f"${DATA_DIR_ENV}", os.environ.get(DATA_DIR_ENV))):
        if value:
            path = Path(value).expanduser()
            if not path.is_dir():
                raise SlimnasError(f"{origin} points to {path}, which is not a directory")
            return path
    return CHECKOUT_DATA_DIR if CHECKOUT_DATA_DIR.is_dir() else None
