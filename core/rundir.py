"""A run directory: every file name, record and reader in one module (no torch, no Optuna, no models).

Everything a user reads afterwards is derived from these files: the trial tables, the Pareto front,
the retraining choices and the report. The Optuna study holds only what coordinating workers and
the sampler need (parameters, objective values, rung values, states), written from the same records.
Reports import this module and core's helpers only, so they open in a second.

    RUN_DIR/run.json                     settings, teacher, corpus, hardware, wall time per stage
    RUN_DIR/study.db                     the Optuna study (SQLite; or a PostgreSQL URL)
    RUN_DIR/trials/NNNN/record.json      one trial: architecture, rungs, final metrics, state, why it stopped
    RUN_DIR/screen.jsonl                 every screened candidate's KL right after pruning (one line each)
    RUN_DIR/race.json                    the leaders' extended last rung, when the race ran one
    RUN_DIR/front.json                   the Pareto front, computed once (Optuna's best_trials), read by everything
    RUN_DIR/trials.csv, pareto.csv       derived tables (also .json / .parquet)
    RUN_DIR/retrain/NAME/record.json     a retrained candidate (retrain/teacher: the teacher scored the same way)
    RUN_DIR/retrain/NAME/kd/metrics.jsonl   its KD curve (held-out points); kd/train_state.safetensors while it runs
    RUN_DIR/reference_teacher/record.json   the original teacher, when the run's teacher is a corrected one or a stage
    RUN_DIR/corrected/model              the corrected teacher (slimnas pipeline correct.budget_tokens>0)
    RUN_DIR/stage_N/                     a chain's stages, each a run directory of its own
    RUN_DIR/SECTION/SECTION.json (.png)  tables other commands leave to be shown as they are: proof, correction, chain
    MODEL_DIR/slimnas.json               beside every checkpoint slimnas writes: its shape and where it came from
"""

from dataclasses import asdict, dataclass, field
from pathlib import Path

from slimnas.core.errors import SlimnasError
from slimnas.core.files import locked, read_json, read_jsonl, write_json

RUN_FILE = "run.json"
RECORD_FILE = "record.json"
MODEL_RECORD_FILE = "slimnas.json"
SCREEN_FILE = "screen.jsonl"
RACE_FILE = "race.json"
FRONT_FILE = "front.json"
KD_DIR, METRICS_FILE, STATE_FILE = "kd", "metrics.jsonl", "train_state.safetensors"
TEACHER = "teacher"  # retrain/teacher: the teacher scored like the candidates
REFERENCE, REFERENCE_DIR = "reference teacher", "reference_teacher"  # retrain.reference_teacher: split, record dir
CORRECTED_DIR, MODEL_DIR = "corrected", "model"
SECTIONS = {  # tables other commands leave in a run directory, shown by the report as they are
    "proof": "Search vs baselines",  # slimnas baselines, slimnas chains
    "correction": "Teacher correction: the original and the corrected teacher",  # slimnas pipeline, correct stage
    "chain": "The chain: every stage against the original teacher",  # slimnas pipeline chain=[...]
}
COMPLETE, STOPPED, FAILED = "complete", "stopped", "failed"


@dataclass
class TrialRecord:
    trial: int
    architecture: dict  # the five sizes of a uniform candidate; a per-layer one's per-layer sizes are lists
    label: str
    params: int
    params_fraction: float  # of the teacher's parameters
    weight_bytes_bf16: int
    pruning: dict  # the layer policy the candidate was cut with
    proposed_by: str = "sampler"  # screen | mip | proportional | seed | reference | sampler | random | enumerate |
    # retry | fallback
    reference: str | None = None  # zero_shot (the screen's best) | uniform | depth_only | width_only
    reference_note: str | None = None  # e.g. the uniform reference's per-dimension ratios
    retry_of: int | None = None  # the trial whose killed worker this one replaces
    state: str = "running"  # complete (reached the last rung) | stopped (by the race or the KD budget) | failed
    rung: int = -1  # the last rung reached: 0 is the screen (no KD), rung k ends at search.race.rung_tokens[k-1]
    rungs: list[dict] = field(default_factory=list)  # per rung: rung, kd_tokens, seconds, heldout (+ kl_per_doc)
    stop_reason: str | None = None  # why it did not go on (the race's test, or the KD budget)
    over_budget: str | None = None  # which measured budget it breaks (latency): never a leader or the pick
    scores: list[dict] = field(default_factory=list)  # lm-eval records (selection pool), when trials are scored
    speed: dict = field(default_factory=dict)  # against the teacher in ABBA blocks, when timed
    final: dict = field(default_factory=dict)  # quality and everything measured at the last rung reached
    predicted_kl: float | None = None  # search.blocks: the block library's summed block KL (no KD; None for a shape
    # not made of its blocks, or without a library)
    plan: dict = field(default_factory=dict)  # kept layers / channels / heads / neurons
    kd_tokens: int = 0
    seconds: float = 0.0
    timings: dict = field(default_factory=dict)  # seconds of prune, score, speed (each rung has its own)
    fail_reason: str | None = None
    worker: str = ""
    command: str = ""
    hardware: dict = field(default_factory=dict)

    def add_rung(self, rung: int, seconds: float, kd_tokens: int, heldout: dict) -> None:
        self.rungs.append({"rung": rung, "seconds": seconds, "kd_tokens": kd_tokens, "heldout": heldout})
        self.rung, self.kd_tokens = rung, kd_tokens

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class RetrainRecord:
    """A retrained candidate (or, with name "teacher", the teacher scored the same way)."""

    name: str  # "teacher" or the search trial's number, e.g. "0007"
    trial: int | None
    label: str
    architecture: dict  # as in TrialRecord
    params: int
    params_fraction: float
    reference: str | None
    kd_tokens: int
    search: dict  # the trial's search-time quality and KD tokens (selection documents)
    kd: dict  # steps, tokens, seconds, tokens/s, held-out before and after
    heldout: dict  # full-vocabulary KL and perplexity on the evaluation documents, with per-document values
    scores: list[dict]  # lm-eval records (task, split, pool, metric, value, stderr, n): the evaluation pool
    summary: dict  # the lm-eval summary score (value, stderr, tasks, excluded)
    speed: dict  # against the teacher in ABBA blocks (the teacher's own: absolute numbers)
    flops_per_token: int
    memory: dict  # peak bytes of the model alone
    generations: list[dict]  # prompt -> greedy continuation
    model_dir: str | None
    seconds: dict  # per stage
    command: str
    hardware: dict
    settings_hash: str  # what it was retrained and scored with: a record of other settings is never reused
    heldout_other: dict = field(default_factory=dict)  # the same metrics on other held-out text (e.g. WikiText-2)
    corpus: dict = field(default_factory=dict)  # the corpus the KD rows and the evaluation documents came from


def read_retrain_record(path: Path) -> RetrainRecord:
    """One retrain record (a candidate's, the teacher's or the reference teacher's), checked for this version."""
    try:
        return RetrainRecord(**read_json(path))
    except TypeError as error:
        raise SlimnasError(f"{path} is not a retrain record of this slimnas version ({error})") from error


def retrain_dir(run_dir: Path, name: str) -> Path:
    return run_dir / "retrain" / name


def read_retrained(run_dir: Path) -> list[RetrainRecord]:
    """The retrained candidates and the teacher's record, as far as retrain got."""
    return [read_retrain_record(path) for path in sorted((run_dir / "retrain").glob(f"*/{RECORD_FILE}"))]


def unfinished_retrains(run_dir: Path) -> list[str]:
    """retrain/NAME directories with a KD run but no record yet (interrupted, or still running)."""
    recorded = {path.parent.name for path in (run_dir / "retrain").glob(f"*/{RECORD_FILE}")}
    return sorted(p.parent.name for p in (run_dir / "retrain").glob(f"*/{KD_DIR}") if p.parent.name not in recorded)


def read_kd_curve(run_dir: Path, name: str) -> list[dict]:
    """The held-out points of a retrained candidate's KD run, in KD order (none when it has no metrics file)."""
    path = retrain_dir(run_dir, name) / KD_DIR / METRICS_FILE
    if not path.is_file():
        return []
    return [{**line["heldout"], "kd_tokens": line["tokens"]} for line in read_jsonl(path) if "heldout" in line]


def original_teacher_record(run_dir: Path) -> RetrainRecord:
    """The original teacher scored like the students: the reference of a corrected run or a stage, else the teacher."""
    reference = run_dir / REFERENCE_DIR
    return read_retrain_record((reference if reference.is_dir() else retrain_dir(run_dir, TEACHER)) / RECORD_FILE)


def architecture_columns(architecture: dict) -> dict[str, int | None]:
    """An architecture record as flat table columns: a per-layer one (its sizes lists, one entry per teacher layer)
    by its hidden size and its kept layers, its per-layer sizes blank (its label spells them out)."""
    if not isinstance(architecture.get("intermediate_size"), list):
        return dict(architecture)
    layers = zip(architecture["intermediate_size"], architecture["num_attention_heads"], strict=True)
    kept = sum(bool(ffn or heads) for ffn, heads in layers)
    blank = dict.fromkeys(("intermediate_size", "num_attention_heads", "num_key_value_heads"))
    return {"hidden_size": architecture["hidden_size"], **blank, "num_hidden_layers": kept}


def outcome_text(state: str, rung: int) -> str:
    """What became of a trial, in the words of the search's summary and the report."""
    if state == COMPLETE:
        return "reached the last rung"
    if state == STOPPED:
        return f"stopped after rung {rung}"
    return state


def trial_dir(run_dir: Path, number: int) -> Path:
    return run_dir / "trials" / f"{number:04d}"


def write_record(run_dir: Path, record: TrialRecord) -> None:
    write_json(trial_dir(run_dir, record.trial) / RECORD_FILE, record.as_dict())


def read_records(run_dir: Path) -> list[TrialRecord]:
    """Every trial's record, by trial number (trials killed before writing one have none)."""
    records = []
    for path in sorted((run_dir / "trials").glob(f"*/{RECORD_FILE}")):
        values = read_json(path)
        try:
            records.append(TrialRecord(**values))
        except TypeError as error:
            raise SlimnasError(f"{path} is not a trial record of this slimnas version ({error})") from error
    return records


def read_run(run_dir: Path) -> dict:
    """run.json, with a one-line error when the directory is not a slimnas run."""
    if not (run_dir / RUN_FILE).is_file():
        raise SlimnasError(f"{run_dir} is not a slimnas run directory (no {RUN_FILE})")
    return read_json(run_dir / RUN_FILE)


def update_run(run_dir: Path, **values) -> dict:
    """Merge values into run.json (created on first use); dictionaries are merged key by key."""
    with locked(run_dir / ".run.lock"):
        run = read_json(run_dir / RUN_FILE) if (run_dir / RUN_FILE).is_file() else {}
        for key, value in values.items():
            run[key] = {**run.get(key, {}), **value} if isinstance(value, dict) and key in run else value
        write_json(run_dir / RUN_FILE, run)
    return run


def add_wall_seconds(run_dir: Path, stage: str, seconds: float) -> None:
    """Wall time per stage, summed over the runs of a command (a resumed search adds to the first run's)."""
    with locked(run_dir / ".run.lock"):
        run = read_json(run_dir / RUN_FILE) if (run_dir / RUN_FILE).is_file() else {}
        run.setdefault("wall_seconds", {})[stage] = run.get("wall_seconds", {}).get(stage, 0.0) + seconds
        write_json(run_dir / RUN_FILE, run)


def read_screen(run_dir: Path) -> list[dict]:
    """The screen's lines as recorded, best first; none when the run has no screen."""
    path = run_dir / SCREEN_FILE
    return sorted(read_jsonl(path) if path.is_file() else [], key=lambda line: line["kl"])


def read_front(run_dir: Path) -> dict:
    """The stored front (empty when the search has not written one yet)."""
    path = run_dir / FRONT_FILE
    return read_json(path) if path.is_file() else {"objectives": [], "trials": [], "quality_params": []}


def leaders(records: list[TrialRecord]) -> list[TrialRecord]:
    """The two best candidates at the last rung that meet every budget, by quality (ties by trial number)."""
    complete = [r for r in records if r.state == COMPLETE and r.over_budget is None]
    return sorted(complete, key=lambda r: (-r.final["quality"], r.trial))[:2]


def read_race(run_dir: Path, records: list[TrialRecord]) -> dict | None:
    """race.json when it decided between today's leaders; None when there is none, or when trials that finished
    after it was written changed the leaders (its verdict is about candidates that are no longer the two best)."""
    path = run_dir / RACE_FILE
    race = read_json(path) if path.is_file() else None
    current = [r.trial for r in leaders(records)]
    return race if race is not None and race.get("winner") is not None and race["leaders"] == current else None


def search_pick(run_dir: Path, records: list[TrialRecord]) -> TrialRecord | None:
    """The search's choice: the race's winner when the leaders' last rung was extended, else the best by quality."""
    race = read_race(run_dir, records)
    best = leaders(records)
    winner = race["winner"] if race else (best[0].trial if best else None)
    return next((r for r in records if r.trial == winner), None)


def read_model_record(model_dir: Path) -> dict | None:
    """slimnas.json beside a checkpoint (None for a checkpoint slimnas did not write)."""
    path = Path(model_dir) / MODEL_RECORD_FILE
    return read_json(path) if path.is_file() else None


def stage_dir(run_dir: Path, number: int) -> Path:
    """A chain's stage N (from 1), a run directory of its own."""
    return run_dir / f"stage_{number}"


def stage_dirs(run_dir: Path) -> list[Path]:
    """A chain's stage directories, in order."""
    return sorted(run_dir.glob("stage_*"), key=lambda path: int(path.name.split("_")[1]))


def section_file(run_dir: Path, name: str) -> Path:
    """RUN_DIR/NAME/NAME.json: a table another command leaves for the report (its image: the same with .png)."""
    return run_dir / name / f"{name}.json"
