"""Memory of the loss: plain (whole logits) against fused (kernels.linear_cross_entropy, jax_gpt.losses).

`allocation_peak(fn)` is the peak of torch's CPU allocations while `fn` runs, read from the profiler's memory
events (every allocation and free of the CPU allocator, inside custom ops too), above what was live before.
"""

from __future__ import annotations

from collections.abc import Callable


def allocation_peak(fn: Callable[[], object]) -> int:
    """Peak bytes torch allocated on the CPU while `fn()` ran, above what was allocated before it."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type() == DeviceType.CPU]
    live = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):  # stable: ties keep the recorded order
        live += e.nbytes()
        peak = max(peak, live)
    return peak
