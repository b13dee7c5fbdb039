"""The NAG operator: identities, the reference formula, the tau bound, numerics, validation, compile; the compiled
combination against the eager one, and its fallbacks."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.flop_counter import FlopCounterMode

from nagkit import NAGConfig, get_preset, nag
from nagkit.core import operator
from nagkit.core.operator import combine_eager, combine_reference, nag_combine


def reference_nag(z_pos, z_neg, scale, tau, alpha, p=1):
    """The paper's formula, literally, in float64."""
    zp, zn = z_pos.double(), z_neg.double()
    zg = zp * scale - zn * (scale - 1)
    r = zg.norm(p=p, dim=-1, keepdim=True) / zp.norm(p=p, dim=-1, keepdim=True)
    zhat = zg * torch.minimum(r, torch.tensor(float(tau), dtype=torch.float64)) / r
    return alpha * zhat + (1 - alpha) * zp


def pair(*shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype), torch.randn(*shape, generator=g).to(dtype)


@pytest.mark.parametrize("norm,p", [("l1", 1), ("l2", 2)])
@pytest.mark.parametrize("scale,tau,alpha", [(5.0, 2.5, 0.25), (3.0, 1.2, 0.5), (11.0, 3.5, 1.0), (1.5, 10.0, 0.7)])
def test_matches_reference_formula(scale, tau, alpha, norm, p):
    zp, zn = pair(2, 9, 32)
    out = nag(zp, zn, scale, tau, alpha, norm=norm)
    torch.testing.assert_close(out.double(), reference_nag(zp, zn, scale, tau, alpha, p), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("scale,alpha", [(1.0, 0.5), (0.5, 0.5), (0.0, 0.3), (5.0, 0.0)])
def test_off_settings_return_z_pos_exactly(scale, alpha):
    zp, zn = pair(3, 4, 16)
    assert nag(zp, zn, scale, 2.5, alpha) is zp
    out = nag(zp, zn, torch.tensor(scale), torch.tensor(2.5), torch.tensor(alpha))
    assert torch.equal(out, zp)


def test_tensor_parameters_equal_float_parameters():
    zp, zn = pair(2, 5, 24)
    a = nag(zp, zn, 4.0, 2.0, 0.3)
    b = nag(zp, zn, torch.tensor(4.0), torch.tensor(2.0), torch.tensor(0.3))
    torch.testing.assert_close(a, b)


def test_negative_equal_to_prompt_is_identity():
    zp, _ = pair(2, 6, 16)
    torch.testing.assert_close(nag(zp, zp.clone(), 7.0, 2.5, 0.5), zp, atol=1e-6, rtol=1e-6)


def test_tau_bound_holds():
    zp, zn = pair(4, 64, 48, seed=3)
    zn = zn * 10
    tau = 1.7
    out = nag(zp, zn, 9.0, tau, 1.0)  # alpha=1: out is the capped term itself
    bound = tau * zp.abs().sum(-1)
    assert (out.abs().sum(-1) <= bound * (1 + 1e-5)).all()
    assert (out.abs().sum(-1) >= bound * (1 - 1e-4)).any()  # the cap is actually hit


def test_zero_and_tiny_norms_give_no_nan():
    zp = torch.zeros(2, 3, 8)
    zn = torch.randn(2, 3, 8)
    out = nag(zp, zn, 5.0, 2.5, 0.5)
    assert torch.isfinite(out).all() and torch.equal(out, torch.zeros_like(out))  # capped to tau * 0
    both_zero = nag(zp, zp.clone(), 5.0, 2.5, 0.5)
    assert torch.equal(both_zero, zp)
    tiny = torch.full((1, 2, 8), 1e-38)
    assert torch.isfinite(nag(tiny, -tiny, 5.0, 2.5, 0.5)).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_stable_on_extreme_inputs(dtype):
    big = torch.finfo(dtype).max / 2
    zp = torch.full((2, 4, 64), big, dtype=dtype)
    zn = torch.full((2, 4, 64), -big, dtype=dtype)
    out = nag(zp, zn, 10.0, 2.5, 0.5)  # s*Z+ alone overflows the dtype
    assert out.dtype == dtype and torch.isfinite(out).all()
    small = torch.full((2, 4, 64), 1e-7, dtype=dtype)
    out = nag(small, -small, 10.0, 2.5, 0.5)
    assert out.dtype == dtype and torch.isfinite(out).all()
    zp, zn = pair(2, 8, 64, dtype=dtype)
    ref = reference_nag(zp.float(), zn.float(), 5.0, 2.5, 0.25)
    torch.testing.assert_close(nag(zp, zn, 5.0, 2.5, 0.25).double(), ref, atol=2e-2, rtol=2e-2)


@settings(max_examples=60, deadline=None)
@given(
    scale=st.floats(0.0, 20.0), tau=st.floats(0.05, 10.0), alpha=st.floats(0.0, 1.0),
    rows=st.integers(1, 5), dim=st.integers(1, 40), seed=st.integers(0, 2**16), mag=st.floats(-30, 30),
)
def test_properties(scale, tau, alpha, rows, dim, seed, mag):
    zp, zn = pair(rows, dim, seed=seed)
    zn = zn * (2.0 ** (mag / 3))
    out = nag(zp, zn, scale, tau, alpha)
    assert torch.isfinite(out).all()
    if scale <= 1 or alpha == 0:
        assert out is zp
        return
    # The guided term obeys the cap (recovered from the blend; fp32 rounding is amplified by 1/alpha).
    capped = (out.double() - (1 - alpha) * zp.double()) / alpha
    slack = 1e-6 * (zp.abs().sum(-1) + zn.abs().sum(-1)).double() / alpha
    assert (capped.abs().sum(-1) <= tau * zp.abs().sum(-1).double() * (1 + 1e-5) + slack).all()


def test_compiles_fullgraph_without_graph_break():
    zp, zn = pair(2, 7, 32)
    fn = torch.compile(nag, fullgraph=True, backend="aot_eager")
    s, t, a = torch.tensor(5.0), torch.tensor(2.5), torch.tensor(0.25)
    torch.testing.assert_close(fn(zp, zn, s, t, a), nag(zp, zn, 5.0, 2.5, 0.25))
    torch.testing.assert_close(fn(zp, zn, torch.tensor(3.0), t, a), nag(zp, zn, 3.0, 2.5, 0.25))
    hot = torch.compile(nag_combine, fullgraph=True)  # inductor
    torch.testing.assert_close(hot(zp, zn, 5.0, 2.5, 0.25, "l1"), nag(zp, zn, 5.0, 2.5, 0.25), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kwargs,match", [
    (dict(tau=0.0), "tau must be"),
    (dict(tau=-1.0), "tau must be"),
    (dict(alpha=-0.1), "alpha must be in"),
    (dict(alpha=1.5), "alpha must be in"),
    (dict(scale=-1.0), "scale must be"),
    (dict(scale=float("inf")), "scale must be"),
    (dict(norm="l3"), "norm must be"),
])
def test_parameter_validation(kwargs, match):
    zp, zn = pair(1, 2, 4)
    params = dict(scale=5.0, tau=2.5, alpha=0.25) | kwargs
    with pytest.raises(ValueError, match=match):
        nag(zp, zn, **params)


def test_input_validation():
    zp, zn = pair(1, 2, 4)
    with pytest.raises(ValueError, match="same shape"):
        nag(zp, zn[:, :1], 5.0)
    with pytest.raises(ValueError, match="same dtype"):
        nag(zp, zn.double(), 5.0)
    with pytest.raises(ValueError, match="same device"):
        nag(zp, zn.to("meta"), 5.0)
    with pytest.raises(ValueError, match="floating point"):
        nag(zp.long(), zn.long(), 5.0)
    with pytest.raises(TypeError, match="must be tensors"):
        nag(zp.tolist(), zn, 5.0)
    with pytest.raises(ValueError, match="0-dim"):
        nag(zp, zn, torch.tensor([5.0, 3.0]))
    with pytest.raises(TypeError, match="Python numbers"):
        nag(zp, zn, "5")
    with pytest.raises(ValueError, match="tau must be"):
        nag(zp, zn, torch.tensor(5.0), torch.tensor(0.0))


@pytest.mark.parametrize("kwargs,match", [
    (dict(start=-0.1), "start must be in"),
    (dict(end=1.5), "end must be in"),
    (dict(start=0.8, end=0.2), "start must be <= end"),
    (dict(scale=float("nan")), "scale must not be NaN"),
    (dict(tau=0), "tau must be"),
    (dict(norm="max"), "norm must be"),
])
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        NAGConfig(**kwargs)
    with pytest.raises(TypeError, match="alpha must be a Python number"):
        NAGConfig(alpha="0.5")


def test_presets():
    assert get_preset("sdxl").alpha == 0.5 and get_preset("wan").scale == 9.0
    with pytest.raises(KeyError, match="known presets"):
        get_preset("nope")
    cfg = NAGConfig(start=0.0, end=0.25)
    assert cfg.in_window(999) and cfg.in_window(750) and not cfg.in_window(749.9) and not cfg.in_window(500)
    # the official UNet rule: NAG off once t < floor((1 - nag_end) * 999); DMD2's t=749 stays guided at end=0.25
    assert cfg.in_window(749, horizon=999, floor=True) and not cfg.in_window(748, horizon=999, floor=True)
    late = NAGConfig(start=0.5, end=1.0)
    assert late.in_window(0) and late.in_window(500) and not late.in_window(501)


# ------------------------------------------------------------------------------------------------ compiled path
@pytest.fixture(scope="module")
def counter():
    """nag_combine's compiled function counting the frames it compiles (inductor, as by default), shared by this
    module's compiled tests: each (dtype, norm, parameter kind) compiles once for the whole module."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    operator.reset_compiled()
    counting = CompileCounterWithBackend("inductor")
    operator._compiled = torch.compile(combine_reference, backend=counting, dynamic=True, fullgraph=True)
    yield counting
    operator.reset_compiled()
    torch._dynamo.reset()


@pytest.fixture
def compiled(counter, monkeypatch):
    """The compiled path for any tensor size (the tests' tensors are small), with compiling switched on."""
    monkeypatch.setattr(operator, "COMPILE_MIN_NUMEL", 1)
    monkeypatch.delenv(operator.COMPILE_ENV, raising=False)
    operator.set_compile(None)
    assert not operator.compile_status()["failed"]
    yield counter
    assert not operator.compile_status()["failed"], operator.compile_status()


def _used_compiled(before: int) -> bool:
    return operator.compile_status()["variants"] > before or bool(operator._variants)


@pytest.mark.parametrize("dtype,norm", [(torch.float32, "l1"), (torch.float32, "l2"), (torch.bfloat16, "l1")])
def test_compiled_matches_eager(compiled, dtype, norm):
    nag_combine(*pair(2, 9, 16, dtype=dtype), 2.0, 1.5, 0.5, norm)  # compiles this variant (distinct sizes)
    frames = compiled.frame_count
    for shape, seed in [((2, 300, 64), 0), ((1, 77, 96), 1), ((3, 1024, 40), 2)]:  # new token counts and widths
        zp, zn = pair(*shape, seed=seed, dtype=dtype)
        zn = zn * 3
        for scale, tau, alpha in [(5.0, 2.5, 0.25), (3.0, 1.2, 1.0), (11.0, 3.5, 0.5)]:  # new values
            out = nag_combine(zp, zn, scale, tau, alpha, norm)
            eager = combine_eager(zp, zn, scale, tau, alpha, norm)
            assert out.dtype == dtype and out.shape == zp.shape
            if dtype == torch.float32:
                torch.testing.assert_close(out, eager, atol=2e-6, rtol=2e-6)
            else:  # the same fp32 numbers rounded to bf16: a last-place difference on a rare element at most
                diff = (out.float() - eager.float()).abs()
                ulp = torch.finfo(dtype).eps * eager.float().abs().clamp_min(torch.finfo(dtype).tiny)
                assert (diff <= ulp * 1.01).all() and (out != eager).float().mean() < 1e-3
            torch.testing.assert_close(out.double(), reference_nag(zp.float(), zn.float(), scale, tau, alpha,
                                                                   1 if norm == "l1" else 2),
                                       atol=2e-5 if dtype == torch.float32 else 2e-2,
                                       rtol=2e-5 if dtype == torch.float32 else 2e-2)
    assert compiled.frame_count == frames  # no recompile for new shapes or parameter values
    assert (operator._variants and any(k[1] == dtype and k[2] == norm for k in operator._variants))


def test_compiled_tensor_parameters_and_identities(compiled):
    zp, zn = pair(2, 64, 48, seed=4)
    s, t, a = torch.tensor(5.0), torch.tensor(2.5), torch.tensor(0.25)
    torch.testing.assert_close(nag_combine(zp, zn, s, t, a), combine_eager(zp, zn, 5.0, 2.5, 0.25), atol=2e-6,
                               rtol=2e-6)
    assert torch.equal(nag(zp, zn, torch.tensor(1.0), t, a), zp)  # scale 1 with tensor parameters: exact identity
    # scale 1 through the combination itself (tau >= 1): Z~ = Z+, f = 1, out = Z+ exactly
    assert torch.equal(nag_combine(zp, zn, 1.0, 2.5, 0.7), zp)
    torch.testing.assert_close(nag_combine(zp, zp.clone(), 7.0, 2.5, 0.5), zp, atol=1e-6, rtol=1e-6)


def test_compiled_edge_cases(compiled):
    zp = torch.zeros(2, 3, 8)
    zn = torch.randn(2, 3, 8)
    out = nag_combine(zp, zn, 5.0, 2.5, 0.5)
    assert torch.isfinite(out).all() and torch.equal(out, torch.zeros_like(out))  # capped to tau * 0
    assert torch.equal(nag_combine(zp, zp.clone(), 5.0, 2.5, 0.5), zp)
    tiny = torch.full((2, 2, 8), 1e-38)
    assert torch.isfinite(nag_combine(tiny, -tiny, 5.0, 2.5, 0.5)).all()
    huge = torch.full((2, 2, 8), 3e38)  # near the fp32 limit: the per-token power of two keeps it finite
    torch.testing.assert_close(nag_combine(huge, huge.clone(), 5.0, 2.5, 0.5), huge)
    big = torch.finfo(torch.bfloat16).max / 2
    zp = torch.full((2, 4, 64), big, dtype=torch.bfloat16)
    out = nag_combine(zp, -zp, 10.0, 2.5, 0.5)  # s*Z+ alone overflows the dtype
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    zp, zn = pair(4, 64, 48, seed=3)
    capped = nag_combine(zp, zn * 10, 9.0, 1.7, 1.0)  # alpha=1: the capped term itself obeys the tau bound
    assert (capped.abs().sum(-1) <= 1.7 * zp.abs().sum(-1) * (1 + 1e-5)).all()


def test_compile_off_or_not_applicable_runs_eager(counter, monkeypatch):
    zp, zn = pair(2, 256, 128, seed=5)  # 65,536 elements: the compiled path's size
    assert zp.numel() >= operator.COMPILE_MIN_NUMEL
    eager = combine_eager(zp, zn, 5.0, 2.5, 0.25)

    def tried() -> int:
        return counter.frame_count + len(operator._variants) + len(operator._broken)

    start = tried()
    monkeypatch.setenv(operator.COMPILE_ENV, "0")
    assert not operator.compile_enabled() and torch.equal(nag_combine(zp, zn, 5.0, 2.5, 0.25), eager)
    monkeypatch.setenv(operator.COMPILE_ENV, "1")
    operator.set_compile(False)
    try:
        assert torch.equal(nag_combine(zp, zn, 5.0, 2.5, 0.25), eager)
    finally:
        operator.set_compile(None)
    assert operator.compile_enabled()
    small = pair(2, 16, 32)
    assert torch.equal(nag_combine(*small, 5.0, 2.5, 0.25), combine_eager(*small, 5.0, 2.5, 0.25))
    meta = torch.empty(2, 256, 128, device="meta")
    assert nag_combine(meta, meta, 5.0, 2.5, 0.25).device.type == "meta"
    with FlopCounterMode(display=False):  # a dispatch mode: eager
        assert torch.equal(nag_combine(zp, zn, 5.0, 2.5, 0.25), eager)
    grad = zp.clone().requires_grad_()
    out = nag_combine(grad, zn, 5.0, 2.5, 0.25)  # gradients: eager, and they flow
    out.sum().backward()
    assert grad.grad is not None and torch.equal(out.detach(), eager)
    assert tried() == start  # nothing above compiled or tried to


def test_failed_compile_falls_back_silently_and_for_good(monkeypatch, caplog):
    zp, zn = pair(2, 256, 128, seed=6)
    calls = []

    def broken(*args):
        calls.append(1)
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(operator, "_compiled", broken)
    monkeypatch.setattr(operator, "_broken", {})
    monkeypatch.setattr(operator, "_variants", set())
    monkeypatch.delenv(operator.COMPILE_ENV, raising=False)
    eager = combine_eager(zp, zn, 5.0, 2.5, 0.25)
    with caplog.at_level("WARNING"):
        assert torch.equal(nag_combine(zp, zn, 5.0, 2.5, 0.25), eager)
        assert torch.equal(nag_combine(zp, zn, 3.0, 2.5, 0.5), combine_eager(zp, zn, 3.0, 2.5, 0.5))
    assert calls == [1] and not caplog.records  # tried once, silent
    assert "no C++ compiler" in operator.compile_status()["failed"]["cpu"]
    # when the eager path fails as well, the inputs are at fault: its error is raised, compiling stays on
    monkeypatch.setattr(operator, "_broken", {})

    def bad_inputs(*args):
        raise ValueError("bad inputs")

    monkeypatch.setattr(operator, "combine_eager", bad_inputs)
    with pytest.raises(ValueError, match="bad inputs"):
        nag_combine(zp, zn, 5.0, 2.5, 0.25)
    assert operator._broken == {}


def test_outer_compile_traces_the_math(monkeypatch):
    """Under an outer torch.compile the combination is traced into the outer graph (no inner compile, no graph
    break), also for tensors of the compiled path's size."""
    zp, zn = pair(2, 256, 128, seed=7)
    monkeypatch.setattr(operator, "_variants", set())
    fn = torch.compile(nag_combine, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(fn(zp, zn, 5.0, 2.5, 0.25, "l1"), combine_eager(zp, zn, 5.0, 2.5, 0.25), atol=2e-6,
                               rtol=2e-6)
    assert not operator._variants
    torch._dynamo.reset()
