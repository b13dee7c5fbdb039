"""Memory on long videos (issue 16): the NAG combination runs over chunks of whole tokens above
``CHUNK_NUMEL`` elements, bit for bit the unchunked result, with a bounded peak; the cross-attention kernel writes
the guided rows over ``Z+`` instead of allocating an output and concatenating."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from nagkit.core import operator
from nagkit.core.operator import _chunk_bounds, combine_eager, nag_combine
from nagkit.core.state import Packing
from nagkit.kernels.cross import nag_cross_attention

BIG = 1 << 40  # a CHUNK_NUMEL that never chunks


def pair(*shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    zp = torch.randn(*shape, generator=g)
    zn = 3 * torch.randn(*shape, generator=g)
    flat_p, flat_n = zp.view(-1, shape[-1]), zn.view(-1, shape[-1])
    flat_p[5] = 0  # edge tokens land in different chunks: Z+ = 0, Z~ = 0, tiny and huge values
    flat_n[7], flat_p[7] = flat_p[7], flat_p[7]
    flat_p[11], flat_n[11] = 1e-38, -1e-38
    flat_p[-2], flat_n[-2] = 1e38, -1e38  # near the fp32 limit (the result, 1.375e38, still fits)
    return zp.to(dtype), zn.to(dtype)


def params(kind):
    values = (5.0, 2.5, 0.25)
    return tuple(torch.tensor(v) for v in values) if kind == "tensor" else values


def combine(monkeypatch, chunk, *args, **kwargs):
    monkeypatch.setattr(operator, "CHUNK_NUMEL", chunk)
    return nag_combine(*args, **kwargs)


@pytest.fixture
def eager_only():
    operator.set_compile(False)
    yield
    operator.set_compile(None)


@pytest.mark.parametrize("kind", ["float", "tensor"])
@pytest.mark.parametrize("norm", ["l1", "l2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_equals_unchunked_eager(eager_only, monkeypatch, dtype, norm, kind):
    s, t, a = params(kind)
    for chunk_rows, shape in [(50, (2, 301, 64)), (7, (2, 301, 64)), (2, (2, 301, 64)), (3, (601, 48))]:
        # 602 rows in chunks of 50, 7 (plus 3 elements: whole tokens only) or 2; 601 rows in 3s: the 1-row rest joins
        zp, zn = pair(*shape, dtype=dtype)
        width = shape[-1]
        whole = combine(monkeypatch, BIG, zp, zn, s, t, a, norm)
        chunk = chunk_rows * width + (3 if chunk_rows == 7 else 0)
        chunked = combine(monkeypatch, chunk, zp, zn, s, t, a, norm)
        assert len(_chunk_bounds(zp.numel() // width, width)) > 2  # it did run in chunks
        assert chunked.dtype == dtype and chunked.shape == zp.shape
        assert torch.equal(chunked, whole) and torch.isfinite(chunked).all()
        inplace = zp.clone()
        assert combine(monkeypatch, chunk, inplace, zn, s, t, a, norm, out=inplace) is inplace
        assert torch.equal(inplace, whole)
        assert torch.equal(whole, combine_eager(zp, zn, s, t, a, norm))  # unchunked: the eager formula


def test_chunk_threshold_respected(eager_only, monkeypatch):
    sizes = []
    real = operator.combine_eager

    def spy(zp, zn, *args):
        sizes.append(tuple(zp.shape))
        return real(zp, zn, *args)

    monkeypatch.setattr(operator, "combine_eager", spy)
    zp, zn = pair(3, 500, 32)
    monkeypatch.setattr(operator, "CHUNK_NUMEL", zp.numel())  # at the threshold: one piece, as before
    nag_combine(zp, zn, 5.0, 2.5, 0.25)
    assert sizes == [(3, 500, 32)]
    sizes.clear()
    monkeypatch.setattr(operator, "CHUNK_NUMEL", 32 * 64)  # 64 rows a chunk
    nag_combine(zp, zn, 5.0, 2.5, 0.25)
    assert sum(r for r, _ in sizes) == 1500 and all(c == 32 for _, c in sizes)
    assert all(r == 64 for r, _ in sizes[:-1]) and 2 <= sizes[-1][0] <= 64 and len(sizes) == 24
    # the bounds: whole tokens, no chunk above the threshold (but a joined 1-row rest), never a 1-row chunk
    monkeypatch.setattr(operator, "CHUNK_NUMEL", 1000)
    for rows, width in [(1000, 10), (1001, 10), (999, 10), (5, 600), (7, 2000), (1001, 1)]:
        bounds = _chunk_bounds(rows, width)
        assert bounds[0] == 0 and bounds[-1] == rows
        steps = [hi - lo for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)]
        step = max(2, 1000 // width)
        assert all(2 <= n <= step for n in steps[:-1]) and 2 <= steps[-1] <= step + 1
    assert _chunk_bounds(100, 10) is None and _chunk_bounds(2, 10_000) is None  # small, or one chunk's rows
    assert _chunk_bounds(1000, 1) is None and _chunk_bounds(3, 10_000) == [0, 3]
    meta = torch.empty(64, 1000, device="meta")  # meta (FLOP counting): never chunked
    sizes.clear()
    nag_combine(meta, meta, 5.0, 2.5, 0.25)
    assert sizes == [(64, 1000)]


def test_gradients_unchunked_and_flow(eager_only, monkeypatch):
    zp, zn = pair(40, 16)
    monkeypatch.setattr(operator, "CHUNK_NUMEL", 64)
    grad = zp.clone().requires_grad_()
    out = nag_combine(grad, zn, 5.0, 2.5, 0.25)
    out.sum().backward()
    assert grad.grad is not None
    monkeypatch.setattr(operator, "CHUNK_NUMEL", BIG)
    torch.testing.assert_close(out.detach(), nag_combine(zp, zn, 5.0, 2.5, 0.25), atol=1e-6, rtol=1e-6)


@pytest.fixture
def compiled_path(monkeypatch):
    """nag_combine's compiled path for any size, through dynamo with the ``eager`` backend (compiles in about a
    second: the chunking around the compiled function is tested here; inductor's kernels in the bench-marked test)."""
    torch._dynamo.reset()
    operator.reset_compiled()
    monkeypatch.setattr(operator, "COMPILE_MIN_NUMEL", 1)
    monkeypatch.delenv(operator.COMPILE_ENV, raising=False)
    operator.set_compile(None)
    yield
    operator.reset_compiled()
    torch._dynamo.reset()


def _chunked_equals_unchunked_compiled(monkeypatch, dtype):
    zp, zn = pair(2, 301, 64, dtype=dtype)
    whole = combine(monkeypatch, BIG, zp, zn, 5.0, 2.5, 0.25)
    assert operator.compile_status()["variants"] and not operator.compile_status()["failed"]
    for chunk in (50 * 64, 7 * 64 + 3, 2 * 64):
        assert torch.equal(combine(monkeypatch, chunk, zp, zn, 5.0, 2.5, 0.25), whole)
        inplace = zp.clone()
        combine(monkeypatch, chunk, inplace, zn, 5.0, 2.5, 0.25, out=inplace)
        assert torch.equal(inplace, whole)
    assert not operator.compile_status()["failed"], operator.compile_status()


def test_chunked_equals_unchunked_compiled(compiled_path, monkeypatch):
    monkeypatch.setattr(operator, "_compiled", torch.compile(operator.combine_reference, backend="eager",
                                                             dynamic=True, fullgraph=True))
    _chunked_equals_unchunked_compiled(monkeypatch, torch.float32)


@pytest.mark.bench  # inductor compiles each variant in 10-40 s on a shared CPU: NAGKIT_BENCH=1 to run
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_equals_unchunked_inductor(compiled_path, monkeypatch, dtype):
    _chunked_equals_unchunked_compiled(monkeypatch, dtype)


def test_compiled_failure_mid_way_finishes_eager(monkeypatch):
    """A compiled chunk that fails: the remaining chunks run eager, the written ones stay (``out`` may be Z+)."""
    zp, zn = pair(100, 32)
    calls = []

    def flaky(zp, zn, *args):
        calls.append(zp.shape[0])
        if len(calls) == 3:
            raise RuntimeError("boom")
        return operator.combine_reference(zp, zn, *args)

    monkeypatch.setattr(operator, "COMPILE_MIN_NUMEL", 1)
    monkeypatch.setattr(operator, "_compiled", flaky)
    monkeypatch.setattr(operator, "_broken", {})
    monkeypatch.setattr(operator, "_variants", set())
    operator.set_compile(True)
    try:
        inplace = zp.clone()
        combine(monkeypatch, 32 * 10, inplace, zn, 5.0, 2.5, 0.25, out=inplace)
        assert len(calls) == 3 and "cpu" in operator._broken
    finally:
        operator.set_compile(None)
    torch.testing.assert_close(inplace, combine_eager(zp, zn, 5.0, 2.5, 0.25), atol=2e-6, rtol=2e-6)


@pytest.mark.parametrize("rows", [slice(0, 2), slice(1, 2)])  # all rows guided; CFG: only the conditional row
def test_cross_attention_writes_over_z_pos(rows):
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 2, 40, 8, generator=g)
    k, v = torch.randn(2, 2, 7, 8, generator=g), torch.randn(2, 2, 7, 8, generator=g)
    packing = Packing(lp=4, ln=3, rows=rows, batch=2)
    made = []

    def attend(q, k, v, mask):
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
        made.append(out)
        return out

    with torch.no_grad():
        out = nag_cross_attention(attend, q, k, v, None, packing, 5.0, 2.5, 0.25)
    z_pos, z_neg = (attend(q, k[:, :, :4], v[:, :, :4], None),
                    attend(q[rows], k[rows, :, 4:], v[rows, :, 4:], None))
    assert out is made[0]  # Z+'s own buffer: no new output, no concatenation
    expected = z_pos.clone()
    expected[rows] = nag_combine(z_pos[rows], z_neg, 5.0, 2.5, 0.25)
    assert torch.equal(out, expected)
    if rows.start:
        assert torch.equal(out[:1], z_pos[:1])  # the unconditional row untouched
    grad_q = q.clone().requires_grad_()  # with gradients: out of place, differentiable, same numbers
    out_g = nag_cross_attention(attend, grad_q, k, v, None, packing, 5.0, 2.5, 0.25)
    out_g.sum().backward()
    assert grad_q.grad is not None and torch.equal(out_g.detach(), expected)


_PEAK = textwrap.dedent("""
    import ctypes, gc, sys
    import torch
    from nagkit.core import operator
    operator.set_compile(False)
    operator.CHUNK_NUMEL = 1 << 18
    torch.set_num_threads(1)
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD: large blocks come from mmap and go back when freed

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024

    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
      zp = torch.randn(8192, 1024, generator=g).to(dtype)
      zn = torch.randn(8192, 1024, generator=g).to(dtype)
      operator.nag_combine(zp[:64], zn[:64], 5.0, 2.5, 0.25)  # first-call setup outside the measurement
      peaks = []
      for inplace in (False, True):
        target = zp.clone() if inplace else None
        gc.collect()
        libc.malloc_trim(0)
        open("/proc/self/clear_refs", "w").write("5")
        base = status("VmRSS")
        with torch.no_grad():
            out = operator.nag_combine(zp, zn, 5.0, 2.5, 0.25, out=target)
        peaks.append(status("VmHWM") - base)
        del out, target
      print(peaks[0], peaks[1], zp.numel() * zp.element_size(), operator.CHUNK_NUMEL * 4)
""")


def _clear_refs_writable():
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux") or not _clear_refs_writable(),
                    reason="needs Linux /proc/self/clear_refs (peak RSS reset)")
def test_combination_peak_memory_bounded():
    """Peak RSS growth of one eager combination (8192 tokens × 1024 channels, fp32 and bf16) in a fresh process: the
    output plus chunk-sized temporaries (unchunked, the fp32 temporaries were about 10× the bf16 output); written
    over Z+ (``out=z_pos``), the chunk-sized temporaries only."""
    env = {**os.environ, "NAGKIT_COMPILE": "0", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", _PEAK], capture_output=True, text=True, env=env, timeout=120,
                          check=True)
    for line in done.stdout.strip().splitlines():
        peak, peak_inplace, output, chunk = (int(x) for x in line.split())
        assert peak <= 1.5 * output + chunk, (peak / output, chunk / output)
        assert peak_inplace <= 0.5 * output + chunk, (peak_inplace / output, chunk / output)
    assert len(done.stdout.strip().splitlines()) == 2
