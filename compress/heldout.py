"""Held-out quality of a student: full-vocabulary KL to the teacher and perplexity, with error bars.

The teacher runs once over the rows and its final hidden states are kept; each evaluation then costs
one student forward pass plus both vocabulary projections, and needs no optimizer. Every number is a
mean over rows with the standard error of that mean, and the per-row values are kept so that two
students scored on the same rows can be compared pairwise.
"""

import math
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from slimnas.compress.kd_loss import IGNORE, LiveTarget, next_token_labels, token_losses
from slimnas.compress.runtime.device import autocast, model_device
from slimnas.compress.runtime.stats import mean_and_stderr


@dataclass
class HeldoutMetrics:
    split: str  # the corpus split the rows came from (selection or evaluation)
    rows: int
    tokens: int
    kl: float  # mean full-vocabulary KL(teacher || student) per position
    kl_stderr: float
    perplexity: float
    perplexity_stderr: float  # delta method: perplexity x stderr of the mean log-loss
    kl_per_row: list[float]
    nll_per_row: list[float]

    def summary(self) -> dict:
        """The numbers without the per-row lists, for tables and progress lines."""
        return {k: v for k, v in self.__dict__.items() if not k.endswith("_per_row")}


class HeldoutSet:
    def __init__(self, split: str, rows: torch.Tensor, teacher: PreTrainedModel, precision: str, batch_size: int = 8):
        self.split, self.rows, self.precision, self.batch_size = split, rows, precision, batch_size
        self.teacher_lm_head = teacher.lm_head
        device = model_device(teacher)
        with torch.no_grad(), autocast(device, precision):
            self.teacher_hidden = [
                teacher.model(input_ids=rows[i : i + batch_size].to(device), use_cache=False).last_hidden_state.float()
                for i in range(0, len(rows), batch_size)
            ]

    @torch.no_grad()
    def evaluate(self, student: PreTrainedModel) -> HeldoutMetrics:
        was_training = student.training
        student.eval()
        device = model_device(student)
        kl_rows, nll_rows = [], []
        for index, start in enumerate(range(0, len(self.rows), self.batch_size)):
            input_ids = self.rows[start : start + self.batch_size].to(device)
            labels = next_token_labels(input_ids)
            target = LiveTarget(self.teacher_hidden[index].flatten(0, 1), self.teacher_lm_head)
            with autocast(device, self.precision):
                hidden = student.model(input_ids=input_ids, use_cache=False).last_hidden_state.flatten(0, 1)
                kl, nll = token_losses(hidden, student.lm_head, labels.flatten(), target)
            labelled = (labels != IGNORE).sum(1)
            kl_rows += kl.view_as(labels).mean(1).tolist()
            nll_rows += (nll.view_as(labels).sum(1) / labelled).tolist()
        student.train(was_training)
        kl, kl_stderr = mean_and_stderr(kl_rows)
        nll, nll_stderr = mean_and_stderr(nll_rows)
        perplexity = math.exp(nll)
        return HeldoutMetrics(
            split=self.split,
            rows=len(self.rows),
            tokens=self.rows.numel(),
            kl=kl,
            kl_stderr=kl_stderr,
            perplexity=perplexity,
            perplexity_stderr=perplexity * nll_stderr,
            kl_per_row=kl_rows,
            nll_per_row=nll_rows,
        )
