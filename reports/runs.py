"""The run directories a report is made from, read and checked before anything is written.

A report reads records only, never a model: run.json, the trial records, front.json (the front the
search computed), screen.jsonl, race.json, the retrain records, the KD curves of the retrained
candidates, and the sections other tools leave there (proof/, correction/, chain/). Every problem with
them is found here and said in one line, so a bad input never leaves half a report.
"""

from dataclasses import dataclass
from pathlib import Path

from slimnas.core.errors import SlimnasError
from slimnas.core.files import read_json
from slimnas.core.rundir import (
    FAILED,
    RUN_FILE,
    SECTIONS,
    TEACHER,
    RetrainRecord,
    TrialRecord,
    read_front,
    read_kd_curve,
    read_race,
    read_records,
    read_retrained,
    read_run,
    read_screen,
    section_file,
    unfinished_retrains,
)

RUN_KEYS = ("teacher", "teacher_params", "settings")  # written by `slimnas search` before its first trial
RANKED = ("complete", "stopped")  # trial states that carry a quality
SECTION_KINDS = ("baselines", "chain")  # run directories that hold sections only (their searches are elsewhere)


@dataclass(frozen=True)
class Section:
    """A table written by another tool (its columns and rows as shown), notes, and an optional image."""

    name: str
    title: str
    columns: list[str]
    rows: list[dict]
    paired_columns: list[str]
    paired: list[dict]
    notes: list[str]
    image: bytes | None


@dataclass(frozen=True)
class Run:
    dir: Path
    info: dict  # run.json
    trials: list[TrialRecord]  # every trial record, failed ones included
    teacher: RetrainRecord | None  # retrain/teacher: the teacher scored like the candidates
    retrained: list[RetrainRecord]  # the retrained candidates
    kd_curves: dict[str, list[dict]]  # retrained name -> held-out metrics (evaluation documents) and kd_tokens
    screen: list[dict]  # every screened candidate's KL right after pruning, best first
    race: dict | None  # race.json: the leaders' extended last rung
    front: dict  # front.json: the study's front and its quality-vs-parameters subset, as the search computed them
    unfinished: list[str]  # retrain/NAME directories with no record yet (retrain interrupted or running)
    sections: list[Section]

    @property
    def name(self) -> str:
        return self.dir.name

    @property
    def kind(self) -> str:
        """search (a search, maybe retrained), or baselines / chain (sections only: the proof, the chain's table)."""
        return self.info.get("kind", "search")

    @property
    def teacher_params(self) -> int:
        return self.info["teacher_params"]

    @property
    def candidates(self) -> list[TrialRecord]:
        return [r for r in self.trials if r.state != FAILED]

    @property
    def failed(self) -> list[TrialRecord]:
        return [r for r in self.trials if r.state == FAILED]

    @property
    def retrain_tokens(self) -> str:
        """The retrained candidates' KD tokens as text: one budget, or each when the budget changed between runs."""
        return " / ".join(f"{tokens:,}" for tokens in sorted({r.kd_tokens for r in self.retrained}))

    @property
    def selection_documents(self) -> int | None:
        return self.info.get("corpus", {}).get("selection_documents")

    @property
    def quality_metric(self) -> str:
        return self.info["settings"]["search"]["quality_metric"]

    def members(self, key: str = "trials") -> list[TrialRecord]:
        """The records of the stored front ("trials") or of its quality-vs-parameters subset ("quality_params")."""
        numbers = set(self.front[key])
        return [r for r in self.trials if r.trial in numbers]


def check_info(info: dict, run_dir: Path) -> None:
    missing = [key for key in RUN_KEYS if key not in info]
    if missing:
        raise SlimnasError(f"{run_dir / RUN_FILE} lacks {', '.join(missing)}: the search never started properly")


def check_trials(trials: list[TrialRecord], run_dir: Path) -> None:
    if not trials:
        raise SlimnasError(f"{run_dir} has no trial records (trials/NNNN/record.json): nothing to report")
    for record in trials:
        if record.state in RANKED and not (isinstance(record.final, dict) and "quality" in record.final):
            raise SlimnasError(f"trial {record.trial} of {run_dir} is {record.state} but its record has no quality")


def check_retrained(retrained: list[RetrainRecord], teacher: RetrainRecord | None, run: Run) -> None:
    numbers = {r.trial for r in run.trials}
    for record in retrained:
        if record.trial not in numbers:
            raise SlimnasError(
                f"{run.dir}/retrain/{record.name}/record.json is of trial {record.trial}, which has no trial record"
            )
    if retrained and teacher is None:
        raise SlimnasError(f"{run.dir}/retrain has candidates but no teacher record (retrain/teacher/record.json)")


def read_sections(run_dir: Path) -> list[Section]:
    sections = []
    for name, title in SECTIONS.items():
        path = section_file(run_dir, name)
        if not path.is_file():
            continue
        values = read_json(path)
        if not isinstance(values, dict) or not all(isinstance(values.get(key), list) for key in ("columns", "rows")):
            raise SlimnasError(f"{path} needs lists 'columns' and 'rows'")
        image = path.with_suffix(".png")
        sections.append(
            Section(
                name=name,
                title=values.get("title", title),
                columns=values["columns"],
                rows=values["rows"],
                paired_columns=values.get("paired_columns", []),
                paired=values.get("paired", []),
                notes=values.get("notes", []),
                image=image.read_bytes() if image.is_file() else None,
            )
        )
    return sections


def read_one(run_dir: Path) -> Run:
    info = read_run(run_dir)
    if info.get("kind") in SECTION_KINDS:
        sections = read_sections(run_dir)
        if not sections:
            raise SlimnasError(f"{run_dir} is a {info['kind']} run with no table yet: it has not finished")
        return Run(run_dir, info, [], None, [], {}, [], None, {}, [], sections)
    check_info(info, run_dir)
    trials = read_records(run_dir)
    check_trials(trials, run_dir)
    retrained = read_retrained(run_dir)
    teacher = next((r for r in retrained if r.name == TEACHER), None)
    candidates = [r for r in retrained if r.name != TEACHER]
    run = Run(
        dir=run_dir,
        info=info,
        trials=trials,
        teacher=teacher,
        retrained=candidates,
        kd_curves={r.name: read_kd_curve(run_dir, r.name) for r in candidates},
        screen=read_screen(run_dir),
        race=read_race(run_dir, trials),
        front=read_front(run_dir),
        unfinished=unfinished_retrains(run_dir),
        sections=read_sections(run_dir),
    )
    check_retrained(candidates, teacher, run)
    return run


def read_runs(run_dirs: list[Path]) -> list[Run]:
    """Every run directory, read and checked; rows of the leaderboard are tagged by directory name."""
    if not run_dirs:
        raise SlimnasError("no run directory given: slimnas report RUN_DIR [RUN_DIR ...]")
    runs = [read_one(Path(d).resolve()) for d in run_dirs]
    names = [run.name for run in runs]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise SlimnasError(f"two run directories are named {repeated[0]}: rows are tagged by directory name")
    return runs
