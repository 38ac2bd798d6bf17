"""torch_gpt.GPTModel on its own: size, attention impls, the KV cache, dropout, rematerialisation, errors,
checkpoints. The init and the sinusoidal table, shared with jax_gpt, are in test_shared_rules.py."""

import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from gpt_core import GPTConfig
from tests.helpers import assert_rel_close
from torch_gpt import GPTModel, KVCache, cross_entropy_loss

SMALL = GPTConfig(vocab_size=211, context_length=48, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0)


def test_parameter_counts_match_the_config():
    for cfg in [GPTConfig(**{**SMALL.to_dict(), "tie_embeddings": t, "qkv_bias": b, "pos_embedding": p})
                for t in (False, True) for b in (False, True) for p in ("learned", "sinusoidal")]:
        model = GPTModel(cfg)
        assert sum(p.numel() for p in model.parameters()) == cfg.n_params


def test_seed_and_gpt2_parameter_counts_on_meta():
    seed = GPTConfig(vocab_size=50257, context_length=1024, emb_dim=768, n_heads=12, n_layers=12,
                     drop_rate=0.1, qkv_bias=False)
    with torch.device("meta"):
        assert sum(p.numel() for p in GPTModel(seed).parameters()) == 163_009_536
        assert sum(p.numel() for p in GPTModel(GPTConfig.from_preset("gpt2")).parameters()) == 124_439_808


def test_tied_head_shares_storage():
    m = GPTModel(GPTConfig(**{**SMALL.to_dict(), "tie_embeddings": True}))
    assert m.lm_head.weight is m.wte.weight


@pytest.mark.parametrize("pos_embedding", ["learned", "sinusoidal"])
def test_math_and_sdpa_agree(pos_embedding):
    torch.manual_seed(0)
    cfg = GPTConfig(**{**SMALL.to_dict(), "pos_embedding": pos_embedding})
    m = GPTModel(cfg, attn_impl="math")
    idx = torch.randint(0, cfg.vocab_size, (3, 29))
    targets = torch.randint(0, cfg.vocab_size, (3, 29))
    logits_math = m(idx)
    cross_entropy_loss(logits_math, targets).backward()
    grads_math = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    m.attn_impl = "sdpa"
    logits_sdpa = m(idx)
    cross_entropy_loss(logits_sdpa, targets).backward()
    assert_rel_close(logits_sdpa, logits_math, 1e-5, "logits")
    for n, p in m.named_parameters():
        assert_rel_close(p.grad, grads_math[n], 1e-4, n)


@pytest.mark.parametrize("impl", ["math", "sdpa"])
def test_kv_cache_matches_full_forward(impl):
    """Prefill 7 tokens, then one at a time, then a chunk of 5: logits equal the full forward's."""
    torch.manual_seed(0)
    m = GPTModel(SMALL, attn_impl=impl).eval()
    idx = torch.randint(0, SMALL.vocab_size, (2, 20))
    full = m(idx)
    cache = KVCache(SMALL, 2, SMALL.context_length)
    parts = [m(idx[:, :7], cache)] + [m(idx[:, t:t + 1], cache) for t in range(7, 15)] + [m(idx[:, 15:], cache)]
    assert cache.pos == 20
    assert_rel_close(torch.cat(parts, dim=1), full, 1e-5, "cached logits")


def test_loss_of_uniform_logits_is_log_vocab():
    logits = torch.zeros(2, 3, 50)
    assert torch.isclose(cross_entropy_loss(logits, torch.ones(2, 3, dtype=torch.long)), torch.tensor(math.log(50)))
    with pytest.raises(ValueError, match="do not match"):
        cross_entropy_loss(logits, torch.ones(2, 4, dtype=torch.long))


@pytest.mark.parametrize("idx, match", [
    (torch.tensor([[1, 2, 211]]), "token id 211 is outside"),
    (torch.tensor([[-1, 2]]), "token id -1 is outside"),
    (torch.zeros(1, 49, dtype=torch.long), "49 tokens"),
    (torch.zeros(1, 0, dtype=torch.long), "0 tokens"),
    (torch.zeros(4, dtype=torch.long), "shape"),
    (torch.zeros(1, 4), "dtype"),
])
def test_bad_inputs(idx, match):
    with pytest.raises(ValueError, match=match):
        GPTModel(SMALL)(idx)


def test_bad_runtime_options_and_full_cache():
    with pytest.raises(ValueError, match="attn_impl"):
        GPTModel(SMALL, attn_impl="flash")
    with pytest.raises(ValueError, match="norm_impl"):
        GPTModel(SMALL, norm_impl="apex")
    with pytest.raises(ValueError, match="max_len"):
        KVCache(SMALL, 1, 49)
    m = GPTModel(SMALL).eval()
    cache = KVCache(SMALL, 1, 8)
    m(torch.zeros(1, 8, dtype=torch.long), cache)
    with pytest.raises(ValueError, match="after 8 cached"):
        m(torch.zeros(1, 1, dtype=torch.long), cache)


def test_dropout_is_active_only_in_training():
    torch.manual_seed(0)
    m = GPTModel(GPTConfig(**{**SMALL.to_dict(), "drop_rate": 0.5}))
    idx = torch.randint(0, SMALL.vocab_size, (1, 10))
    assert not torch.equal(m(idx), m(idx))
    m.eval()
    assert torch.equal(m(idx), m(idx))


@pytest.mark.parametrize("impl", ["math", "sdpa"])
def test_remat_keeps_loss_and_gradients_and_recomputes_what_it_says(impl):
    """Dropout on: torch.utils.checkpoint replays the RNG, so the recomputed blocks draw the same masks. What the
    backward recomputes shows in its FLOPs: "block" every op of every block again, "dots" all but the linear
    layers' matmuls (2·B·T·12·C² FLOPs per block: c_attn 3C², c_proj C², c_fc and mlp.c_proj 4C² each)."""
    torch.manual_seed(0)
    cfg = GPTConfig(**{**SMALL.to_dict(), "drop_rate": 0.1, "n_layers": 3})
    m = GPTModel(cfg, attn_impl=impl)
    idx, targets = torch.randint(0, cfg.vocab_size, (2, 17)), torch.randint(0, cfg.vocab_size, (2, 17))

    def run(remat):
        m.remat = remat
        m.zero_grad(set_to_none=True)
        torch.manual_seed(1)  # the same dropout masks for every mode
        loss = cross_entropy_loss(m(idx), targets)
        counter = FlopCounterMode(display=False)
        with counter:
            loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}, counter.get_total_flops()

    runs = {remat: run(remat) for remat in ("none", "block", "dots")}
    torch.manual_seed(2)
    with torch.no_grad():  # dropout was on: other masks, another loss
        assert abs(float(cross_entropy_loss(m(idx), targets)) - float(runs["none"][0])) > 1e-4
    for remat in ("block", "dots"):
        assert_rel_close(runs[remat][0], runs["none"][0], 1e-6, f"{remat} loss")
        for name, g in runs["none"][1].items():
            assert_rel_close(runs[remat][1][name], g, 1e-6, f"{remat} grad {name}")
    linears = cfg.n_layers * 2 * 2 * 17 * 12 * cfg.emb_dim**2
    assert runs["block"][2] - runs["dots"][2] == linears
    assert runs["dots"][2] > runs["none"][2]  # attention (and nothing else FlopCounter counts) recomputed
    with pytest.raises(ValueError, match="remat must be one of"):
        GPTModel(SMALL, remat="all")


def test_save_and_load_round_trip(tmp_path):
    torch.manual_seed(0)
    for cfg in [SMALL, GPTConfig(**{**SMALL.to_dict(), "tie_embeddings": True, "qkv_bias": True,
                                    "pos_embedding": "sinusoidal", "gelu": "exact"})]:
        m = GPTModel(cfg).eval()
        m.save_pretrained(tmp_path / "m")
        m2 = GPTModel.from_pretrained(tmp_path / "m", attn_impl="math").eval()
        assert m2.config == cfg and m2.attn_impl == "math"
        assert (m2.lm_head.weight is m2.wte.weight) == cfg.tie_embeddings  # still tied after the meta-device load
        assert all(t.device.type == "cpu" for t in [*m2.parameters(), *m2.buffers()])
        idx = torch.randint(0, cfg.vocab_size, (2, 11))
        assert torch.equal(m(idx), GPTModel.from_pretrained(tmp_path / "m")(idx))
        assert_rel_close(m2(idx), m(idx), 1e-5, "logits after reload")
