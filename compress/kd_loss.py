"""Vocabulary-sized distillation losses, computed in chunks of positions.

The vocabulary projection dominates a KD step on CPU, and a [positions, vocab] tensor per model is the
largest thing a step holds. So the student's lm_head runs chunk by chunk; when a step has more
positions than one chunk, each chunk is checkpointed, so its logits exist only while that chunk's
loss (and, in backward, its gradient) is computed. A step that fits in one chunk is not
checkpointed: recomputing the projection would cost a third more of it for no memory saved.

The step's phases are named for torch.profiler (`record_function`: next to no cost while no profiler runs): the head's
projection (and, against a top-k cache, its log-softmax) is "kd.head", the KL on the teacher's targets "kd.kl"
(slimnas.bench.roofline reads them; compress.distill names the others).

Teacher targets come in two forms:
- LiveTarget: the teacher's final hidden states; its lm_head runs per chunk (the full-vocabulary KL, FullVocabKD).
- TopKTarget: cached top-k teacher logits plus the full log-sum-exp; the mass outside the top k is one
  "tail" bucket on both sides, so with k = vocab the loss is the full KL, and below that it is a
  lower bound of it (merging outcomes never increases a KL).
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import record_function
from torch.utils.checkpoint import checkpoint

IGNORE = -100


@dataclass
class LiveTarget:
    hidden: torch.Tensor  # [n, teacher hidden]
    lm_head: nn.Module

    def chunk(self, start: int, end: int) -> "LiveTarget":
        return LiveTarget(self.hidden[start:end], self.lm_head)


@dataclass
class TopKTarget:
    values: torch.Tensor  # [n, k] teacher logits at the top-k indices
    indices: torch.Tensor  # [n, k] int64
    logsumexp: torch.Tensor  # [n] log-sum-exp of all teacher logits / temperature

    def chunk(self, start: int, end: int) -> "TopKTarget":
        return TopKTarget(self.values[start:end], self.indices[start:end], self.logsumexp[start:end])


class FullVocabKD(torch.autograd.Function):
    """KL(teacher || student) and the next-token NLL per position, from both models' logits over the full vocabulary,
    with the gradient written by hand.

    Why not autograd: log_softmax -> kl_div -> gather keeps the same vocabulary-sized tensors but walks them about ten
    times in the backward (kl_div's, log_softmax's, the NLL's scatter, their sum). The gradient of both losses with
    respect to the student's logits is one expression, (softmax_s (g_kl + g_nll) - g_kl p_t - g_nll onehot) / T,
    computed in place over the two tensors the forward saves. The NLL is under the tempered student (the caller
    uses it at temperature 1, where it is the usual one).
    """

    @staticmethod
    def forward(ctx, logits, teacher_logits, labels, temperature: float):
        student_logp = F.log_softmax(logits / temperature if temperature != 1.0 else logits, dim=-1)
        teacher_logp = F.log_softmax(teacher_logits / temperature if temperature != 1.0 else teacher_logits, dim=-1)
        teacher_p = teacher_logp.exp()
        kl = teacher_logp.sub_(student_logp).mul_(teacher_p).sum(-1)  # teacher_logp is not needed after this
        labelled = labels != IGNORE
        nll = -student_logp.gather(-1, labels.clamp(min=0)[:, None]).squeeze(-1) * labelled
        ctx.save_for_backward(student_logp, teacher_p, labels)
        ctx.temperature = temperature
        return kl, nll

    @staticmethod
    def backward(ctx, grad_kl, grad_nll):
        student_logp, teacher_p, labels = ctx.saved_tensors
        labelled = labels != IGNORE
        grad_nll = grad_nll * labelled
        grad = student_logp.exp()
        grad.mul_((grad_kl + grad_nll)[:, None]).addcmul_(teacher_p, grad_kl[:, None], value=-1)
        rows = labelled.nonzero().squeeze(-1)
        grad[rows, labels[rows]] -= grad_nll[rows]
        if ctx.temperature != 1.0:
            grad.div_(ctx.temperature)
        return grad, None, None, None


def _kl_topk(student_logp: torch.Tensor, target: TopKTarget, temperature: float) -> torch.Tensor:
    teacher_logp = target.values.float() / temperature - target.logsumexp.float()[:, None]
    teacher_p = teacher_logp.exp()
    teacher_tail = (1 - teacher_p.sum(-1)).clamp(min=0)
    student_top = student_logp.gather(-1, target.indices)
    student_tail = torch.log1p(-torch.logsumexp(student_top, -1).exp().clamp(max=1 - 1e-6))
    head = (teacher_p * (teacher_logp - student_top)).sum(-1)
    tail = torch.xlogy(teacher_tail, teacher_tail) - teacher_tail * student_tail
    return head + tail


def _chunk_losses(hidden, lm_head_weight, labels, target, temperature: float):
    with record_function("kd.head"):
        logits = F.linear(hidden, lm_head_weight).float()
    if isinstance(target, LiveTarget):
        with record_function("kd.kl"):
            with torch.no_grad():
                teacher_logits = target.lm_head(target.hidden).float()
            kl, nll = FullVocabKD.apply(logits, teacher_logits, labels, temperature)
            kl = kl * temperature**2
    elif isinstance(target, TopKTarget):
        with record_function("kd.head"):
            student_logp = F.log_softmax(logits / temperature, dim=-1)
        with record_function("kd.kl"):
            kl = _kl_topk(student_logp, target, temperature) * temperature**2
        if temperature == 1.0:  # the next-token loss from the same log-softmax: one vocabulary pass instead of two
            nll = -student_logp.gather(-1, labels.clamp(min=0)[:, None]).squeeze(-1) * (labels != IGNORE)
    else:  # no teacher (teacher correction): the next-token loss alone
        kl = torch.zeros(len(hidden), device=hidden.device)
    if target is None or temperature != 1.0:
        nll = F.cross_entropy(logits, labels, ignore_index=IGNORE, reduction="none")
    return kl, nll


def next_token_labels(input_ids: torch.Tensor) -> torch.Tensor:
    """Label of each position = the next token; the last position has none."""
    labels = torch.full_like(input_ids, IGNORE)
    labels[:, :-1] = input_ids[:, 1:]
    return labels


def token_losses(
    student_hidden: torch.Tensor,
    lm_head: nn.Linear,
    labels: torch.Tensor,
    target: LiveTarget | TopKTarget | None,
    temperature: float = 1.0,
    chunk_tokens: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(KL, next-token NLL) per position of flattened [n, hidden] states; NLL is 0 where there is no label,
    KL is 0 where there is no teacher (target None: teacher correction trains on the next token alone)."""
    n = student_hidden.shape[0]
    checkpointed = torch.is_grad_enabled() and student_hidden.requires_grad and n > chunk_tokens
    kls, nlls = [], []
    for start in range(0, n, chunk_tokens):
        end = min(start + chunk_tokens, n)
        chunk = target.chunk(start, end) if target is not None else None
        args = (student_hidden[start:end], lm_head.weight, labels[start:end], chunk, temperature)
        kl, nll = checkpoint(_chunk_losses, *args, use_reentrant=False) if checkpointed else _chunk_losses(*args)
        kls.append(kl)
        nlls.append(nll)
    return torch.cat(kls), torch.cat(nlls)
