"""util/lars.py: a LARS step checked by hand."""
import torch
from torch import nn

from util.lars import LARS


def test_lars_step_by_hand():
    """Two steps (momentum carries over): a 2-D weight gets weight decay and the trust ratio, a 1-D bias plain
    momentum SGD; a weight that starts at zero takes its first step with a trust ratio of 1."""
    lr, wd, momentum, trust = 0.5, 0.1, 0.9, 0.02
    gen = torch.Generator().manual_seed(0)
    weight = nn.Parameter(torch.randn(3, 5, generator=gen, dtype=torch.float64))
    bias = nn.Parameter(torch.randn(3, generator=gen, dtype=torch.float64))
    zero = nn.Parameter(torch.zeros(2, 2, dtype=torch.float64))
    optimizer = LARS([weight, bias, zero], lr=lr, weight_decay=wd, momentum=momentum, trust_coefficient=trust)
    w, b, z = weight.detach().clone(), bias.detach().clone(), zero.detach().clone()
    mu_w, mu_b, mu_z = torch.zeros_like(w), torch.zeros_like(b), torch.zeros_like(z)

    def adapted(grad, value):
        update = torch.add(grad, value, alpha=wd)  # gradient + weight decay x weight
        ratio = trust * value.norm() / update.norm() if value.norm() > 0 else torch.tensor(1.0, dtype=grad.dtype)
        return ratio * update, ratio

    for step in range(2):
        g_w, g_b, g_z = (torch.randn(t.shape, generator=gen, dtype=torch.float64) for t in (w, b, z))
        weight.grad, bias.grad, zero.grad = g_w.clone(), g_b.clone(), g_z.clone()
        optimizer.step()

        update_w, ratio = adapted(g_w, w)
        assert not 0.5 < ratio < 2  # the adaptation matters: a step without it would differ
        mu_w = momentum * mu_w + update_w
        w = w - lr * mu_w
        mu_b = momentum * mu_b + g_b  # no decay, no ratio
        b = b - lr * mu_b
        update_z, ratio_z = adapted(g_z, z)
        assert (ratio_z == 1) == (step == 0)
        mu_z = momentum * mu_z + update_z
        z = z - lr * mu_z
        torch.testing.assert_close(weight.detach(), w, rtol=1e-14, atol=0)
        torch.testing.assert_close(bias.detach(), b, rtol=1e-14, atol=0)
        torch.testing.assert_close(zero.detach(), z, rtol=1e-14, atol=0)
        assert torch.equal(optimizer.state[bias]['mu'], mu_b)
    assert torch.equal(zero.detach(), z) and torch.equal(bias.detach(), b)
