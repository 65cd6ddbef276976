"""The screen: candidates scored by held-out KL right after pruning, before any KD (rung 0 for all at once).

Every feasible candidate when there are at most `search.screen.max_candidates`, else a seeded stratified
sample over the space (search.space.stratified_sample); or the candidates a proposal strategy gives (per-layer
ones: search.proposals). Each costs a prune and one evaluation on the
selection documents. The study starts with the screen's best (`search.screen.top_k`; the very best is
the zero-shot pick, NVIDIA ModelOpt's choice), and the sampler is told the rest (search.study).

The screen depends only on the teacher, the importance scores, the pruning policy, the selection
documents and the candidates, so it is a cache (CACHE/screens/KEY.jsonl, like importance): every search
with the same inputs (a rerun, another sampler, other seeds of the proof benchmark) reads it instead of
screening again. Each candidate is appended as soon as it is scored, so a killed screen resumes where it
stopped; processes sharing the cache take turns. The finished screen is copied to RUN_DIR/screen.jsonl.
"""

import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm import tqdm

from slimnas.compress.arch import Architecture, Shape, shape_of
from slimnas.compress.models import cache_root
from slimnas.compress.prune import plan_pruning, prune_model
from slimnas.core.files import atomic_path, hash_json, locked, read_jsonl
from slimnas.core.rundir import SCREEN_FILE
from slimnas.search.setup import SearchSetup
from slimnas.search.space import stratified_sample


@dataclass(frozen=True)
class Screened:
    arch: Shape
    kl: float  # mean over the selection documents, right after pruning
    kl_stderr: float
    kl_per_doc: list[float]
    seconds: float

    def as_line(self) -> dict:
        return {"architecture": self.arch.as_dict(), "label": self.arch.label(), "kl": self.kl,
                "kl_stderr": self.kl_stderr, "kl_per_doc": self.kl_per_doc, "seconds": self.seconds}  # fmt: skip


def to_screen(setup: SearchSetup) -> list[Architecture]:
    feasible, limit = list(setup.feasible), setup.settings.screen.max_candidates
    return feasible if len(feasible) <= limit else stratified_sample(feasible, limit, setup.settings.seed)


def screen_file(setup: SearchSetup, candidates: list[Shape]) -> Path:
    """The cache file of this screen: keyed by everything its numbers depend on."""
    context = setup.context
    key = hash_json([
        context.teacher.fingerprint, context.corpus.fingerprint, str(context.importance_path), asdict(setup.policy),
        setup.distill.precision, [arch.label() for arch in candidates],
    ])  # fmt: skip
    return cache_root() / "screens" / f"{key[:24]}.jsonl"


def _screened_before(path: Path) -> dict[Shape, Screened]:
    done = {}
    for line in read_jsonl(path) if path.is_file() else []:
        arch = shape_of(line["architecture"])
        done[arch] = Screened(arch, line["kl"], line["kl_stderr"], line["kl_per_doc"], line["seconds"])
    return done


def run_screen(setup: SearchSetup, candidates: list[Shape] | None = None) -> list[Screened]:
    """The candidates (default: `to_screen`), scored (or read back), best (lowest KL) first; also in
    RUN_DIR/screen.jsonl."""
    candidates = to_screen(setup) if candidates is None else candidates
    path = screen_file(setup, candidates)
    teacher = setup.context.teacher.model
    with locked(path.with_suffix(".lock")):
        done = _screened_before(path)
        missing = [arch for arch in candidates if arch not in done]
        with open(path, "a") as lines:
            for arch in tqdm(missing, desc="screen (KL right after pruning)", unit="candidate", leave=False):
                started = time.perf_counter()
                plan = plan_pruning(setup.context.importance, teacher.config, arch, setup.policy)
                metrics = setup.selection.evaluate(prune_model(teacher, plan, arch))
                seconds = time.perf_counter() - started
                done[arch] = Screened(arch, metrics.kl, metrics.kl_stderr, metrics.kl_per_doc, seconds)
                lines.write(json.dumps(done[arch].as_line()) + "\n")
                lines.flush()
    with atomic_path(setup.run_dir / SCREEN_FILE) as staging:
        shutil.copyfile(path, staging)
    return sorted((done[arch] for arch in candidates), key=lambda s: (s.kl, s.arch.label()))
