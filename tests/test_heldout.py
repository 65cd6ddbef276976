import math
import statistics

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model

from slimnas.compress.heldout import HeldoutSet
from slimnas.compress.runtime.stats import paired_difference


def test_heldout_kl_and_perplexity_equal_a_direct_full_vocabulary_computation():
    teacher, student = tiny_model(seed=0, num_hidden_layers=3), tiny_model(seed=1, num_hidden_layers=2)
    rows = torch.randint(3, 128, (6, 20), generator=torch.Generator().manual_seed(0))
    metrics = HeldoutSet("evaluation", rows, teacher, "fp32", batch_size=4).evaluate(student)
    with torch.no_grad():
        t_logp = F.log_softmax(teacher(rows).logits, -1)
        s_logits = student(rows).logits
        s_logp = F.log_softmax(s_logits, -1)
    kl_rows = (t_logp.exp() * (t_logp - s_logp)).sum(-1).mean(1).tolist()
    nll_rows = [F.cross_entropy(s_logits[i, :-1], rows[i, 1:]).item() for i in range(len(rows))]
    assert metrics.kl_per_row == pytest.approx(kl_rows, rel=1e-4)
    assert metrics.kl == pytest.approx(statistics.fmean(kl_rows), rel=1e-4)
    assert metrics.kl_stderr == pytest.approx(statistics.stdev(kl_rows) / math.sqrt(6), rel=1e-3)
    assert metrics.perplexity == pytest.approx(math.exp(statistics.fmean(nll_rows)), rel=1e-4)
    assert (metrics.rows, metrics.tokens, metrics.split) == (6, 120, "evaluation")
    assert HeldoutSet("evaluation", rows, teacher, "fp32").evaluate(teacher).kl == pytest.approx(0, abs=1e-6)


def test_paired_difference_is_tighter_than_two_error_bars_on_correlated_rows():
    base = [1.0, 2.0, 3.0, 4.0, 5.0]
    shifted = [x + 0.1 + 0.01 * i for i, x in enumerate(base)]
    difference, stderr = paired_difference(shifted, base)
    assert difference == pytest.approx(0.12)
    assert stderr < statistics.stdev(base) / math.sqrt(5) / 10
    with pytest.raises(ValueError):
        paired_difference([1.0], [1.0, 2.0])
