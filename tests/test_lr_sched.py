"""util/lr_sched.py: the warm-up + cosine learning-rate schedule and set_lr's per-group lr_scale."""
import math

import pytest
import torch

from util.lr_sched import cosine_lr, set_lr


def test_cosine_schedule_values():
    kw = dict(base_lr=1.0e-3, min_lr=1.0e-5, warmup_epochs=40, epochs=400)
    assert cosine_lr(0, **kw) == 0
    assert cosine_lr(20, **kw) == pytest.approx(5e-4)
    assert cosine_lr(40, **kw) == pytest.approx(1e-3)  # end of warm-up: the peak
    assert cosine_lr(220, **kw) == pytest.approx((1e-3 + 1e-5) / 2)  # half-way through the cosine
    assert cosine_lr(400, **kw) == pytest.approx(1e-5)
    assert cosine_lr(130, **kw) == pytest.approx(1e-5 + (1e-3 - 1e-5) * 0.5 * (1 + math.cos(math.pi / 4)))
    # stepped per iteration: fractional epochs move the lr
    assert cosine_lr(10.5, **kw) == pytest.approx(1e-3 * 10.5 / 40)


def test_set_lr_honours_lr_scale():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{'params': [p]}, {'params': [torch.nn.Parameter(torch.zeros(1))], 'lr_scale': 0.5}], lr=1)
    set_lr(opt, 0.2)
    assert [g['lr'] for g in opt.param_groups] == [0.2, 0.1]
