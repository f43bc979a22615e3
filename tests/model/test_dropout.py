"""The packed-draw dropout: F.dropout's distribution, scale and gradient, seeded."""

from __future__ import annotations

import math

import pytest
import torch

from hytrec.model.dropout import Dropout, dropout


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_drops_each_element_with_probability_p_and_scales_the_rest(p):
    torch.manual_seed(0)
    x = torch.rand(1000, 1001) + 0.5  # odd size: the last draw is split
    y = dropout(x, p)
    dropped = y == 0
    n = x.numel()
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(dropped.float().mean().item() - p) < 6 * sigma
    torch.testing.assert_close(y[~dropped], x[~dropped] / (1 - p))


def test_neighbouring_elements_are_independent():
    """Each 64-bit draw feeds four elements: their masks must not repeat or correlate."""
    torch.manual_seed(1)
    kept = (dropout(torch.ones(2**20), 0.5) != 0).float().view(-1, 4)  # the lanes of a draw
    centred = kept - kept.mean(0)
    correlation = (centred.T @ centred) / len(kept) / kept.var(0).sqrt().outer(kept.var(0).sqrt())
    off_diagonal = correlation - torch.eye(4)
    assert off_diagonal.abs().max() < 6 / math.sqrt(len(kept))
    assert (kept.mean(0) - 0.5).abs().max() < 6 * 0.5 / math.sqrt(len(kept))


def test_gradient_is_the_mask_times_the_scale():
    torch.manual_seed(2)
    x = torch.randn(64, 33, requires_grad=True)
    weights = torch.randn(64, 33)
    y = dropout(x, 0.3)
    (y * weights).sum().backward()
    mask = (y != 0).float() / 0.7
    torch.testing.assert_close(x.grad, weights * mask)


def test_seeded_like_any_other_draw_and_fresh_on_every_call():
    x = torch.ones(4096)
    torch.manual_seed(3)
    first, second = dropout(x, 0.2), dropout(x, 0.2)
    torch.manual_seed(3)
    assert torch.equal(dropout(x, 0.2), first)
    assert not torch.equal(first, second)


def test_identity_in_eval_and_at_zero_and_zeros_at_one():
    x = torch.randn(10, 10)
    layer = Dropout(0.4).eval()
    assert layer(x) is x and dropout(x, 0.0) is x and dropout(x, 0.7, training=False) is x
    assert torch.equal(dropout(x, 1.0), torch.zeros_like(x))
    assert "p=0.4" in repr(layer)
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        Dropout(1.5)
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        dropout(x, -0.1)
