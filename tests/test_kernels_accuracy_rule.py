"""kernels.testing: the one implementation of DESIGN.md §4's accuracy rule, checked on hand-made cases."""

from __future__ import annotations

import math

import pytest
import torch

from kernels.testing import accuracy, assert_accurate


def test_within_twice_pytorch_error_passes_and_beyond_fails():
    gen = torch.Generator().manual_seed(0)
    exact = torch.randn(64, 33, generator=gen, dtype=torch.float64)
    noise = torch.randn(64, 33, generator=gen, dtype=torch.float64)
    theirs = (exact + 1e-3 * noise).float()
    ours_good = (exact + 1.9e-3 * noise).float()
    ours_bad = (exact + 2.5e-3 * noise).float()
    good = assert_accurate("good", ours_good, theirs, exact)
    assert 1.8 < good.ratio < 2.0 and good.ok
    bad = accuracy(ours_bad, theirs, exact)
    assert not bad.ok and 2.4 < bad.ratio < 2.6
    with pytest.raises(AssertionError, match=r"bad: error .* > 2 x PyTorch's .* worst element \[\d+, \d+\]"):
        assert_accurate("bad", ours_bad, theirs, exact)


def test_rounding_floor_when_pytorch_is_exact():
    """PyTorch exact to the last bit (error = the rounding of the exact answer): one more rounding still passes."""
    exact = torch.randn(1000, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    rounded = exact.to(torch.bfloat16)
    v = accuracy(rounded, rounded, exact)
    assert v.ok and v.error == v.torch_error == v.floor > 0
    shifted = exact.float().add(exact.abs() * 2 ** -10).to(torch.bfloat16)  # rounded after a quarter-ulp shift
    assert accuracy(shifted, rounded, exact).ok
    assert not accuracy(exact.float().add(exact.abs() * 2 ** -7).to(torch.bfloat16), rounded, exact).ok


def test_floor_of_a_few_elements():
    """A single value that happens to be nearly exact in the dtype: one ulp off it is still noise, three are not."""
    exact = torch.tensor([1.0 + 2 ** -30], dtype=torch.float64)  # float32 rounds it to 1.0, off by 2^-30 only
    eps = torch.finfo(torch.float32).eps
    v = accuracy(torch.tensor([1.0 + eps]), exact.float(), exact)  # PyTorch exactly rounded, ours one ulp off
    assert v.floor == eps and v.ok
    assert not accuracy(torch.tensor([1.0 + 3 * eps]), exact.float(), exact).ok
    many = torch.randn(10_000, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    assert eps / 100 < accuracy(many.float(), many.float(), many).floor < eps / 2  # measured, not eps/sqrt(numel)


def test_non_finite_values_fail_and_are_located():
    exact = torch.ones(3, 4, dtype=torch.float64)
    got = torch.ones(3, 4)
    got[2, 1] = math.nan
    v = accuracy(got, got.nan_to_num(), exact)
    assert not v.ok and v.nonfinite == 1 and v.worst_index == (2, 1)
    with pytest.raises(AssertionError, match=r"1 non-finite values .* \[2, 1\]"):
        assert_accurate("y", got, torch.ones(3, 4), exact)


def test_scale_for_gradients_that_are_zero_in_exact_arithmetic():
    exact = torch.zeros(8, dtype=torch.float64)
    noise = torch.full((8,), 1e-9)
    assert not accuracy(noise, torch.zeros(8), exact).ok  # relative to a zero norm: fails
    v = accuracy(noise, torch.zeros(8), exact, scale=10.0)  # relative to the call's largest gradient
    assert v.ok and v.error == pytest.approx(math.sqrt(8) * 1e-9 / 10, rel=1e-6)
    assert v.floor == torch.finfo(torch.float32).eps  # one rounding at that scale
    assert not accuracy(torch.full((8,), 1e-5), torch.zeros(8), exact, scale=10.0).ok


def test_shapes_must_match():
    with pytest.raises(ValueError, match="shapes differ"):
        accuracy(torch.zeros(3), torch.zeros(3), torch.zeros(4, dtype=torch.float64))
