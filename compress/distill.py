"""Knowledge distillation of a pruned student: logit KL (+ optional CE and hidden-state losses).

A plain loop: AdamW, linear warmup then cosine decay, gradient clipping and accumulation, a budget
in tokens. The batch of every step is a pure function of (seed, step), and the checkpoint holds
model, optimizer, scheduler, step and RNG, so an interrupted run resumes to the same final weights.
"""

import json
import math
import os
import time
from collections.abc import Callable, Collection
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm
from transformers import PreTrainedModel

from compress import interrupt
from compress.corpus import TokenSplit
from compress.errors import SlimnasError
from compress.fingerprint import hash_json
from compress.kd_loss import LiveTarget, TopKTarget, distillation_losses, next_token_labels
from compress.models import LoadedModel
from compress.precision import autocast
from compress.teacher_cache import TeacherLogitCache

STATE_FILE = "train_state.pt"
METRICS_FILE = "metrics.jsonl"


@dataclass(frozen=True)
class DistillSettings:
    budget_tokens: int = 100_000
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-4
    min_lr_ratio: float = 0.1
    warmup_fraction: float = 0.05
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    temperature: float = 1.0
    ce_weight: float = 0.0
    hidden_weight: float = 0.0
    hidden_layers: tuple[tuple[int, int], ...] = ()  # (student layer, teacher layer) output pairs
    teacher_mode: str = "cache"  # cache (top-k logits on disk) or live
    top_k: int = 64
    chunk_tokens: int = 1024
    eval_every: int = 50
    eval_rows: int = 16
    save_every: int = 50
    precision: str = "auto"
    seed: int = 0

    def __post_init__(self):
        if self.teacher_mode not in ("cache", "live"):
            raise SlimnasError(f"teacher_mode must be cache or live, not {self.teacher_mode!r}")
        if self.hidden_weight > 0 and (self.teacher_mode != "live" or not self.hidden_layers):
            raise SlimnasError("a hidden-state loss needs teacher_mode=live and hidden_layers pairs")
        if self.budget_tokens < 1 or self.batch_size < 1 or self.grad_accum < 1:
            raise SlimnasError("budget_tokens, batch_size and grad_accum must be at least 1")


@dataclass
class DistillResult:
    steps: int
    tokens: int
    seconds: float
    tokens_per_second: float
    initial: dict = field(default_factory=dict)  # held-out kl and perplexity before training
    final: dict = field(default_factory=dict)


class LiveTeacher:
    """Runs the teacher on every batch: exact KL, and hidden states for the hidden-state loss."""

    def __init__(self, model: PreTrainedModel, precision: str, need_hidden: bool):
        self.model, self.precision, self.need_hidden = model, precision, need_hidden

    def prepare(self, n_train_rows: int, n_heldout_rows: int) -> None:
        pass

    @torch.no_grad()
    def targets(self, split: str, rows: torch.Tensor, input_ids: torch.Tensor):
        device = next(self.model.parameters()).device
        with autocast(device, self.precision):
            out = self.model.model(input_ids=input_ids, use_cache=False, output_hidden_states=self.need_hidden)
        target = LiveTarget(out.last_hidden_state.flatten(0, 1), self.model.lm_head)
        return target, out.hidden_states


class CachedTeacher:
    """Reads top-k teacher logits from memory-mapped caches (one per split); builds what is missing."""

    def __init__(self, caches: dict[str, TeacherLogitCache], teacher: PreTrainedModel, precision: str):
        self.caches, self.teacher, self.precision = caches, teacher, precision

    def prepare(self, n_train_rows: int, n_heldout_rows: int) -> None:
        for split, n_rows in (("train", n_train_rows), ("heldout", n_heldout_rows)):
            self.caches[split].ensure(n_rows, self.teacher, precision=self.precision)

    def targets(self, split: str, rows: torch.Tensor, input_ids: torch.Tensor):
        target = self.caches[split].target(rows)
        return TopKTarget(*(t.to(input_ids.device) for t in (target.values, target.indices, target.logsumexp))), None


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


def hidden_maps(student: PreTrainedModel, teacher_hidden: int, pairs) -> nn.ModuleList:
    """Learned linear maps from student to teacher width, started at the identity on shared channels."""
    maps = nn.ModuleList()
    for _ in pairs:
        linear = nn.Linear(student.config.hidden_size, teacher_hidden, bias=False)
        with torch.no_grad():
            linear.weight.copy_(torch.eye(teacher_hidden, student.config.hidden_size))
        maps.append(linear)
    return maps.to(next(student.parameters()).device)


def _save_state(path: Path, state: dict) -> None:
    staging = path.with_suffix(".partial")
    torch.save(state, staging)
    os.replace(staging, path)


def _truncate_metrics(path: Path, last_step: int) -> None:
    if path.exists():
        kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= last_step]
        path.write_text("".join(line + "\n" for line in kept))


class Distiller:
    """One KD run of a student against a teacher source, to a token budget, resumable from out_dir."""

    def __init__(
        self,
        student: PreTrainedModel,
        teacher: LiveTeacher | CachedTeacher,
        train_rows: torch.Tensor,
        heldout_rows: torch.Tensor,
        settings: DistillSettings,
        out_dir: Path,
        teacher_hidden_size: int | None = None,
    ):
        self.student, self.teacher, self.settings, self.out_dir = student, teacher, settings, out_dir
        self.device = next(student.parameters()).device
        seq_len = train_rows.shape[1]
        self.tokens_per_step = settings.batch_size * settings.grad_accum * seq_len
        self.total_steps = max(1, settings.budget_tokens // self.tokens_per_step)
        self.n_rows = min(len(train_rows), math.ceil(self.total_steps * self.tokens_per_step / seq_len))
        self.train_rows, self.heldout_rows = train_rows, heldout_rows[: settings.eval_rows]
        width = teacher_hidden_size or student.config.hidden_size
        self.maps = hidden_maps(student, width, settings.hidden_layers) if settings.hidden_weight > 0 else None
        parameters = list(student.parameters()) + (list(self.maps.parameters()) if self.maps else [])
        self.optimizer = torch.optim.AdamW(
            parameters, lr=settings.lr, weight_decay=settings.weight_decay, betas=(0.9, 0.95)
        )
        warmup = max(1, int(settings.warmup_fraction * self.total_steps))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: warmup_cosine(s, warmup, self.total_steps, settings.min_lr_ratio)
        )
        self.settings_key = hash_json(asdict(settings))

    def _losses(self, split: str, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        input_ids = (self.train_rows if split == "train" else self.heldout_rows)[rows].to(self.device)
        target, teacher_states = self.teacher.targets(split, rows, input_ids)
        need_hidden = self.maps is not None
        with autocast(self.device, self.settings.precision):
            out = self.student.model(input_ids=input_ids, use_cache=False, output_hidden_states=need_hidden)
            hidden = out.last_hidden_state.flatten(0, 1)
            labels = next_token_labels(input_ids).flatten()
            kl, ce = distillation_losses(
                hidden, self.student.lm_head, labels, target, self.settings.temperature, self.settings.chunk_tokens
            )
            hidden_loss = torch.zeros((), device=self.device)
            if need_hidden:
                for linear, (s_layer, t_layer) in zip(self.maps, self.settings.hidden_layers, strict=True):
                    teacher_state = teacher_states[t_layer + 1].float()
                    mapped = linear(out.hidden_states[s_layer + 1]).float()
                    hidden_loss = hidden_loss + F.mse_loss(mapped, teacher_state) / teacher_state.pow(2).mean()
        return kl, ce, hidden_loss

    @torch.no_grad()
    def evaluate(self) -> dict:
        was_training = self.student.training
        self.student.eval()
        kl_sum, ce_sum = 0.0, 0.0
        n_rows = len(self.heldout_rows)
        for start in range(0, n_rows, self.settings.batch_size):
            rows = torch.arange(start, min(start + self.settings.batch_size, n_rows))
            kl, ce, _ = self._losses("heldout", rows)
            kl_sum, ce_sum = kl_sum + kl.item() * len(rows), ce_sum + ce.item() * len(rows)
        self.student.train(was_training)
        return {"heldout_kl": kl_sum / n_rows, "heldout_perplexity": math.exp(ce_sum / n_rows)}

    def _state(self, step: int) -> dict:
        return {
            "step": step,
            "settings_key": self.settings_key,
            "model": self.student.state_dict(),
            "maps": self.maps.state_dict() if self.maps else None,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": torch.get_rng_state(),
        }

    def _resume(self, path: Path) -> int:
        state = torch.load(path, weights_only=False)
        if state["settings_key"] != self.settings_key:
            raise SlimnasError(f"{path} belongs to a run with other settings: use another out directory")
        self.student.load_state_dict(state["model"])
        if self.maps:
            self.maps.load_state_dict(state["maps"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        return state["step"]

    def run(
        self,
        on_step: Callable[[int, dict | None], None] | None = None,
        progress_bar: bool = True,
        eval_steps: Collection[int] = (),
        resumable: bool = True,
    ) -> DistillResult:
        """Train to the token budget, resuming from out_dir if a checkpoint is there.

        Held-out metrics are computed before training, every `eval_every` steps, at the last step and at
        `eval_steps`; `on_step(step, metrics)` sees them (None between evaluations), e.g. to stop at a rung.
        `resumable=False` writes no checkpoint, for callers that never resume (a search trial).
        """
        settings, out = self.settings, self.out_dir
        out.mkdir(parents=True, exist_ok=True)
        state_path, metrics_path = out / STATE_FILE, out / METRICS_FILE
        self.teacher.prepare(self.n_rows, len(self.heldout_rows))
        torch.manual_seed(settings.seed)
        start = self._resume(state_path) if state_path.exists() else 0
        _truncate_metrics(metrics_path, start)
        initial = self.evaluate() if start == 0 else {}
        if initial:
            self._log(metrics_path, {"step": 0, **initial})
            if on_step:
                on_step(0, initial)
        self.student.train()
        started, last_eval = time.perf_counter(), initial
        progress = tqdm(total=self.total_steps, initial=start, desc="distill", unit="step", disable=not progress_bar)
        try:
            for step in range(start, self.total_steps):
                interrupt.check()
                kl, ce, hidden_loss = self._train_step(step)
                step_done = step + 1
                elapsed = time.perf_counter() - started
                tokens_per_second = (step_done - start) * self.tokens_per_step / max(elapsed, 1e-9)
                record = {"step": step_done, "tokens": step_done * self.tokens_per_step, "kl": kl, "ce": ce}
                record.update(hidden=hidden_loss, lr=self.scheduler.get_last_lr()[0], tokens_per_s=tokens_per_second)
                self._log(metrics_path, record)
                progress.set_postfix(kl=f"{kl:.3f}", tok_s=f"{tokens_per_second:.0f}")
                progress.update(1)
                evaluation = None
                if step_done % settings.eval_every == 0 or step_done == self.total_steps or step_done in eval_steps:
                    evaluation = last_eval = self.evaluate()
                    self._log(metrics_path, {"step": step_done, **last_eval})
                if resumable and (step_done % settings.save_every == 0 or step_done == self.total_steps):
                    _save_state(state_path, self._state(step_done))
                if on_step:
                    on_step(step_done, evaluation)
        finally:
            progress.close()
        if not last_eval:  # resumed a finished run: nothing trained, still report where it stands
            last_eval = self.evaluate()
        seconds = time.perf_counter() - started
        trained_tokens = (self.total_steps - start) * self.tokens_per_step
        return DistillResult(
            steps=self.total_steps,
            tokens=self.total_steps * self.tokens_per_step,
            seconds=seconds,
            tokens_per_second=trained_tokens / max(seconds, 1e-9),
            initial=initial,
            final=last_eval,
        )

    def _train_step(self, step: int) -> tuple[float, float, float]:
        settings = self.settings
        totals = [0.0, 0.0, 0.0]
        for micro in range(settings.grad_accum):
            rows = batch_rows(step * settings.grad_accum + micro, settings.batch_size, self.n_rows, settings.seed)
            kl, ce, hidden_loss = self._losses("train", rows)
            loss = kl + settings.ce_weight * ce + settings.hidden_weight * hidden_loss
            if not torch.isfinite(loss):
                raise SlimnasError(
                    f"non-finite loss at step {step + 1}; the last good checkpoint is kept in {self.out_dir}"
                )
            (loss / settings.grad_accum).backward()
            for i, value in enumerate((kl, ce, hidden_loss)):
                totals[i] += value.item() / settings.grad_accum
        torch.nn.utils.clip_grad_norm_(self.optimizer.param_groups[0]["params"], settings.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return totals[0], totals[1], totals[2]

    @staticmethod
    def _log(path: Path, record: dict) -> None:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")


def teacher_source(
    teacher: LoadedModel, data: TokenSplit, settings: DistillSettings, cache_dir: Path
) -> LiveTeacher | CachedTeacher:
    """The teacher side of KD: live forward passes, or the shared top-k cache (the teacher only fills it)."""
    if settings.teacher_mode == "live":
        return LiveTeacher(teacher.model, settings.precision, settings.hidden_weight > 0)
    vocab = teacher.model.config.vocab_size
    caches = {
        split: TeacherLogitCache.open(cache_dir, teacher.fingerprint, rows, settings.top_k, settings.temperature, vocab)
        for split, rows in (("train", data.train), ("heldout", data.heldout[: settings.eval_rows]))
    }
    return CachedTeacher(caches, teacher.model, settings.precision)
