"""Shared fixtures: tiny random Llama-family models built in the test, a tiny tokenizer, CLI settings."""

import functools
import os
import signal
import subprocess
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from slimnas.core.data import CHECKOUT_DATA_DIR

SHARED_DATA = CHECKOUT_DATA_DIR
needs_data = pytest.mark.skipif(
    not (SHARED_DATA / "SOURCES.md").is_file(), reason=f"benchmark data not found at {SHARED_DATA}"
)
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
SCREENSHOT_DIR = os.environ.get("SLIMNAS_SCREENSHOT_DIR")  # where to keep the pages' screenshots, if anywhere
# Fast CLI settings for a tiny teacher: the small built-in corpus, short rows, fp32 for exact comparisons.
FAST = [
    "data.corpus=builtin", "data.seq_len=32", "data.selection_docs=8", "data.evaluation_docs=8",
    "importance.n_samples=16", "precision=fp32",
]  # fmt: skip


def tiny_config(model_type: str = "llama", **overrides):
    settings = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_hidden_layers=4,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    settings.update(overrides)
    return AutoConfig.for_model(model_type, **settings)


def tiny_model(model_type: str = "llama", seed: int = 0, **overrides):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, **overrides), dtype=torch.float32)
    return model.eval()


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    """Each test gets its own slimnas cache, except the real teacher's conversion, shared across tests."""
    monkeypatch.setenv("SLIMNAS_CACHE", str(tmp_path / "cache"))
    teachers = Path(os.environ.get("SLIMNAS_TEST_TEACHERS", Path.home() / ".cache" / "slimnas" / "teachers"))
    (tmp_path / "cache").mkdir()
    teachers.mkdir(parents=True, exist_ok=True)
    (tmp_path / "cache" / "teachers").symlink_to(teachers)


def tiny_tokenizer(vocab_size: int = 128):
    """A byte-level BPE tokenizer trained on the built-in corpus: real tokenisation, tiny vocabulary."""
    from pydoc_data.topics import topics

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<eos>", "<bos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()[: vocab_size - 3],
    )
    tokenizer.train_from_iterator(list(topics.values())[:20], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>")


def save_tiny_checkpoint(path: Path, model_type: str = "llama", seed: int = 0, **overrides) -> Path:
    vocab = overrides.setdefault("vocab_size", 300)
    tiny_model(model_type, seed, **overrides).save_pretrained(path)
    tiny_tokenizer(vocab).save_pretrained(path)
    return path


@pytest.fixture
def tiny_checkpoint(tmp_path) -> Path:
    return save_tiny_checkpoint(tmp_path / "tiny-teacher")


# Tiny searches -------------------------------------------------------------------------------------------

SEARCH_SPACE = [
    "search.space.hidden_size={choices:[48,64]}",
    "search.space.intermediate_size={choices:[48,64,80,96]}",
    "search.space.num_attention_heads={choices:[2,4]}",
    "search.space.num_key_value_heads={choices:[1,2]}",
    "search.space.num_hidden_layers={choices:[2,3,4]}",
]
SEARCH_FAST = [
    *FAST, "distill.batch_size=4", "search.race.rung_tokens=[128,384]", "speed.prompt_len=16", "speed.new_tokens=4",
    "speed.repeats=2", "search.budget.params=0.7", "search.budget.window=0.3",
]  # fmt: skip


def search_args(teacher, run_dir, *extra) -> list[str]:
    return ["search", f"teacher={teacher}", f"run_dir={run_dir}", *SEARCH_SPACE, *SEARCH_FAST, *extra]


def load_study(run_dir, name="slimnas", url=None):
    import optuna

    return optuna.load_study(study_name=name, storage=storage(url or f"sqlite:///{run_dir / 'study.db'}"))


@functools.cache
def storage(url: str):
    """One storage (one connection pool) per URL for the whole session: tests poll a study several times a second,
    and a new storage per poll leaves its connections open until garbage collection, which ran a PostgreSQL server
    out of connection slots ("too many clients") and failed the search that needed one."""
    import optuna

    return optuna.storages.RDBStorage(url)


def reached_last_rung(study):
    from optuna.trial import TrialState

    return [t for t in study.get_trials(states=(TrialState.COMPLETE,)) if t.user_attrs.get("state") == "complete"]


class SlimnasProcess:
    """`slimnas ARGS` in its own process; its output goes to a file (a pipe nobody reads could fill and block)."""

    def __init__(self, *args: str, launcher: tuple[str, ...] = (), env: dict | None = None):
        """`launcher`: what runs the CLI module (e.g. torch.distributed.run and its flags); the process leads its own
        session, so killing its group kills what it started."""
        import sys
        import tempfile

        self.log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)  # noqa: SIM115 (kept open)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        command = [sys.executable, *launcher, "-m", "slimnas.cli", *args]
        self.process = subprocess.Popen(
            command, env=env, stdout=self.log, stderr=subprocess.STDOUT, text=True, start_new_session=True
        )
        self.pid = self.process.pid

    def poll(self):
        return self.process.poll()

    def output(self) -> str:
        return Path(self.log.name).read_text()

    def finish(self, timeout: float = 600) -> tuple[int, str]:
        """Wait for the process; one that runs past the timeout is killed, not left behind."""
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.pid, signal.SIGKILL)  # the launcher and what it started (torchrun's ranks)
            self.process.wait()
            raise AssertionError(f"slimnas ran past {timeout} s:\n{self.output()[-3000:]}") from None
        return self.process.returncode, self.output()


def slimnas_process(*args: str) -> SlimnasProcess:
    return SlimnasProcess(*args)


def wait_until(condition, process, timeout=300, what="the search made no progress"):
    """Poll condition() (storage errors while the search creates its tables count as not yet)."""
    import time

    from sqlalchemy.exc import SQLAlchemyError

    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if condition():
                return
        except (KeyError, SQLAlchemyError):
            pass
        assert process.poll() is None, process.output()
        time.sleep(0.2)
    raise AssertionError(what)


@pytest.fixture
def search_teacher(tmp_path):
    return save_tiny_checkpoint(tmp_path / "teacher", max_position_embeddings=512)


def chrome():
    """Debian's chromium driven by its chromedriver; skipped without them (failed under CI)."""
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.is_file()]
    try:
        from selenium import webdriver
    except ImportError:
        missing.append("the selenium package (pip install -e .[test])")
    if missing:
        reason = f"no headless browser: {', '.join(missing)} missing (tests/with_services.sh installs them)"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(argument)
    options.add_argument("--window-size=1400,1000")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    return webdriver.Chrome(options=options, service=webdriver.ChromeService(str(CHROMEDRIVER)))


def matched_outputs(student, teacher, match, rows):
    """The student's and the teacher's outputs at the layers a HiddenStateMatch pairs, on the same rows."""
    import torch

    from slimnas.compress.teacher_targets import capture_layer_outputs

    with torch.no_grad():
        teacher_out, handles = capture_layer_outputs(teacher, [t for _, t in match.pairs])
        teacher(rows)
        student_out, more = capture_layer_outputs(student, [s for s, _ in match.pairs])
        student(rows)
    for handle in handles + more:
        handle.remove()
    return student_out, teacher_out
