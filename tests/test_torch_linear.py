"""torch_gpt.linear: the blocked CPU product of a decode step is F.linear's, and runs only where it should."""

import contextlib

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


@pytest.mark.parametrize("compiled, dtype", [(False, torch.float32), (True, torch.float32), (True, torch.bfloat16)])
def test_reduced_linear_is_linear(compiled, dtype):
    """The compiled-only product (Inductor's reduction over K), with a bias and leading dims: as accurate as F.linear
    against float64 (in bfloat16 too: it multiplies and sums in float32, as a GEMM does); eagerly (small, as here)
    it computes the same function."""
    gen = torch.Generator().manual_seed(5)
    w, x, b = (torch.randn(*shape, generator=gen).to(dtype) for shape in ((600, 96), (2, 3, 96), (600,)))
    exact = F.linear(x.double(), w.double(), b.double())
    product = torch.compile(linear.reduced_linear, fullgraph=True, dynamic=False) if compiled else linear.reduced_linear
    with torch.no_grad():
        y = product(x, w, b)
    torch._dynamo.reset()
    assert y.shape == exact.shape and y.dtype == dtype
    # bfloat16: summed in bfloat16 it was 1.42x F.linear's error here; accumulated in float32, 1.0x
    factor = 1.1 if dtype == torch.bfloat16 else 2.0
    assert rel_error(y, exact) <= factor * rel_error(F.linear(x, w, b), exact) + 1e-7


def test_transposed_linear_is_linear():
    gen = torch.Generator().manual_seed(3)
    w, x, b = torch.randn(700, 96, generator=gen), torch.randn(2, 3, 96, generator=gen), torch.randn(700, generator=gen)
    exact = F.linear(x.double(), w.double(), b.double())
    y = linear.transposed_linear(x, w.t().contiguous(), b)
    assert y.shape == exact.shape and rel_error(y, exact) <= 2 * rel_error(F.linear(x, w, b), exact) + 1e-7


def _spy(monkeypatch):
    """Record which path each call of a Linear takes (each still computes its product)."""
    calls = []
    for name in ("blocked_linear", "transposed_linear"):
        real = getattr(linear, name)
        monkeypatch.setattr(linear, name, lambda *a, real=real, name=name: calls.append(name) or real(*a))
    return calls


def test_linear_takes_an_alternative_path_only_where_its_probe_found_it_faster(monkeypatch):
    """The first inference call of a row count probes the three paths (on the real input) and records the
    verdict; later calls follow it; training, a prefill's many rows and a weight too small to split never probe."""
    probes = []
    real_probe = Linear.probe
    monkeypatch.setattr(Linear, "probe", lambda self, x: probes.append(x.shape) or real_probe(self, x))
    layer = Linear(16, 1024)
    few, many = torch.randn(2, 3, 16), torch.randn(linear.MAX_ROWS + 1, 16)
    with torch.no_grad():
        layer(few)
        layer(few)
    assert probes == [few.shape] and list(layer.paths) == [6] and layer.paths[6] in linear.PATHS
    assert (layer.weight_t is not None) == (layer.paths[6] == "transposed")  # the copy only while it is used
    calls = _spy(monkeypatch)
    for verdict in linear.PATHS:
        layer.paths[6] = verdict  # as a probe on a CPU where that path wins would have found
        with torch.inference_mode():
            out = layer(few)
        assert calls == ([] if verdict == "linear" else [f"{verdict}_linear"]), verdict
        assert rel_error(out, F.linear(few, layer.weight, layer.bias)) < 1e-6
        calls.clear()
    with torch.no_grad():
        layer(many)  # a prefill's rows
        Linear(16, 100)(few)  # too few output rows to split
    layer(few).sum().backward()  # training: F.linear, whose aten.mm/addmm remat="dots" keeps
    assert calls == [] and probes == [few.shape] and layer.weight.grad is not None
    assert list(layer.state_dict()) == ["weight", "bias"]  # verdicts and the copy are not saved


def test_calibrated_leaves_the_global_rng_alone():
    """generate(compile=True) calibrates on its first call of a batch size only: drawing the probes' inputs from
    the global RNG would make a seeded sampling call's tokens depend on whether it was the first."""
    model = torch.nn.Sequential(Linear(32, 1024))
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    with linear.calibrated(model, 2):
        pass
    assert model[0].paths and torch.equal(torch.rand(3), expected)


def test_a_margin_of_zero_switches_a_path_off(monkeypatch):
    monkeypatch.setattr(linear, "COPY_MARGIN", 0.0)
    monkeypatch.setattr(linear, "MARGIN", 0.0)
    layer = Linear(64, 4096)
    with torch.no_grad():
        assert layer.probe(torch.randn(4, 64)) == "linear" and layer.weight_t is None


def test_the_weight_copy_follows_the_weight():
    """A training step (in place), `load_state_dict` or a dtype change after the copy was made: the transposed
    path computes with the weight as it is now."""
    layer = Linear(32, 1024)
    layer.paths[2] = "transposed"
    x = torch.randn(2, 32)
    with torch.inference_mode():
        layer(x)
    copy = layer.weight_t
    layer(x).sum().backward()
    torch.optim.SGD(layer.parameters(), lr=0.5).step()
    with torch.inference_mode():
        assert torch.allclose(layer(x), F.linear(x, layer.weight, layer.bias), atol=1e-6)
    assert layer.weight_t is copy  # refreshed in place: a compiled step holding it sees the new values
    layer.load_state_dict({"weight": torch.randn(1024, 32), "bias": torch.zeros(1024)})
    layer.double()
    with torch.inference_mode():
        assert torch.allclose(layer(x.double()), F.linear(x.double(), layer.weight, layer.bias))


def test_calibrated_decides_before_a_compiled_step_which_follows_it():
    """`calibrated` records a verdict for every splittable Linear; a step compiled inside takes it (here forced
    each way: the output is then bitwise that path's), a verdict for another row count added later does not
    recompile it, and a step compiled outside generate never reads a copy it cannot vouch for."""
    from torch._dynamo.utils import counters

    model = torch.nn.Sequential(Linear(100, 1024), Linear(1024, 8))  # 100: the paths round differently
    with linear.calibrated(model, 3):
        pass
    assert set(model[0].paths) == {3} and model[1].paths == {}  # 8 output rows: never split
    x = torch.randn(3, 100)
    w, b = model[0].weight, model[0].bias
    expected = {"linear": F.linear(x, w, b), "blocked": blocked_linear(x, w, b),
                "transposed": linear.transposed_linear(x, w.t().contiguous(), b)}
    assert not torch.equal(expected["blocked"], expected["linear"])
    assert not torch.equal(expected["transposed"], expected["linear"])
    for verdict in linear.PATHS:
        torch._dynamo.reset()
        model[0].paths[3] = model[0].compiled_paths[3] = verdict
        step = torch.compile(model[0], fullgraph=True, dynamic=False)
        with torch.inference_mode(), linear.calibrated(model, 3):
            y = step(x)
            graphs = counters["stats"]["unique_graphs"]
            model[0].paths[1] = "linear"
            assert torch.equal(step(x), y) and counters["stats"]["unique_graphs"] == graphs
        del model[0].paths[1]
        assert torch.equal(y, expected[verdict]), verdict
    torch._dynamo.reset()
    with torch.inference_mode():  # "transposed" still, but outside calibrated: F.linear
        assert torch.equal(torch.compile(model[0], fullgraph=True, dynamic=False)(x), expected["linear"])


def _graph_ops(module, x, calibrate: bool = True) -> str:
    """The code of the graph dynamo traces for module(x) (run as traced, uncompiled), inside `calibrated` or not."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm.code)
        return gm.forward

    torch._dynamo.reset()
    with torch.inference_mode(), (linear.calibrated(torch.nn.Sequential(module), x.shape[0]) if calibrate
                                  else contextlib.nullcontext()):
        torch.compile(module, backend=backend, fullgraph=True, dynamic=False)(x)
    return "\n".join(graphs)


# What a traced step's graph holds on each path (the reduced product: its realized input, a prim only it calls).
GRAPH_MARK = {"blocked": "bmm", "reduced": "inductor_force_stride_order", "linear": "linear"}


def test_compiled_steps_take_the_compiled_verdict(monkeypatch):
    """`calibrated` times the compiled products too (Inductor's blocked product at one row is its own reduction
    kernel, not the eager bmm; the reduced one exists only compiled): once per shape, layers of one shape sharing
    it; a traced step takes `compiled_paths` where there is one, the eager verdict where not, while eager calls
    keep theirs."""
    monkeypatch.setattr(linear, "_COMPILED_VERDICTS", {})
    timed = []
    real = linear._compiled_product
    monkeypatch.setattr(linear, "_compiled_product", lambda path, *a: timed.append(path) or real(path, *a))
    model = torch.nn.Sequential(Linear(64, 1024), Linear(64, 1024), Linear(64, 600, bias=False))
    for layer in model:
        layer.paths[1] = "linear"  # as an eager probe finding F.linear faster would have
    with linear.calibrated(model, 1):
        pass
    assert sorted(timed) == ["blocked"] * 2 + ["linear"] * 2 + ["reduced"] * 2  # two shapes, each path once
    assert all(layer.compiled_paths[1] in ("linear", "blocked", "reduced") for layer in model)
    assert model[0].compiled_paths == model[1].compiled_paths
    layer, x = model[0], torch.randn(1, 64)
    for verdict in GRAPH_MARK:
        layer.compiled_paths[1] = verdict
        ops = _graph_ops(layer, x)
        assert all((m in ops) == (v == verdict) for v, m in GRAPH_MARK.items() if v != "linear"), verdict
    del layer.compiled_paths[1]  # none (a step compiled outside generate): the eager verdict
    layer.paths[1] = "blocked"
    assert "bmm" in _graph_ops(layer, x, calibrate=False) and 1 not in layer.compiled_paths
    ops = _graph_ops(layer, x)  # a blocked eager verdict: weighed against the reduced product alone
    assert timed[6:] == ["blocked", "reduced"] and GRAPH_MARK[layer.compiled_paths[1]] in ops
    calls = _spy(monkeypatch)
    for verdict in ("blocked", "reduced"):
        layer.paths[1], layer.compiled_paths[1] = "linear", verdict
        with torch.inference_mode():
            assert rel_error(layer(x), F.linear(x, layer.weight, layer.bias)) < 1e-6 and calls == []  # eager: its own
    torch._dynamo.reset()


def test_probes_take_turns():
    """The paths of a probe are timed in rounds, each once per round, so a slow spell falls on all alike."""
    order = []
    times = linear._fastest({name: (lambda name=name: order.append(name)) for name in ("a", "b", "c")}, 3)
    assert order == ["a", "b", "c"] * 3 and set(times) == {"a", "b", "c"} and all(t >= 0 for t in times.values())


def test_without_the_realizing_prim_the_reduced_product_is_not_weighed(monkeypatch):
    """The reduced product rests on a prim private to Inductor: where a torch lacks it, the compiled probe weighs
    the eager verdict and the blocked product alone, as before the reduced one existed."""
    monkeypatch.setattr(linear, "_COMPILED_VERDICTS", {})
    monkeypatch.setattr(linear, "_can_realize", lambda: False)
    timed = []
    real = linear._compiled_product
    monkeypatch.setattr(linear, "_compiled_product", lambda path, *a: timed.append(path) or real(path, *a))
    layer = Linear(64, 1024)
    layer.paths[1] = "linear"
    with linear.calibrated(torch.nn.Sequential(layer), 1):
        pass
    assert timed == ["linear", "blocked"] and layer.compiled_paths[1] in ("linear", "blocked")
    monkeypatch.undo()
    assert linear._can_realize()  # this torch has it, so the tests above exercised the reduced product


def test_a_margin_of_zero_compiles_no_probe(monkeypatch):
    monkeypatch.setattr(linear, "_COMPILED_VERDICTS", {})
    monkeypatch.setattr(linear, "MARGIN", 0.0)
    monkeypatch.setattr(linear, "_compiled_product", lambda *a: pytest.fail("compiled a probe"))
    layer = Linear(64, 1024)
    with linear.calibrated(torch.nn.Sequential(layer), 2):
        pass
    assert layer.compiled_paths == {2: layer.paths[2]} and layer.paths[2] != "blocked"


def test_a_wrong_input_width_gets_linear_s_error():
    with torch.no_grad(), pytest.raises(RuntimeError, match="cannot be multiplied"):
        Linear(16, 1024)(torch.randn(1, 15))


def _decode_graphs(monkeypatch) -> list[str]:
    """The code of each decode graph generate compiles from now on (by Inductor, as its default does)."""
    from torch._inductor.compile_fx import compile_fx

    from torch_gpt import generation

    graphs = []

    def inductor(gm, example_inputs):
        graphs.append(gm.code)
        return compile_fx(gm, example_inputs)

    torch._dynamo.reset()
    monkeypatch.setitem(generation._COMPILED, ("decode", None),
                        torch.compile(generation._decode_step, backend=inductor, fullgraph=True, dynamic=False))
    return graphs


@pytest.mark.parametrize("path", ["blocked", "reduced"])
def test_compiled_generation_on_its_own_paths_gives_eager_s_tokens(monkeypatch, path):
    """A compiled decode step on another path than eager's (here the lm_head: F.linear eagerly, compiled the blocked
    product, Inductor's reduction kernel at one row, or the reduced one) gives the tokens eager gives, greedy: the
    logits agree to float32 rounding and no step is a near-tie (checked, so the test says why it would fail)."""
    from gpt_core import GPTConfig
    from torch_gpt import GPTModel, generate

    torch.manual_seed(0)
    model = GPTModel(GPTConfig(vocab_size=1024, context_length=32, emb_dim=32, n_heads=2, n_layers=1)).eval()
    head = model.lm_head
    head.paths[1], head.compiled_paths[1] = "linear", path
    prompt = torch.randint(0, 1024, (1, 5))
    eager = generate(model, prompt, 12)
    with torch.no_grad():
        top2 = torch.stack([model(eager[:, :t])[0, -1].topk(2).values for t in range(5, 17)])
    assert (top2[:, 0] - top2[:, 1]).min() > 1e-4  # far above float32 rounding of these logits (~1e-7)
    graphs = _decode_graphs(monkeypatch)
    assert torch.equal(generate(model, prompt, 12, compile=True), eager)
    assert len(graphs) == 1 and GRAPH_MARK[path] in graphs[0]  # the decode step took that path
    assert head.paths[1] == "linear" and head.compiled_paths[1] == path
    torch._dynamo.reset()


def test_the_reduced_product_on_padded_batches_and_sampling(monkeypatch):
    """Where users take it: two prompts of different lengths in one batch, greedy and sampled (seeded), with the
    lm_head on the reduced product compiled (F.linear eagerly): eager's tokens, and each greedy row its own alone."""
    from gpt_core import GPTConfig
    from torch_gpt import GPTModel, generate

    torch.manual_seed(1)
    model = GPTModel(GPTConfig(vocab_size=1024, context_length=32, emb_dim=32, n_heads=2, n_layers=2)).eval()
    head = model.lm_head
    for rows in (1, 2):
        head.paths[rows], head.compiled_paths[rows] = "linear", "reduced"
    prompts = [torch.randint(0, 1024, (5,)).tolist(), torch.randint(0, 1024, (3,)).tolist()]
    greedy = generate(model, prompts, 10)
    alone = [generate(model, [p], 10)[0, -10:] for p in prompts]
    sampled = generate(model, prompts, 10, temperature=0.8, top_k=50, generator=torch.Generator().manual_seed(3))
    graphs = _decode_graphs(monkeypatch)
    assert torch.equal(generate(model, prompts, 10, compile=True), greedy)
    for p, a in zip(prompts, alone, strict=True):
        assert torch.equal(generate(model, [p], 10, compile=True)[0, -10:], a)
    assert torch.equal(greedy[:, -10:], torch.stack(alone))
    assert torch.equal(generate(model, prompts, 10, temperature=0.8, top_k=50, compile=True,
                                generator=torch.Generator().manual_seed(3)), sampled)
    assert len(graphs) == 3 and all(GRAPH_MARK["reduced"] in g for g in graphs)  # greedy B=2 and B=1, sampled B=2
    torch._dynamo.reset()
