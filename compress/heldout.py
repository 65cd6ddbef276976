"""Held-out quality of a student: full-vocabulary KL to the teacher and perplexity, with error bars over documents.

A held-out set has one row per document (compress.corpus), so every number is a mean over documents,
its standard error is over documents, and the per-document values are kept so that two students scored
on the same documents can be compared pairwise.

The teacher runs once over the rows: its log-probabilities over the whole vocabulary are computed in
fp32, its probabilities kept in fp16 (CPU memory: 0.1 MB per position for a 49k vocabulary) with
sum p log p per position. Each evaluation then costs one student forward pass and its vocabulary
projection, in fp32 even under bf16 autocast: the differences being measured are hundredths of a nat,
below bf16's resolution of large logits. With z the student's logits, KL = sum p log p - (p . z -
logsumexp z . sum p), so an evaluation needs no student softmax over the vocabulary. The weights p are
the fp16-rounded probabilities in both terms: the teacher scores exactly 0, and every student is
weighted alike (the rounding moves a KL by about 1e-4 relative, the same way for every student).

A cheaper set for many evaluations (the block library's cuts) is a `subset`: the first documents, scored on the
last positions of each: whole rows still run through the model (every scored position keeps its context), only
the scored positions go through the vocabulary projection, and the teacher's numbers are sliced, not recomputed.
"""

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from slimnas.compress.kd_loss import IGNORE, next_token_labels
from slimnas.core.device import autocast, model_device
from slimnas.core.errors import SlimnasError
from slimnas.core.stats import mean_and_stderr

CHUNK_POSITIONS = 1024  # positions per vocabulary-sized block: [1024, vocab] fp32 is 200 MB for 49k entries


@dataclass
class HeldoutMetrics:
    split: str  # what the documents are: selection, evaluation, or another text's name
    documents: int
    tokens: int
    kl: float  # mean over documents of the mean full-vocabulary KL(teacher || student) per position
    kl_stderr: float  # over documents
    perplexity: float  # exp of the mean over documents of the per-token negative log-likelihood
    perplexity_stderr: float  # delta method: perplexity x stderr of that mean
    kl_per_doc: list[float]
    nll_per_doc: list[float]

    def summary(self) -> dict:
        """The numbers without the per-document lists, for tables and progress lines."""
        return {k: v for k, v in self.__dict__.items() if not k.endswith("_per_doc")}


def _hidden_states(model: PreTrainedModel, rows: torch.Tensor, precision: str, batch_size: int) -> torch.Tensor:
    """Final hidden states [documents, tokens, hidden] in fp32 (the transformer body runs under the command's
    autocast)."""
    device = model_device(model)
    with autocast(device, precision):
        states = [
            model.model(input_ids=rows[i : i + batch_size].to(device), use_cache=False).last_hidden_state.float()
            for i in range(0, len(rows), batch_size)
        ]
    return torch.cat(states)


def _logits(hidden: torch.Tensor, lm_head: torch.nn.Module) -> torch.Tensor:
    """Vocabulary logits projected in fp32, whatever the autocast outside."""
    with torch.autocast(hidden.device.type, enabled=False):
        return F.linear(hidden.float(), lm_head.weight.float())


class HeldoutSet:
    @torch.no_grad()
    def __init__(self, split: str, rows: torch.Tensor, teacher: PreTrainedModel, precision: str, batch_size: int = 8):
        self.split, self.rows, self.precision, self.batch_size = split, rows, precision, batch_size
        self.positions = rows.shape[1]  # scored per document: the last ones (all but in a `subset`)
        hidden = _hidden_states(teacher, rows, precision, batch_size).flatten(0, 1)
        probs, negentropy = [], []
        for start in range(0, len(hidden), CHUNK_POSITIONS):
            log_p = F.log_softmax(_logits(hidden[start : start + CHUNK_POSITIONS], teacher.lm_head), dim=-1)
            kept = log_p.exp().to(torch.float16)  # the weights every evaluation uses, rounded once
            probs.append(kept.cpu())
            negentropy.append((kept.float() * log_p).sum(-1).cpu())  # with the same weights: the teacher scores 0
        self.teacher_probs, self.teacher_negentropy = torch.cat(probs), torch.cat(negentropy)

    def subset(self, documents: int | None = None, positions: int | None = None) -> "HeldoutSet":
        """The first `documents` documents scored on the last `positions` of each (None: all; at most what this set
        has), from this set's teacher numbers: the same set when both are None."""
        n = len(self.rows) if documents is None else min(documents, len(self.rows))
        p = self.positions if positions is None else min(positions, self.positions)
        if n < 1 or p < 1:
            raise SlimnasError(f"a held-out subset needs at least one document and one position, not {n} x {p}")
        part = copy.copy(self)
        part.rows, part.positions = self.rows[:n], p
        per_document = (len(self.rows), self.positions)
        part.teacher_probs = self.teacher_probs.view(*per_document, -1)[:n, -p:].flatten(0, 1)
        part.teacher_negentropy = self.teacher_negentropy.view(per_document)[:n, -p:].flatten()
        return part

    def scored(self, hidden: torch.Tensor) -> torch.Tensor:
        """Hidden states [documents, tokens, hidden] of these rows as `score` takes them: the scored positions,
        flattened."""
        return hidden[:, -self.positions :].flatten(0, 1)

    @torch.no_grad()
    def hidden_states(self, model: PreTrainedModel) -> torch.Tensor:
        """A model's final hidden states on these documents' scored positions, [positions, hidden] in fp32: what
        `score` takes."""
        return self.scored(_hidden_states(model, self.rows, self.precision, self.batch_size))

    @torch.no_grad()
    def evaluate(self, student: PreTrainedModel) -> HeldoutMetrics:
        was_training = student.training
        student.eval()
        metrics = self.score(self.hidden_states(student), student.lm_head)
        student.train(was_training)
        return metrics

    @torch.no_grad()
    def score(self, hidden: torch.Tensor, lm_head: torch.nn.Module) -> HeldoutMetrics:
        """The metrics of final hidden states of these documents' positions (`hidden_states`' layout), projected by
        `lm_head`: the block library scores its cuts here without building whole models."""
        labels = next_token_labels(self.rows)[:, -self.positions :].flatten().to(hidden.device)
        cross, nll = [], []  # per position: sum p log q (q the student's distribution), and -log q(label)
        for start in range(0, len(hidden), CHUNK_POSITIONS):
            end = start + CHUNK_POSITIONS
            logits = _logits(hidden[start:end], lm_head)
            normaliser = torch.logsumexp(logits, dim=-1)
            probs = self.teacher_probs[start:end].to(hidden.device, torch.float32)
            cross.append((probs * logits).sum(-1) - normaliser * probs.sum(-1))
            nll.append(normaliser - logits.gather(-1, labels[start:end].clamp(min=0)[:, None]).squeeze(-1))
        shape = (len(self.rows), self.positions)
        kl = self.teacher_negentropy.view(shape) - torch.cat(cross).cpu().view(shape)
        labelled = (labels != IGNORE).view(shape).float().cpu()
        kl_docs = kl.mean(1).tolist()
        nll_docs = ((torch.cat(nll).cpu().view(shape) * labelled).sum(1) / labelled.sum(1)).tolist()
        kl_mean, kl_stderr = mean_and_stderr(kl_docs)
        nll_mean, nll_stderr = mean_and_stderr(nll_docs)
        perplexity = math.exp(nll_mean)
        return HeldoutMetrics(
            split=self.split,
            documents=len(self.rows),
            tokens=len(self.rows) * self.positions,
            kl=kl_mean,
            kl_stderr=kl_stderr,
            perplexity=perplexity,
            perplexity_stderr=perplexity * nll_stderr,
            kl_per_doc=kl_docs,
            nll_per_doc=nll_docs,
        )
