"""Paths a drop-in must get right or refuse clearly: higher derivatives, torch.func, tracing and ONNX,
compile in a fresh process, accuracy at scale, in-place use of outputs, empty shapes, the build and its
lock, the command line."""

import fcntl
import itertools
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import rmsnorm

from helpers import available, rand

BACKENDS = [b for b in ("reference", "cpu", "triton") if available(b)]
FLAGS = [dict(zip(("eps_mode", "p", "offset", "cast"), v))
         for v in itertools.product(["inside", "outside"], [1.0, 0.4], [0.0, 1.0], ["fp32", "llama"])]


def run_py(code: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout)


# ------------------------------------------------------------------------------------ second derivatives
@pytest.mark.parametrize("flags", FLAGS, ids=str)
@pytest.mark.parametrize("bias,res", [(False, False), (True, True)])
def test_gradgradcheck_every_flag_fp64(flags, bias, res):
    x = rand(3, 7, dtype=torch.float64, scale=2.0).requires_grad_(True)
    w = rand(7, dtype=torch.float64).requires_grad_(True)
    b = rand(7, dtype=torch.float64).requires_grad_(True) if bias else None
    r = rand(3, 7, dtype=torch.float64).requires_grad_(True) if res else None

    def f(*t):
        out = rmsnorm.rms_norm(t[0], t[1], t[2] if bias else None, residual=t[-1] if res else None,
                               backend="reference", **flags)
        return out if res else (out,)

    inputs = tuple(t for t in (x, w, b, r) if t is not None)
    assert torch.autograd.gradcheck(f, inputs)
    assert torch.autograd.gradgradcheck(f, inputs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("flags", [{}, {"p": 0.5, "eps_mode": "outside"}, {"offset": 1.0, "cast": "llama"}],
                         ids=str)
def test_hessian_vector_products_match_the_reference(backend, flags):
    """fp32 backends (no fp64 kernels): hvp and a gradient penalty's second derivative against the reference."""
    x, w, b = rand(4, 12, scale=2.0), rand(12), rand(12)
    r = rand(4, 12)
    v = (rand(4, 12, seed=3), rand(12, seed=4), rand(12, seed=5))

    def loss(be):
        return lambda a, g, c: rmsnorm.rms_norm(a, g, c, residual=r, backend=be, **flags)[0].pow(3).sum()

    _, ours = torch.autograd.functional.hvp(loss(backend), (x, w, b), v)
    _, ref = torch.autograd.functional.hvp(loss("reference"), (x, w, b), v)
    for a, e in zip(ours, ref):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4)
    assert all(a.abs().sum() > 0 for a in ours)

    def penalty(be):  # d/dw of |d loss / dx|^2: needs the backward's own derivative
        xx, ww = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        y = rmsnorm.rms_norm(xx, ww, backend=be, **flags)
        (gx,) = torch.autograd.grad(y.square().sum(), xx, create_graph=True)
        return torch.autograd.grad(gx.square().sum(), ww)[0]

    torch.testing.assert_close(penalty(backend), penalty("reference"), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_hvp_equals_torch_rms_norm(backend):
    x, v = rand(5, 16), rand(5, 16, seed=1)
    ours = rmsnorm.RMSNorm(16, eps=1e-6, backend=backend)
    theirs = torch.nn.RMSNorm(16, eps=1e-6)
    with torch.no_grad():
        ours.weight.copy_(rand(16))
        theirs.weight.copy_(ours.weight)
    _, a = torch.autograd.functional.hvp(lambda t: ours(t).pow(3).sum(), x, v)
    _, b = torch.autograd.functional.hvp(lambda t: theirs(t).pow(3).sum(), x, v)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


# -------------------------------------------------------------------------------------------- torch.func
def test_torch_func_transforms_match_torch():
    from torch.func import functional_call, grad, hessian, jacrev, jvp, vmap

    x, w = rand(3, 4, 16), rand(16)
    ref = F.rms_norm(x, (16,), w, 1e-6)
    torch.testing.assert_close(vmap(lambda a: rmsnorm.rms_norm(a, w))(x), ref)
    m = rmsnorm.RMSNorm(16, eps=1e-6)
    torch.testing.assert_close(vmap(m)(x), F.rms_norm(x, (16,), m.weight, 1e-6))
    row = x[0, 0]
    g = grad(lambda a: rmsnorm.rms_norm(a, w).pow(3).sum())(row)
    g_ref = grad(lambda a: F.rms_norm(a, (16,), w, 1e-6).pow(3).sum())(row)
    torch.testing.assert_close(g, g_ref)
    torch.testing.assert_close(jacrev(lambda a: rmsnorm.rms_norm(a, w, p=0.5))(row),
                               jacrev(lambda a: rmsnorm.rms_norm(a, w, p=0.5, backend="reference"))(row))
    torch.testing.assert_close(hessian(lambda a: rmsnorm.rms_norm(a, w).pow(3).sum())(row),
                               hessian(lambda a: F.rms_norm(a, (16,), w, 1e-6).pow(3).sum())(row), rtol=1e-4,
                               atol=1e-4)
    _, t = jvp(lambda a: rmsnorm.rms_norm(a, w), (row,), (torch.ones(16),))
    _, t_ref = jvp(lambda a: F.rms_norm(a, (16,), w, 1e-6), (row,), (torch.ones(16),))
    torch.testing.assert_close(t, t_ref)
    gw = grad(lambda p: functional_call(m, p, (x,)).square().sum())(dict(m.named_parameters()))["weight"]
    x2 = x.clone()
    w2 = m.weight.detach().clone().requires_grad_(True)
    F.rms_norm(x2, (16,), w2, 1e-6).square().sum().backward()
    torch.testing.assert_close(gw, w2.grad)


# ------------------------------------------------------------------------------------- tracing and ONNX
def test_jit_trace_records_the_norm():
    m = rmsnorm.RMSNorm(16, p=0.5, bias=True)
    with torch.no_grad():
        m.weight.copy_(rand(16))
        m.bias.copy_(rand(16))
    with pytest.warns(torch.jit.TracerWarning):
        traced = torch.jit.trace(m, rand(2, 16))
    other = rand(5, 16, seed=9) * 3
    torch.testing.assert_close(traced(other), m(other))
    assert "aten::empty" not in str(traced.graph) or "aten::mean" in str(traced.graph)


def _onnx_run(model, args):
    ort = pytest.importorskip("onnxruntime")
    sess = ort.InferenceSession(model.SerializeToString())
    feeds = {i.name: a.numpy() for i, a in zip(sess.get_inputs(), args)}
    return sess.run(None, feeds)


ONNX_CASES = [({}, False, False), ({"p": 0.5}, False, False), ({"eps_mode": "outside", "offset": 1.0}, True, False),
              ({}, False, True)]


@pytest.mark.parametrize("kw,bias,res", ONNX_CASES, ids=str)
def test_legacy_onnx_export_runs_in_onnxruntime(kw, bias, res, tmp_path):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    m = _model(kw, bias, res)
    args = (rand(3, 16),) + ((rand(3, 16, seed=2),) if res else ())
    path = tmp_path / "m.onnx"
    torch.onnx.export(m, args, str(path), dynamo=False)
    model = onnx.load(str(path))
    assert len(model.graph.input) == len(args)
    fresh = (rand(4, 16, seed=5) * 2,) + ((rand(4, 16, seed=6),) if res else ())
    with pytest.raises(Exception):  # noqa: B017  (shapes were traced: onnxruntime refuses others, its own way)
        _onnx_run(model, fresh)
    out = _onnx_run(model, tuple(a * 2 for a in args))
    expect = m(*(a * 2 for a in args))
    expect = expect if isinstance(expect, tuple) else (expect,)
    for o, e in zip(out, expect):
        torch.testing.assert_close(torch.from_numpy(o), e.detach(), rtol=1e-5, atol=1e-5)


class _Norm(torch.nn.Module):
    def __init__(self, kw, bias, res):
        super().__init__()
        self.norm = rmsnorm.RMSNorm(16, eps=1e-6, bias=bias, **kw)
        self.res = res

    def forward(self, x, r=None):
        return self.norm(x, residual=r) if self.res else self.norm(x)


def _model(kw, bias, res):
    torch.manual_seed(0)
    m = _Norm(kw, bias, res)
    with torch.no_grad():
        m.norm.weight.copy_(rand(16))
        if bias:
            m.norm.bias.copy_(rand(16))
    return m.eval()


@pytest.mark.parametrize("kw,bias,res", ONNX_CASES, ids=str)
def test_dynamo_onnx_export(kw, bias, res, tmp_path):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    m = _model(kw, bias, res)
    args = (rand(3, 16),) + ((rand(3, 16, seed=2),) if res else ())
    path = tmp_path / "m.onnx"
    torch.onnx.export(m, args, str(path), dynamo=True, opset_version=23)
    model = onnx.load(str(path))
    ops = {n.op_type for n in model.graph.node}
    if not kw and not bias and not res:
        assert "RMSNormalization" in ops
    fresh = tuple(a * 2 for a in args)
    expect = m(*fresh)
    expect = expect if isinstance(expect, tuple) else (expect,)
    for o, e in zip(_onnx_run(model, fresh), expect):
        torch.testing.assert_close(torch.from_numpy(o), e.detach(), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------ compile, each in a fresh process
COMPILE_CASES = {
    "no eager call first": """
        m = rmsnorm.RMSNorm(16)
        f = torch.compile(lambda a: m(a), fullgraph=True)
        x = torch.randn(4, 16)
        torch.testing.assert_close(f(x), torch.nn.functional.rms_norm(x, (16,), m.weight))
    """,
    "dynamic shapes": """
        w = torch.randn(16)
        f = torch.compile(lambda a: rmsnorm.rms_norm(a, w, p=0.5), fullgraph=True, dynamic=True)
        for n in (3, 5, 9):
            x = torch.randn(n, 16)
            torch.testing.assert_close(f(x), rmsnorm.rms_norm(x, w, p=0.5, backend="reference"))
    """,
    "recompile with new floats": """
        w = torch.randn(16)
        f = torch.compile(lambda a, p, e: rmsnorm.rms_norm(a, w, p=p, eps=e), fullgraph=True)
        x = torch.randn(4, 16)
        for p, e in ((0.5, 1e-6), (0.25, 1e-5), (0.75, 1e-4)):
            torch.testing.assert_close(f(x, p, e), rmsnorm.rms_norm(x, w, p=p, eps=e, backend="reference"))
        m = rmsnorm.RMSNorm(16)
        g = torch.compile(m, fullgraph=True)
        for p in (1.0, 0.5, 0.3):
            m.p = p
            torch.testing.assert_close(g(x), rmsnorm.rms_norm(x, m.weight, p=p, eps=None, backend="reference"))
    """,
    "compiled autograd": """
        torch._dynamo.config.compiled_autograd = True
        m = rmsnorm.RMSNorm(16)
        x = torch.randn(4, 16, requires_grad=True)
        torch.compile(lambda a: m(a).square().sum())(x).backward()
        x2 = x.detach().clone().requires_grad_(True)
        torch.nn.functional.rms_norm(x2, (16,), m.weight.detach()).square().sum().backward()
        torch.testing.assert_close(x.grad, x2.grad, rtol=1e-4, atol=1e-5)
    """,
}


@pytest.mark.parametrize("case", list(COMPILE_CASES))
def test_compile_in_a_fresh_process(case):
    out = run_py("import torch, rmsnorm\n" + textwrap.dedent(COMPILE_CASES[case]) + "print('ok')\n")
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


# -------------------------------------------------------------------------------------- accuracy at scale
def _err(a, truth):
    return (a.double() - truth).abs().max().item()


def _errors(x, w, dy, backend):
    """(y, dx, dw) errors against fp64 of ours and of torch's F.rms_norm on the same inputs."""
    n = x.shape[-1]
    out = {}
    for name, fn in (("ours", lambda a, b: rmsnorm.rms_norm(a, b, eps=1e-6, backend=backend)),
                     ("torch", lambda a, b: F.rms_norm(a, (n,), b, 1e-6)),
                     ("truth", lambda a, b: F.rms_norm(a, (n,), b, 1e-6))):
        a = (x.double() if name == "truth" else x.clone()).requires_grad_(True)
        b = (w.double() if name == "truth" else w.clone()).requires_grad_(True)
        y = fn(a, b)
        y.backward(dy.to(y.dtype))
        out[name] = (y.detach(), a.grad, b.grad)
    return [(_err(o, t), _err(r, t)) for o, r, t in zip(out["ours"], out["torch"], out["truth"])]


@pytest.mark.parametrize("backend", [b for b in ("cpu", "reference") if available(b)])
@pytest.mark.parametrize("m,n", [(1 << 18, 16), (2, 1 << 21), (1024, 1024)])
def test_fp32_error_within_2x_of_torch_at_scale(backend, m, n):
    g = torch.Generator().manual_seed(m + n)
    x = torch.randn(m, n, generator=g) * 3 + 0.5
    w = torch.randn(n, generator=g) * 0.5 + 1
    dy = torch.randn(m, n, generator=g)
    for what, (ours, theirs) in zip(("y", "dx", "dw"), _errors(x, w, dy, backend)):
        assert ours <= 2 * theirs + 1e-7, f"{what}: error {ours:.3g} vs torch {theirs:.3g}"


@pytest.mark.parametrize("backend", [b for b in ("cpu", "reference") if available(b)])
def test_bias_gradient_error_within_2x_of_torch_sum(backend):
    g = torch.Generator().manual_seed(1)
    m, n = 1 << 18, 16
    x, dy = torch.randn(m, n, generator=g), torch.randn(m, n, generator=g) + 0.3
    b = torch.zeros(n, requires_grad=True)
    rmsnorm.rms_norm(x, None, b, backend=backend).backward(dy)
    truth = dy.double().sum(0)
    assert _err(b.grad, truth) <= 2 * _err(dy.sum(0), truth) + 1e-7


def test_cpu_outputs_agree_with_torch_as_documented():
    """What the README states: the reference backend is torch.nn.RMSNorm's numerics bit for bit; the cpu
    backend's fp32 outputs are within 4 ulp of torch's (another summation order), bf16 within 1 ulp."""
    for dtype, ulps in ((torch.float32, 4.0), (torch.bfloat16, 1.0)):
        x, w = rand(256, 1000, dtype=dtype), rand(1000, dtype=dtype)
        theirs = F.rms_norm(x, (1000,), w, 1e-6)
        assert torch.equal(rmsnorm.rms_norm(x, w, backend="reference"), theirs)
        if available("cpu"):
            ours = rmsnorm.rms_norm(x, w, backend="cpu")
            scale = theirs.float().abs() * torch.finfo(dtype).eps
            assert ((ours.float() - theirs.float()).abs() <= ulps * scale + 1e-30).all()


# ------------------------------------------------------------------------------ outputs, shapes, modules
@pytest.mark.parametrize("backend", BACKENDS)
def test_in_place_ops_on_outputs_are_allowed(backend):
    x = rand(3, 4, 16).requires_grad_(True)
    r = rand(3, 4, 16)
    y = rmsnorm.rms_norm(x, rand(16), backend=backend)
    y += 1
    y.sum().backward()
    y2, h = rmsnorm.rms_norm(x, rand(16), residual=r, backend=backend)
    y2.mul_(2)
    (y2.sum() + h.sum()).backward()
    assert x.grad is not None
    # h is what the backward needs (as torch saves x + r for its norm): changing it is refused, loudly
    y3, h3 = rmsnorm.rms_norm(x, rand(16), residual=r, backend=backend)
    h3.add_(1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (y3.sum() + h3.sum()).backward()


@pytest.mark.parametrize("backend", [None, *BACKENDS])
@pytest.mark.parametrize("shape,ns", [((3, 0), 0), ((0,), 0), ((2, 3, 0), 0), ((2, 0, 4), 4)])
def test_empty_shapes_like_torch(backend, shape, ns):
    x = torch.randn(shape, requires_grad=True)
    ours = rmsnorm.rms_norm(x, torch.ones(ns), backend=backend)
    theirs = F.rms_norm(x, (ns,), torch.ones(ns))
    assert ours.shape == theirs.shape
    ours.sum().backward()
    assert x.grad.shape == x.shape
    assert rmsnorm.RMSNorm(ns)(x).shape == torch.nn.RMSNorm(ns)(x).shape


def test_module_signature_and_inference_tensors_as_torch():
    m = rmsnorm.RMSNorm(8, None, True, "cpu", torch.float64)
    assert m.weight.device.type == "cpu" and m.weight.dtype == torch.float64
    with torch.inference_mode():
        x = torch.randn(2, 8)
    ours, theirs = rmsnorm.RMSNorm(8), torch.nn.RMSNorm(8)
    torch.testing.assert_close(ours(x), theirs(x))
    assert ours(x).requires_grad == theirs(x).requires_grad
    with torch.inference_mode():
        torch.testing.assert_close(ours(x), theirs(x))
    for bad in ([8.7], "12", 8.0, [2, None]):
        with pytest.raises(TypeError, match="normalized_shape"):
            rmsnorm.RMSNorm(bad)
    with pytest.raises(ValueError, match="backend"):
        rmsnorm.RMSNorm(8, backend="garbage")


def test_env_backend_garbage_names_the_variable():
    out = run_py("""
        import torch, rmsnorm
        try:
            rmsnorm.rms_norm(torch.randn(2, 4))
        except ValueError as e:
            print(e)
    """, env={"RMSNORM_BACKEND": "garbage"})
    assert "RMSNORM_BACKEND='garbage'" in out.stdout, out.stderr
    info = subprocess.run([sys.executable, "-m", "rmsnorm", "info"], capture_output=True, text=True,
                          env={**os.environ, "RMSNORM_BACKEND": "garbage"}, timeout=600)
    assert "RMSNORM_BACKEND=garbage" in info.stdout and "not a backend" in info.stdout


# ------------------------------------------------------------------------------------------- the build
def _cached_build(tmp_path: Path) -> Path:
    """A copy of this process's CPU build in a fresh extensions folder (no compiling)."""
    from rmsnorm.backends.cpu import build

    build.load()
    src = build.build_directory()
    dst = tmp_path / "ext"
    shutil.copytree(src, dst / src.name, ignore=shutil.ignore_patterns("*.lock", "lock"))
    return dst


@pytest.mark.skipif(not available("cpu"), reason="needs the CPU build")
def test_stale_lock_of_a_killed_build_does_not_hang(tmp_path):
    ext = _cached_build(tmp_path)
    (next(ext.iterdir()) / "lock").write_text("")  # what torch leaves when its build is killed
    (next(ext.iterdir()) / "stamp.txt").unlink()  # force the build path (ninja finds it up to date)
    out = run_py("import torch, rmsnorm; print(rmsnorm.rms_norm(torch.randn(2, 8), backend='cpu').shape)",
                 env={"TORCH_EXTENSIONS_DIR": str(ext)}, timeout=300)
    assert out.returncode == 0 and "torch.Size([2, 8])" in out.stdout, out.stderr
    assert not (next(ext.iterdir()) / "lock").exists()


@pytest.mark.skipif(not available("cpu"), reason="needs the CPU build")
def test_cached_build_loads_without_ninja(tmp_path):
    ext = _cached_build(tmp_path)
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "ninja").write_text("#!/bin/sh\necho fake ninja was run >&2\nexit 1\n")
    (fake / "ninja").chmod(0o755)
    path = f"{fake}:{os.environ['PATH']}"
    out = run_py("import torch, rmsnorm; print(rmsnorm.rms_norm(torch.randn(2, 8), backend='cpu').shape)",
                 env={"TORCH_EXTENSIONS_DIR": str(ext), "PATH": path}, timeout=120)
    assert out.returncode == 0 and "compiling" not in out.stderr and "fake ninja" not in out.stderr, out.stderr


@pytest.mark.skipif(not available("cpu"), reason="needs the CPU build")
def test_live_build_is_waited_for_with_a_message_and_a_bound(tmp_path):
    ext = _cached_build(tmp_path)
    folder = next(ext.iterdir())
    (folder / "stamp.txt").unlink()
    with open(folder / "rmsnorm.lock", "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        out = run_py("import rmsnorm; print([b.reason for b in rmsnorm.backends() if b.name == 'cpu'][0])",
                     env={"TORCH_EXTENSIONS_DIR": str(ext), "RMSNORM_BUILD_TIMEOUT": "2"}, timeout=120)
    assert "another process is building" in out.stderr
    assert "timed out after 2 s" in out.stdout


def test_no_compiler_is_one_line_and_remembered(tmp_path):
    env = {"CXX": "/nonexistent/c++", "TORCH_EXTENSIONS_DIR": str(tmp_path)}
    code = "import rmsnorm; print([b.reason for b in rmsnorm.backends() if b.name == 'cpu'][0])"
    first = run_py(code, env=env, timeout=300)
    assert first.stdout.startswith("no C++ compiler: install g++ or set RMSNORM_CPU_BUILD=0"), first.stdout
    assert len(first.stdout.strip().splitlines()) == 1 and "ninja" not in first.stdout + first.stderr
    second = run_py(code, env=env, timeout=300)
    assert "remembered from an earlier attempt" in second.stdout
    cli = subprocess.run([sys.executable, "-m", "rmsnorm", "build"], capture_output=True, text=True,
                         env={**os.environ, **env}, timeout=300)
    assert cli.returncode == 1 and len(cli.stderr.strip().splitlines()) == 1 and "no C++ compiler" in cli.stderr


# --------------------------------------------------------------------------------------- command line
CLI_ERRORS = [
    ["bench", "--shapes", "0x64"], ["bench", "--samples", "0"], ["bench", "--providers", "x"],
    ["bench", "--threads", "-2"], ["bench", "--threads", "0"], ["bench", "--budget", "-1"],
    ["bench", "--out", "/proc/rmsnorm-cannot-write"], ["bench", "--dtypes", "fp8"], ["bench", "--device", "tpu"],
    ["reproduce", "--backend", "garbage"], ["reproduce", "--device", "tpu"], ["reproduce", "--tasks", ""],
    ["reproduce", "--variants", "nope"], ["reproduce", "--seeds", "0"], ["reproduce", "--preset", "x"],
    ["reproduce", "--out", "/proc/rmsnorm-cannot-write"], ["nonsense"],
]
if not torch.cuda.is_available():
    CLI_ERRORS.append(["reproduce", "--device", "cuda"])


@pytest.mark.parametrize("argv", CLI_ERRORS, ids=" ".join)
def test_cli_usage_errors_are_one_line_exit_2(argv, capsys):
    from rmsnorm.cli import main

    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err


def test_reproduce_without_sacrebleu_says_which_extra(tmp_path):
    out = run_py(f"""
        import sys
        sys.modules['sacrebleu'] = None
        from rmsnorm.cli import main
        sys.exit(main(['reproduce', '--preset', 'smoke', '--out', {str(tmp_path)!r}]))
    """)
    assert out.returncode == 2 and "rmsnorm[experiments]" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
