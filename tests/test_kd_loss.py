"""The distillation losses: tail bucket, chunking and checkpointing, against direct computations."""

import math

import pytest
import torch
import torch.nn.functional as F

from slimnas.compress.kd_loss import IGNORE, FullVocabKD, LiveTarget, TopKTarget, token_losses


def topk_target(teacher_logits: torch.Tensor, k: int) -> TopKTarget:
    top = teacher_logits.topk(k, dim=-1)
    return TopKTarget(top.values, top.indices, torch.logsumexp(teacher_logits, -1))


def test_tail_bucket_kl_equals_a_hand_computation_on_a_flat_teacher():
    """A flat teacher has most of its mass outside the top k: the tail bucket carries the loss."""
    vocab, k = 10, 3
    teacher_logits = torch.tensor([[1.0, 0.6, 0.3] + [0.0] * 7])
    student_logits = torch.tensor([[0.0, 1.0, 0.0, 0.3, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0]])
    p = torch.softmax(teacher_logits[0], -1).tolist()
    q = torch.softmax(student_logits[0], -1).tolist()
    head = sum(p[i] * math.log(p[i] / q[i]) for i in range(k))
    p_tail, q_tail = sum(p[k:]), sum(q[k:])
    expected = head + p_tail * math.log(p_tail / q_tail)
    assert p_tail > 0.5  # most of the teacher's mass is in the tail
    head_layer = torch.nn.Linear(vocab, vocab, bias=False)
    with torch.no_grad():
        head_layer.weight.copy_(torch.eye(vocab))
    kl, _ = token_losses(student_logits, head_layer, torch.tensor([-100]), topk_target(teacher_logits, k))
    assert kl.item() == pytest.approx(expected, rel=1e-5)
    exact = F.kl_div(
        F.log_softmax(student_logits, -1), F.log_softmax(teacher_logits, -1), log_target=True, reduction="sum"
    )
    assert kl.item() <= exact.item() + 1e-6  # merging outcomes never increases a KL


def chunked_and_whole(target_factory, autocast: bool, temperature: float):
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False)
    hidden = torch.randn(37, 16, requires_grad=True)
    labels = torch.randint(0, 50, (37,))
    target = target_factory()
    results = []
    for chunk in (5, 1000):  # several checkpointed chunks, and one plain chunk
        hidden.grad, head.weight.grad = None, None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            kl, nll = token_losses(hidden, head, labels, target, temperature=temperature, chunk_tokens=chunk)
            kl, ce = kl.mean(), nll.mean()
        (kl + ce).backward()
        results.append((kl.item(), ce.item(), hidden.grad.clone(), head.weight.grad.clone()))
    return results


@pytest.mark.parametrize("temperature", [1.0, 2.0])  # 1: the next-token loss shares the KL's log-softmax
@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("kind", ["live", "topk"])
def test_chunked_checkpointed_loss_and_gradients_equal_the_whole(kind, autocast, temperature):
    teacher_head = torch.nn.Linear(16, 50, bias=False)
    teacher_hidden = torch.randn(37, 16)

    def target():
        if kind == "live":
            return LiveTarget(teacher_hidden, teacher_head)
        with torch.no_grad():
            return topk_target(teacher_head(teacher_hidden), 8)

    (kl_a, ce_a, dh_a, dw_a), (kl_b, ce_b, dh_b, dw_b) = chunked_and_whole(target, autocast, temperature)
    tolerance = 2e-2 if autocast else 1e-5
    assert kl_a == pytest.approx(kl_b, rel=tolerance) and ce_a == pytest.approx(ce_b, rel=tolerance)
    torch.testing.assert_close(dh_a, dh_b, rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(dw_a, dw_b, rtol=tolerance, atol=tolerance)  # the lm_head's own gradient
    assert dw_a.abs().sum() > 0


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_full_vocabulary_kd_has_autograds_values_and_gradients(temperature):
    """The hand-written backward against autograd through log_softmax, kl_div and the gathered NLL."""
    torch.manual_seed(0)
    logits = torch.randn(23, 97, dtype=torch.float64) * 3
    teacher_logits = torch.randn(23, 97, dtype=torch.float64) * 3
    labels = torch.randint(0, 97, (23,))
    labels[[2, 11]] = IGNORE
    weights = torch.rand(2, 23, dtype=torch.float64)  # arbitrary upstream gradients of both losses

    def reference(z):
        logp = F.log_softmax(z / temperature, -1)
        kl = F.kl_div(logp, F.log_softmax(teacher_logits / temperature, -1), log_target=True, reduction="none")
        nll = -logp.gather(-1, labels.clamp(min=0)[:, None]).squeeze(-1) * (labels != IGNORE)
        return kl.sum(-1), nll

    outputs = []
    for fn in (reference, lambda z: FullVocabKD.apply(z, teacher_logits, labels, temperature)):
        z = logits.clone().requires_grad_()
        kl, nll = fn(z)
        ((kl * weights[0]).sum() + (nll * weights[1]).sum()).backward()
        outputs.append((kl.detach(), nll.detach(), z.grad))
    for mine, theirs in zip(outputs[1], outputs[0], strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-10, atol=1e-12)
    assert outputs[1][2][2].abs().sum() > 0 and (outputs[1][1][[2, 11]] == 0).all()  # ignored rows: KL only
