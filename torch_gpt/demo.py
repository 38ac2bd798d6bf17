"""`python -m torch_gpt.demo`: train a small GPT on the sample corpus, generate, and time the gpt2 preset.

A real end-to-end run in about a minute on a laptop CPU: the shipped tokenizer and corpus, sliding
windows, AdamW, a checkpoint written and read back, greedy generation with the KV cache; then forward
latency (`math` vs `sdpa`) and generation speed with and without the cache for the 124M `gpt2` preset
(random weights: speed does not depend on them).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from tqdm import tqdm

from gpt_core import GPTConfig, get_tokenizer, iterate_batches, load_text, sliding_windows, train_val_split
from torch_gpt import GPTModel, cross_entropy_loss, generate


def train_and_generate(steps: int, seq_len: int, batch_size: int, lr: float, seed: int) -> None:
    torch.manual_seed(seed)
    enc = get_tokenizer("gpt2")
    train_ids, val_ids = train_val_split(enc.encode(load_text()), 0.1)
    x, y = sliding_windows(train_ids, seq_len, seq_len)
    vx, vy = sliding_windows(val_ids, seq_len, seq_len)
    config = GPTConfig.from_preset("tiny", context_length=seq_len)
    model = GPTModel(config)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    print(f"tiny GPT: {config.n_params:,} parameters; {len(x)} training windows of {seq_len} tokens")

    def val_loss() -> float:
        model.eval()
        with torch.no_grad():
            loss = cross_entropy_loss(model(torch.from_numpy(vx)), torch.from_numpy(vy)).item()
        model.train()
        return loss

    print(f"validation loss before training: {val_loss():.3f}")
    bar = tqdm(total=steps, desc="train", unit="step")
    step, epoch = 0, 0
    while step < steps:
        for bx, by in iterate_batches(x, y, batch_size, seed=seed + epoch):
            loss = cross_entropy_loss(model(torch.from_numpy(bx)), torch.from_numpy(by))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            bar.set_postfix(loss=f"{loss.item():.3f}")
            bar.update()
            if step == steps:
                break
        epoch += 1
    bar.close()
    print(f"validation loss after {steps} steps: {val_loss():.3f}")

    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        model = GPTModel.from_pretrained(d)
    prompt = "Every effort moves you"
    out = generate(model, torch.tensor([enc.encode(prompt)]), 30)
    print(f"greedy continuation of {prompt!r}:\n  {enc.decode(out[0].tolist())!r}")


def _median_seconds(fn, repeats: int) -> tuple[float, float, float]:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), min(times), max(times)


def time_gpt2(seq_len: int, new_tokens: int, repeats: int) -> None:
    torch.manual_seed(0)
    config = GPTConfig.from_preset("gpt2", drop_rate=0.0)
    model = GPTModel(config).eval()
    idx = torch.randint(0, config.vocab_size, (1, seq_len))
    print(f"\ngpt2 preset ({config.n_params / 1e6:.1f}M parameters), float32, {torch.get_num_threads()} "
          f"CPU threads, torch {torch.__version__}; median [min, max] of {repeats}")
    for impl in ("math", "sdpa"):
        model.attn_impl = impl
        with torch.inference_mode():
            med, lo, hi = _median_seconds(lambda: model(idx), repeats)
        print(f"  forward 1x{seq_len} attn_impl={impl:<5} {med * 1e3:8.1f} ms  [{lo * 1e3:.1f}, {hi * 1e3:.1f}]")
    model.attn_impl = "sdpa"
    prompt = idx[:, :8]
    rates = {}
    for use_cache in (True, False):
        med, lo, hi = _median_seconds(lambda c=use_cache: generate(model, prompt, new_tokens, use_cache=c),
                                      max(1, repeats // 3))
        rates[use_cache] = new_tokens / med
        print(f"  greedy {new_tokens} tokens, cache={use_cache!s:<5}  {rates[use_cache]:8.1f} tokens/s "
              f"[{new_tokens / hi:.1f}, {new_tokens / lo:.1f}]")
    print(f"  KV cache speed-up: {rates[True] / rates[False]:.1f}x")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m torch_gpt.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=60, help="training steps for the tiny model (default 60)")
    p.add_argument("--seq-len", type=int, default=64, help="training window (default 64)")
    p.add_argument("--batch-size", type=int, default=8, help="windows per step (default 8)")
    p.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate (default 3e-3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--time-seq-len", type=int, default=256, help="gpt2 forward length (default 256)")
    p.add_argument("--time-new-tokens", type=int, default=200, help="gpt2 tokens to generate (default 200)")
    p.add_argument("--repeats", type=int, default=9, help="timing repeats (default 9)")
    p.add_argument("--no-timing", action="store_true", help="skip the gpt2 timings")
    args = p.parse_args(argv)
    for name in ("steps", "seq_len", "batch_size", "time_seq_len", "time_new_tokens", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    train_and_generate(args.steps, args.seq_len, args.batch_size, args.lr, args.seed)
    if not args.no_timing:
        time_gpt2(args.time_seq_len, args.time_new_tokens, args.repeats)


if __name__ == "__main__":
    main()
