"""Knowledge distillation of a pruned student: logit KL (+ optional CE and hidden-state losses).

A plain loop: AdamW, linear warmup then cosine decay, gradient clipping and accumulation, a budget
in tokens. `Distiller.train_until(step)` trains and nothing else, so a search trial can stop at any
rung; `distill_to_budget` adds the held-out evaluations, the metrics log and resumable checkpoints
around it for `slimnas distill` and `slimnas retrain`.

The batch of every step is a pure function of (seed, step), and the checkpoint holds model, optimizer,
step and RNG, so an interrupted run resumes to the same final weights. The checkpoint is one
safetensors file (tensors, plus the counters as JSON in its header): loading it cannot run code.

A step's phases are named for torch.profiler (`record_function`): "kd.teacher" (the teacher's targets: a live
forward or a read of the cache), "kd.student" (the student's body), "kd.backward", "kd.optimizer" (clipping and the
update), and kd_loss's "kd.head" and "kd.kl"; slimnas.bench.roofline profiles a step by them.
"""

import contextlib
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn
from torch.profiler import record_function
from tqdm import tqdm
from transformers import PreTrainedModel

from slimnas.compress.heldout import HeldoutSet
from slimnas.compress.kd_loss import IGNORE, next_token_labels, token_losses
from slimnas.compress.models import LoadedModel
from slimnas.compress.settings import DistillSettings
from slimnas.compress.teacher_targets import (
    CachedTeacherTargets,
    LiveTeacherTargets,
    TeacherTargets,
    TopKLogitCache,
    capture_layer_outputs,
)
from slimnas.core import distributed, interrupt
from slimnas.core.device import autocast, model_device
from slimnas.core.errors import SlimnasError
from slimnas.core.files import atomic_path, atomic_write_text, hash_json
from slimnas.core.rundir import METRICS_FILE, STATE_FILE


def warmup_cosine(step: int, warmup: int, total: int, min_ratio: float) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def batch_rows(micro_step: int, batch_size: int, n_rows: int, seed: int) -> torch.Tensor:
    """Rows of one micro-batch: a fresh seeded permutation of the used rows every epoch."""
    permutations: dict[int, torch.Tensor] = {}
    rows = []
    for position in range(micro_step * batch_size, (micro_step + 1) * batch_size):
        epoch, offset = divmod(position, n_rows)
        if epoch not in permutations:
            generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
            permutations[epoch] = torch.randperm(n_rows, generator=generator)
        rows.append(int(permutations[epoch][offset]))
    return torch.tensor(rows)


@dataclass
class HiddenStateMatch:
    """Which student layer outputs are matched to which teacher layer outputs, through learned linear maps.

    Student layer i was teacher layer `kept_layers[i]`, and student channel c was teacher channel
    `kept_channels[c]` (from the prune plan), so each map starts as the embedding that puts every
    student channel back where it came from: before any training, a student that kept exactly the
    teacher's signal has zero hidden-state loss.
    """

    pairs: list[tuple[int, int]]  # (student layer, teacher layer)
    maps: nn.ModuleList

    @classmethod
    def build(
        cls, layers: tuple[int, ...], kept_layers: list[int], kept_channels: list[int], teacher_hidden: int
    ) -> "HiddenStateMatch":
        n_student = len(kept_layers)
        pairs = []
        for layer in layers:
            if not -n_student <= layer < n_student:
                raise SlimnasError(f"distill.hidden_layers: the student has no layer {layer} ({n_student} layers)")
            pairs.append((layer % n_student, kept_layers[layer % n_student]))
        maps = nn.ModuleList()
        for _ in pairs:
            linear = nn.Linear(len(kept_channels), teacher_hidden, bias=False)
            with torch.no_grad():
                linear.weight.zero_()
                linear.weight[kept_channels, torch.arange(len(kept_channels))] = 1.0
            maps.append(linear)
        return cls(pairs, maps)

    def loss(self, student_outputs: dict, teacher_outputs: dict) -> torch.Tensor:
        """Sum over pairs of the MSE normalised by the teacher's mean square (scale-free across layers).

        Under torchrun the mean square is the global batch's, not this rank's share's: DistributedDataParallel
        averages the ranks' gradients, which is the one-process gradient only when every rank divides by the same
        number (as the KL's mean over equal shares does)."""
        total = torch.zeros((), device=next(self.maps.parameters()).device)
        for linear, (s_layer, t_layer) in zip(self.maps, self.pairs, strict=True):
            teacher_state = teacher_outputs[t_layer].float()
            mapped = linear(student_outputs[s_layer].float())
            total = total + F.mse_loss(mapped, teacher_state) / distributed.mean(teacher_state.pow(2).mean())
        return total


def make_teacher_targets(
    settings: DistillSettings,
    teacher: LoadedModel,
    train_rows: torch.Tensor,
    cache_dir: Path,
    hidden_match: HiddenStateMatch | None = None,
) -> TeacherTargets:
    """Live forward passes, or the shared top-k cache on disk (the teacher only fills it)."""
    if settings.teacher_mode == "live":
        layers = [t for _, t in hidden_match.pairs] if hidden_match else []
        return LiveTeacherTargets(teacher.model, settings.precision, layers)
    vocab = teacher.model.config.vocab_size
    cache = TopKLogitCache.open(
        cache_dir, teacher.fingerprint, train_rows, settings.top_k, settings.temperature, vocab, settings.precision
    )
    return CachedTeacherTargets(cache, teacher.model, settings.precision)


def build_distiller(
    student: PreTrainedModel,
    teacher: LoadedModel | None,
    train_rows: torch.Tensor,
    settings: DistillSettings,
    budget_tokens: int,
    cache_dir: Path,
    cut: tuple[list[int], list[int]] | None = None,
    targets: TeacherTargets | None = None,
) -> "Distiller":
    """The one way a KD run is built: slimnas distill, a search trial, the leaders' extension, retraining, and
    (with no teacher: next-token loss alone) teacher correction. The stage that owns the budget passes it here.

    `targets`: the teacher's side shared by many runs (a search's or a retraining's top-k cache, filled once up
    front); else one is made from the settings. A hidden-state loss matches each student layer to the teacher
    layer it was cut from, so it needs the student's `cut` (its kept teacher layers and channels) and a live
    teacher of its own.
    """
    match = None
    if teacher is not None and settings.hidden_weight > 0:
        if cut is None:
            raise SlimnasError("a hidden-state loss needs the student's cut (the prune plan's layers and channels)")
        layers, channels = cut
        match = HiddenStateMatch.build(settings.hidden_layers, layers, channels, teacher.model.config.hidden_size)
        targets = make_teacher_targets(settings, teacher, train_rows, cache_dir, match)
    elif teacher is not None and targets is None:
        targets = make_teacher_targets(settings, teacher, train_rows, cache_dir)
    return Distiller(student, targets, train_rows, settings, budget_tokens, match)


class StudentLosses(nn.Module):
    """The student's forward and its losses as one module: DistributedDataParallel wraps it under torchrun, so
    every parameter a step uses (the body, the chunked vocabulary head, the hidden-state maps) is averaged."""

    def __init__(self, student: PreTrainedModel, settings: DistillSettings, hidden_match: HiddenStateMatch | None):
        super().__init__()
        self.student, self.settings, self.hidden_match = student, settings, hidden_match
        self.maps = hidden_match.maps if hidden_match is not None else None  # registered: trained and averaged too

    def forward(self, input_ids: torch.Tensor, target, teacher_outputs: dict):
        device = input_ids.device
        student_layers = [s for s, _ in self.hidden_match.pairs] if self.hidden_match else []
        student_outputs, handles = capture_layer_outputs(self.student, student_layers)
        try:
            with autocast(device, self.settings.precision):
                with record_function("kd.student"):
                    hidden = self.student.model(input_ids=input_ids, use_cache=False).last_hidden_state.flatten(0, 1)
                labels = next_token_labels(input_ids).flatten()
                kl, nll = token_losses(
                    hidden, self.student.lm_head, labels, target, self.settings.temperature, self.settings.chunk_tokens
                )
                kl, ce = kl.mean(), nll.sum() / max(1, int((labels != IGNORE).sum()))
                hidden_loss = (
                    self.hidden_match.loss(student_outputs, teacher_outputs)
                    if self.hidden_match
                    else torch.zeros((), device=device)
                )
        finally:
            for handle in handles:
                handle.remove()
        return kl, ce, hidden_loss


class Distiller:
    """Trains one student against teacher targets to a token budget; `step` is how far it has got.

    Under torchrun each rank takes its share of every global batch (`distributed.share`) and
    DistributedDataParallel averages the gradients, so N processes follow the one-process loss curve.
    """

    def __init__(
        self,
        student: PreTrainedModel,
        teacher_targets: TeacherTargets | None,  # None: next-token loss alone (teacher correction)
        train_rows: torch.Tensor,
        settings: DistillSettings,
        budget_tokens: int,
        hidden_match: HiddenStateMatch | None = None,
    ):
        self.student, self.teacher_targets, self.settings = student, teacher_targets, settings
        self.train_rows, self.hidden_match, self.budget_tokens = train_rows, hidden_match, budget_tokens
        self.device = model_device(student)
        seq_len = train_rows.shape[1]
        self.tokens_per_step = settings.tokens_per_step(seq_len)
        self.total_steps = settings.steps_for(budget_tokens, seq_len)
        self.n_rows = min(len(train_rows), settings.rows_for(budget_tokens, seq_len))
        if hidden_match is not None:
            hidden_match.maps.to(self.device)
        parameters = list(student.parameters()) + (list(hidden_match.maps.parameters()) if hidden_match else [])
        self.optimizer = torch.optim.AdamW(
            parameters, lr=settings.lr, weight_decay=settings.weight_decay, betas=(0.9, 0.95)
        )
        self.warmup = max(1, int(settings.warmup_fraction * self.total_steps))
        self.step = 0
        self.losses = StudentLosses(student, settings, hidden_match)
        if distributed.world() > 1:
            distributed.check_batch(settings.batch_size)
            devices = [self.device] if self.device.type == "cuda" else None
            self.losses = torch.nn.parallel.DistributedDataParallel(self.losses, device_ids=devices)

    def lr_at(self, step: int) -> float:
        return self.settings.lr * warmup_cosine(step, self.warmup, self.total_steps, self.settings.min_lr_ratio)

    def _losses(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rows = distributed.share(rows)  # this rank's rows of the global batch (all of them in one process)
        input_ids = self.train_rows[rows].to(self.device)
        target, teacher_outputs = None, {}
        if self.teacher_targets is not None:
            with record_function("kd.teacher"):
                target, teacher_outputs = self.teacher_targets.targets(rows, input_ids)
        return self.losses(input_ids, target, teacher_outputs)

    def train_until(self, step: int, progress: tqdm | None = None) -> list[dict]:
        """Train from the current step up to `step` (at most the total); returns one log line per step."""
        settings = self.settings
        if self.teacher_targets is not None:
            self.teacher_targets.prepare(self.n_rows)
        self.student.train()
        logs, started, first = [], time.perf_counter(), self.step
        while self.step < min(step, self.total_steps):
            interrupt.check()
            for group in self.optimizer.param_groups:
                group["lr"] = self.lr_at(self.step)
            totals = [0.0, 0.0, 0.0]
            for micro in range(settings.grad_accum):
                micro_step = self.step * settings.grad_accum + micro
                rows = batch_rows(micro_step, settings.batch_size, self.n_rows, settings.seed)
                last = micro == settings.grad_accum - 1
                synced = contextlib.nullcontext() if last or distributed.world() == 1 else self.losses.no_sync()
                with synced:  # gradients are averaged over the ranks once per step, after the last micro-batch
                    kl, ce, hidden_loss = self._losses(rows)
                    # terms of weight 0 stay out of the graph: their backward would cost a vocabulary pass
                    loss = kl if self.teacher_targets is not None else torch.zeros((), device=self.device)
                    if settings.ce_weight:
                        loss = loss + settings.ce_weight * ce
                    if settings.hidden_weight:
                        loss = loss + settings.hidden_weight * hidden_loss
                    if not torch.isfinite(loss):
                        raise SlimnasError(f"non-finite loss at step {self.step + 1}")
                    with record_function("kd.backward"):
                        (loss / settings.grad_accum).backward()
                for i, value in enumerate((kl, ce, hidden_loss)):
                    totals[i] += value.item() / settings.grad_accum
            totals = distributed.mean(torch.tensor(totals, dtype=torch.float64)).tolist()
            with record_function("kd.optimizer"):
                torch.nn.utils.clip_grad_norm_(self.optimizer.param_groups[0]["params"], settings.max_grad_norm)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            tokens_per_s = (self.step - first) * self.tokens_per_step / max(time.perf_counter() - started, 1e-9)
            logs.append(
                {
                    "step": self.step,
                    "tokens": self.step * self.tokens_per_step,
                    "train_kl": totals[0],
                    "train_ce": totals[1],
                    "train_hidden": totals[2],
                    "lr": self.lr_at(self.step - 1),
                    "tokens_per_s": tokens_per_s,
                }
            )
            if progress is not None:
                name, value = ("train_kl", totals[0]) if self.teacher_targets is not None else ("train_ce", totals[1])
                progress.set_postfix({name: f"{value:.3f}", "tok_s": f"{tokens_per_s:.0f}"})
                progress.update(1)
        return logs

    # Checkpoints: one safetensors file, counters and optimizer layout as JSON in its header.

    def save(self, path: Path, resume_key: str) -> None:
        tensors = {f"model.{k}": v.detach().clone().contiguous() for k, v in self.student.state_dict().items()}
        if self.hidden_match:
            tensors |= {f"maps.{k}": v.detach().clone() for k, v in self.hidden_match.maps.state_dict().items()}
        optimizer = self.optimizer.state_dict()
        for index, state in optimizer["state"].items():
            tensors |= {f"optimizer.{index}.{name}": value.clone() for name, value in state.items()}
        tensors["rng"] = torch.get_rng_state()
        meta = {"step": self.step, "resume_key": resume_key, "param_groups": optimizer["param_groups"]}
        with atomic_path(path) as staging:
            save_file(tensors, str(staging), metadata={"slimnas": json.dumps(meta)})

    def load(self, path: Path, resume_key: str) -> None:
        try:
            with safe_open(str(path), "pt") as f:
                meta = json.loads(f.metadata()["slimnas"])
                tensors = {key: f.get_tensor(key) for key in f.keys()}
        except (SafetensorError, OSError, KeyError, TypeError, ValueError, json.JSONDecodeError) as error:
            raise SlimnasError(f"corrupt or foreign resume state {path}: delete it or use another out") from error
        if meta.get("resume_key") != resume_key:
            raise SlimnasError(
                f"{path} belongs to a run of another student, teacher, corpus or settings: use another out directory"
            )
        self.student.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        if self.hidden_match:
            self.hidden_match.maps.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("maps.")})
        state: dict[int, dict] = {}
        for key, value in tensors.items():
            if key.startswith("optimizer."):
                _, index, name = key.split(".", 2)
                state.setdefault(int(index), {})[name] = value
        self.optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
        torch.set_rng_state(tensors["rng"])
        self.step = meta["step"]


@dataclass
class DistillResult:
    steps: int
    tokens: int
    seconds: float
    tokens_per_second: float
    initial: dict = field(default_factory=dict)  # held-out metrics before training (a fresh run only)
    final: dict = field(default_factory=dict)


def _truncate_metrics(path: Path, last_step: int) -> None:
    """Keep the log lines up to the resumed step (a line half-written when the run was killed goes too)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= last_step:
                kept.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    atomic_write_text(path, "".join(line + "\n" for line in kept))


def _log(path: Path, records: list[dict]) -> None:
    with open(path, "a") as f:
        f.writelines(json.dumps(record) + "\n" for record in records)


def distill_to_budget(
    distiller: Distiller, heldout: HeldoutSet, out_dir: Path, resume_identity: dict, progress_bar: bool = True
) -> DistillResult:
    """Train to the budget with held-out evaluations and checkpoints, resuming from out_dir when it has one.

    `resume_identity` names what the run starts from (student, teacher, corpus): a checkpoint of another
    run in the same directory is refused instead of being resumed silently.
    """
    settings = distiller.settings
    main = distributed.is_main()  # under torchrun rank 0 alone evaluates, logs and checkpoints
    out_dir.mkdir(parents=True, exist_ok=True)
    state_path, metrics_path = out_dir / STATE_FILE, out_dir / METRICS_FILE
    resume_key = hash_json([resume_identity, asdict(settings) | {"budget_tokens": distiller.budget_tokens}])
    torch.manual_seed(settings.seed)
    if state_path.exists():  # every rank resumes from the same state, whatever the process count that wrote it
        distiller.load(state_path, resume_key)
    start = distiller.step
    initial = {}
    if main:
        _truncate_metrics(metrics_path, start)
        initial = heldout.evaluate(distiller.student).summary() if start == 0 else {}
    if initial:
        _log(metrics_path, [{"step": 0, "tokens": 0, "heldout": initial}])
    total = distiller.total_steps
    started, final = time.perf_counter(), initial
    progress = tqdm(
        total=total, initial=start, desc="distill", unit="step", disable=not (progress_bar and main), leave=False
    )
    try:
        while distiller.step < total:
            step = distiller.step
            next_eval = (step // settings.eval_every + 1) * settings.eval_every
            next_save = (step // settings.save_every + 1) * settings.save_every
            logs = distiller.train_until(min(total, next_eval, next_save), progress)
            if not main:
                continue
            _log(metrics_path, logs)
            tokens = distiller.step * distiller.tokens_per_step
            if distiller.step % settings.eval_every == 0 or distiller.step == total:
                final = heldout.evaluate(distiller.student).summary()
                _log(metrics_path, [{"step": distiller.step, "tokens": tokens, "heldout": final}])
            if distiller.step % settings.save_every == 0 or distiller.step == total:
                distiller.save(state_path, resume_key)
    except SlimnasError as error:
        raise SlimnasError(f"{error}; the last good checkpoint is kept in {out_dir}") from error
    finally:
        progress.close()
    if not final and main:  # resumed a finished run: nothing trained, still report where it stands
        final = heldout.evaluate(distiller.student).summary()
    seconds = time.perf_counter() - started
    return DistillResult(
        steps=total,
        tokens=total * distiller.tokens_per_step,
        seconds=seconds,
        tokens_per_second=(total - start) * distiller.tokens_per_step / max(seconds, 1e-9),
        initial=initial,
        final=final,
    )
