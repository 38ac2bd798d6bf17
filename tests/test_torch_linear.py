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


def test_linear_takes_the_blocked_path_only_where_its_probe_found_it_faster(monkeypatch):
    """The first inference call of a row count probes both paths (timing the real input) and records the verdict;
    later calls follow it; training, a prefill's many rows and a weight too small to split never probe or block."""
    calls, probes = [], []
    monkeypatch.setattr(linear, "blocked_linear", lambda *a: calls.append(a) or F.linear(*a))
    real_probe = linear._fastest_of
    monkeypatch.setattr(linear, "_fastest_of", lambda *a: probes.append(a[0].shape) or real_probe(*a))
    layer = Linear(16, 1024)
    few, many = torch.randn(2, 3, 16), torch.randn(linear.MAX_ROWS + 1, 16)
    with torch.no_grad():
        layer(few)
    assert probes == [few.shape] and list(layer.blocked_faster) == [6]  # the probe itself ran both paths
    calls.clear()
    for verdict in (True, False):
        layer.blocked_faster[6] = verdict  # as a probe on a CPU where it wins / loses would have found
        with torch.inference_mode():
            out = layer(few)
        assert len(calls) == int(verdict) and out.shape == (2, 3, 1024)
        calls.clear()
    layer.blocked_faster[6] = True
    with torch.no_grad():
        layer(many)  # a prefill's rows
        Linear(16, 100)(few)  # too few output rows to split
    layer(few).sum().backward()  # training: F.linear, whose aten.mm/addmm remat="dots" keeps
    assert calls == [] and probes == [few.shape] and layer.weight.grad is not None
    assert "blocked_faster" not in str(layer.state_dict().keys())


def test_calibrate_decides_before_a_compiled_step_which_follows_it():
    """`calibrate` records a verdict for every splittable Linear; a compiled step takes it (here forced both
    ways: the output is then bitwise that path's), and a verdict for another row count added later does not
    recompile it."""
    from torch._dynamo.utils import counters

    model = torch.nn.Sequential(Linear(100, 1024), Linear(1024, 8))  # 100: the two paths round differently
    linear.calibrate(model, 3)
    assert set(model[0].blocked_faster) == {3} and model[1].blocked_faster == {}  # 8 output rows: never split
    x = torch.randn(3, 100)
    assert not torch.equal(blocked_linear(x, model[0].weight, None), F.linear(x, model[0].weight))
    for verdict, path in ((True, blocked_linear), (False, F.linear)):
        torch._dynamo.reset()
        model[0].blocked_faster[3] = verdict
        step = torch.compile(model[0], fullgraph=True, dynamic=False)
        with torch.inference_mode():
            y = step(x)
            graphs = counters["stats"]["unique_graphs"]
            model[0].blocked_faster[1] = not verdict
            assert torch.equal(step(x), y) and counters["stats"]["unique_graphs"] == graphs
        del model[0].blocked_faster[1]
        assert torch.equal(y, path(x, model[0].weight, model[0].bias))


def test_a_wrong_input_width_gets_linear_s_error():
    with torch.no_grad(), pytest.raises(RuntimeError, match="cannot be multiplied"):
        Linear(16, 1024)(torch.randn(1, 15))
