"""torch_gpt.linear: the blocked CPU product of a decode step is F.linear's, and runs only where it should."""

import pytest
import torch
import torch.nn.functional as F

from tests.helpers import rel_error
from torch_gpt import linear
from torch_gpt.linear import Linear, blocked_linear


@pytest.mark.parametrize("n, k, lead", [(50257, 64, (1, 1)), (2304, 768, (4, 1)), (768, 3072, (2, 3)),
                                        (513, 16, (5,)), (512, 7, (64,)), (600, 8, (0,))])
@pytest.mark.parametrize("bias", [True, False])
def test_blocked_linear_is_linear(n, k, lead, bias):
    """Against float64: as accurate as F.linear in float32 (the rows left over by the blocks included: 50257, 513
    are not multiples of 8; no rows at all), same shape, contiguous."""
    gen = torch.Generator().manual_seed(n + k)
    w, x = torch.randn(n, k, generator=gen), torch.randn(*lead, k, generator=gen)
    b = torch.randn(n, generator=gen) if bias else None
    exact = F.linear(x.double(), w.double(), b.double() if bias else None)
    y = blocked_linear(x, w, b)
    assert y.shape == exact.shape and y.is_contiguous() and y.dtype == torch.float32
    assert rel_error(y, exact) <= 2 * rel_error(F.linear(x, w, b), exact) + 1e-7


def test_linear_takes_the_blocked_path_only_for_inference_on_few_rows(monkeypatch):
    calls = []
    monkeypatch.setattr(linear, "blocked_linear", lambda *a: calls.append(a) or F.linear(*a))
    layer = Linear(16, 1024)
    few, many = torch.randn(2, 3, 16), torch.randn(linear.MAX_ROWS + 1, 16)
    with torch.no_grad():
        layer(few)
        assert len(calls) == 1
        layer(many)  # a prefill's rows
        assert len(calls) == 1
    layer(few).sum().backward()  # training: F.linear, whose aten.mm/addmm remat="dots" keeps
    assert len(calls) == 1 and layer.weight.grad is not None
    with torch.inference_mode():
        Linear(16, 100)(few)  # too few output rows to split
        assert len(calls) == 1
        out = layer(few)
    assert len(calls) == 2 and out.shape == (2, 3, 1024)


def test_a_wrong_input_width_gets_linear_s_error():
    with torch.no_grad(), pytest.raises(RuntimeError, match="cannot be multiplied"):
        Linear(16, 1024)(torch.randn(1, 15))
