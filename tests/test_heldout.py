import math
import statistics

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model

from slimnas.compress.heldout import HeldoutSet
from slimnas.core.stats import paired_difference, paired_test


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_heldout_kl_and_perplexity_equal_a_direct_full_vocabulary_computation(precision):
    """One value per document (row); under bf16 autocast the body runs in bf16 but both vocabulary projections stay
    fp32, so the numbers match an fp32 projection of the same hidden states (the teacher's probabilities are kept in
    fp16: within 1e-4 nats per document)."""
    teacher, student = tiny_model(seed=0, num_hidden_layers=3), tiny_model(seed=1, num_hidden_layers=2)
    rows = torch.randint(3, 128, (6, 20), generator=torch.Generator().manual_seed(0))
    metrics = HeldoutSet("evaluation", rows, teacher, precision, batch_size=4).evaluate(student)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        t_hidden, s_hidden = teacher.model(rows).last_hidden_state, student.model(rows).last_hidden_state
    t_logp = F.log_softmax(t_hidden.float() @ teacher.lm_head.weight.T, -1)
    s_logits = s_hidden.float() @ student.lm_head.weight.T
    s_logp = F.log_softmax(s_logits, -1)
    kl_rows = (t_logp.exp() * (t_logp - s_logp)).sum(-1).mean(1).tolist()
    nll_rows = [F.cross_entropy(s_logits[i, :-1], rows[i, 1:]).item() for i in range(len(rows))]
    assert metrics.kl_per_doc == pytest.approx(kl_rows, rel=0, abs=1e-4)
    assert metrics.kl == pytest.approx(statistics.fmean(kl_rows), rel=0, abs=1e-4)
    assert metrics.kl_stderr == pytest.approx(statistics.stdev(kl_rows) / math.sqrt(6), rel=0, abs=1e-4)
    assert metrics.nll_per_doc == pytest.approx(nll_rows, rel=1e-5)
    assert metrics.perplexity == pytest.approx(math.exp(statistics.fmean(nll_rows)), rel=1e-5)
    assert (metrics.documents, metrics.tokens, metrics.split) == (6, 120, "evaluation")
    assert HeldoutSet("evaluation", rows, teacher, precision).evaluate(teacher).kl == pytest.approx(0, abs=1e-3)


def test_paired_difference_is_tighter_than_two_error_bars_on_correlated_rows():
    base = [1.0, 2.0, 3.0, 4.0, 5.0]
    shifted = [x + 0.1 + 0.01 * i for i, x in enumerate(base)]
    difference, stderr = paired_difference(shifted, base)
    assert difference == pytest.approx(0.12)
    assert stderr < statistics.stdev(base) / math.sqrt(5) / 10
    with pytest.raises(ValueError):
        paired_difference([1.0], [1.0, 2.0])


def test_the_one_sided_paired_test():
    worse = [1.0, 2.0, 3.0, 4.0, 5.0]
    assert paired_test([x + 0.5 for x in worse], worse).p == 0.0  # worse by the same amount everywhere
    assert paired_test(worse, worse).p == 1.0  # equal on every document: never separated
    noisy = paired_test([x + d for x, d in zip(worse, [0.3, -0.2, 0.1, -0.1, 0.05], strict=True)], worse)
    assert 0.2 < noisy.p < 0.8 and not noisy.confident(0.95)
    clearly = paired_test([x + 1 + 0.01 * i for i, x in enumerate(worse)], worse)
    assert clearly.confident(0.95) and clearly.difference == pytest.approx(1.02)
    assert not paired_test(worse, [x + 1 for x in worse]).confident(0.5)  # better, not worse
