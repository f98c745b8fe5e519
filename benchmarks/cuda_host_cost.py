"""Host cost of the CUDA path without a GPU: Triton's real launcher against a stand-in libcuda.

    python benchmarks/cuda_host_cost.py [--out FILE.jsonl]

On a GPU, small norms are launch-bound: the GPU idles while the host prepares the next launch. That
host work (argument checks, allocations, Triton's specialization and launcher, autograd) is measurable
on any Linux machine: this script compiles ``cuda_host/stub_libcuda.c`` into a libcuda.so.1 whose every
call succeeds at once, points Triton's CUDA driver at it (sm_90 target, kernels compiled with Triton's
own ptxas), and times the triton backend's forward and backward with CPU tensors standing in for device
memory. Kernels never run, so every time here is host time; nothing is read from the outputs.

Compared in one interleaved run (medians, see rmsnorm.bench.timing), as ratios to a no-op Python
``torch.autograd.Function`` (forward returns its input's view, backward returns its gradient):
an ``rmsnorm.RMSNorm(backend="triton")`` module call (no_grad), a grad-mode call, and forward + backward
through autograd (the eager entry, rmsnorm.backends.triton.entry), the same module calls through the
general route (a subclass: no entry), a functional ``rms_norm`` call, and, for comparison, every launch
through Triton's own ``kernel[grid]`` path instead of pre-bound (rmsnorm.backends.triton.prebound).
Also: one bare ``kernel[grid](...)`` launch and a pre-bound ``CompiledKernel.run`` of a copy kernel.
The host (CPU model) matters: name it with the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHAPES = [(1, 4096), (8, 4096), (64, 512)]


def _build_stub(directory: Path) -> None:
    import triton

    include = Path(triton.__file__).parent / "backends" / "nvidia" / "include"
    subprocess.run(["cc", "-shared", "-fPIC", "-O2", f"-I{include}", "-o", str(directory / "libcuda.so.1"),
                    str(HERE / "cuda_host" / "stub_libcuda.c")], check=True)


def _activate_stub_driver() -> None:
    """Make Triton's CUDA driver the active one, answering for device 0 on stream 0 (torch has no CUDA)."""
    import torch
    import triton
    from triton.backends.nvidia.driver import CudaDriver

    drv = CudaDriver()
    drv.get_current_device = lambda: 0
    drv.get_current_stream = lambda device=None: 0
    drv.get_device_capability = lambda device=None: (9, 0)
    drv.set_current_device = lambda device: None
    drv.get_active_torch_device = lambda: torch.device("cpu")
    triton.runtime.driver.set_active(drv)


def _callables(m: int, n: int, noop, copy) -> dict:
    import torch
    import triton

    import rmsnorm
    from rmsnorm.backends.triton import launch, prebound
    from rmsnorm.spec import plain

    dtype = torch.bfloat16
    x = torch.randn(m, n, dtype=dtype)
    w = torch.randn(n, dtype=dtype, requires_grad=True)
    xg = x.clone().requires_grad_(True)
    dy = torch.randn(m, n, dtype=dtype)
    spec = plain(dtype, n)
    small = torch.empty(n), torch.empty(n)
    block = triton.next_power_of_2(n)
    compiled = copy[(1,)](*small, n, BLOCK=block)
    args = (*small, n, block)

    def launch_bare():
        copy[(1,)](*small, n, BLOCK=block)

    def launch_prebound():
        compiled.run(1, 1, 1, 0, compiled.function, compiled.packed_metadata, None, None, None, *args)

    def noop_fwd():
        with torch.no_grad():
            noop.apply(x, w)

    def noop_grad_fwd():
        noop.apply(xg, w)

    def noop_round_trip():
        noop.apply(xg, w).backward(dy)

    def ours_launch():
        with torch.no_grad():
            launch.forward(x, w, None, None, spec)

    def unbound(fn):  # the same call with every launch through Triton's own path (kernel[grid])
        def run():
            prebound._enabled[0] = False
            try:
                fn()
            finally:
                prebound._enabled[0] = True
        return run

    module = rmsnorm.RMSNorm(n, eps=1e-6, dtype=dtype, backend="triton")

    def ours_fwd():
        with torch.no_grad():
            module(x)

    def ours_grad_fwd():
        module(xg)

    def ours_round_trip():
        module(xg).backward(dy)

    class General(rmsnorm.RMSNorm):  # a subclass: no eager entry, the general route (rmsnorm.ops.run)
        pass

    general = General(n, eps=1e-6, dtype=dtype, backend="triton")

    def general_fwd():
        with torch.no_grad():
            general(x)

    def general_round_trip():
        general(xg).backward(dy)

    def functional_fwd():
        with torch.no_grad():
            rmsnorm.rms_norm(x, w, eps=1e-6, backend="triton")

    return {"kernel[grid]": launch_bare, "CompiledKernel.run": launch_prebound, "no-op forward": noop_fwd,
            "no-op forward (grad mode)": noop_grad_fwd, "no-op fwd+bwd": noop_round_trip,
            "launch.forward, kernel[grid]": unbound(ours_launch), "launch.forward": ours_launch,
            "forward (no_grad), general route": general_fwd, "forward (no_grad)": ours_fwd,
            "functional (no_grad)": functional_fwd, "forward (grad mode)": ours_grad_fwd,
            "fwd+bwd, kernel[grid]": unbound(ours_round_trip), "fwd+bwd, general route": general_round_trip,
            "fwd+bwd": ours_round_trip}


def _stand_in() -> None:
    """Triton's CUDA driver on the stand-in libcuda, and the triton backend taking CPU tensors as it takes
    CUDA ones (launched pre-bound, as on a GPU)."""
    import dataclasses

    from rmsnorm.backends import registry
    from rmsnorm.backends.triton import prebound

    _activate_stub_driver()
    registry.register(dataclasses.replace(registry.get("triton"), devices=frozenset({"cuda", "cpu"})))
    registry._AVAILABLE["triton"] = None
    prebound.DEVICES.add("cpu")


def check_cxx_launches() -> int:
    """Every C++ launch the eager entry makes (rmsnorm.backends.triton.prebound.cxx_launch) against Triton's
    own launch of the same kernel with the same arguments, as the stand-in driver records them: grid, block,
    shared memory, stream and every parameter's bytes. Over dtypes, shapes and options, forward (with and
    without grad) and backward. Exit status 0 when all are identical and every launch was made."""
    import ctypes

    import torch

    import rmsnorm
    from rmsnorm.backends.cpu import build
    from rmsnorm.backends.triton import prebound

    build.module()  # the C++ library the launches come from (compiled here if this machine has none yet)
    _stand_in()
    stub = ctypes.CDLL("libcuda.so.1")
    made_by = prebound.cxx_launch
    checked, failures = [], []

    def last(n: int) -> tuple:
        dims, stream, raw = (ctypes.c_uint * 7)(), ctypes.c_void_p(), (ctypes.c_ubyte * (8 * n))()
        stub.stub_last(dims, ctypes.byref(stream), raw)
        return tuple(dims), stream.value, bytes(raw)

    def checking(bound, args, sources):
        made = made_by(bound, args, sources)
        name = getattr(bound.kernel, "__name__", str(bound.kernel))
        if made is None:
            failures.append(f"{name}: no C++ launch made")
            return None
        sizes = list(made.sizes)
        stub.stub_expect(len(sizes), (ctypes.c_int * len(sizes))(*sizes))
        bound(*args)  # Triton's own launcher
        theirs = last(len(sizes))
        made.launch(list(sources) + [sources[0]] * (7 - len(sources)))
        ours = last(len(sizes))
        checked.append(name)
        if theirs[0][3] == 0 or not any(theirs[2]):
            failures.append(f"{name}: nothing recorded of Triton's launch")
        elif theirs != ours:
            failures.append(f"{name}: Triton's launch {theirs} != the C++ launch {ours}")
        return made

    prebound.cxx_launch = checking
    torch.manual_seed(0)
    cases = 0
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for m, n in ((1, 4096), (8, 4096), (64, 512), (3, 1000), (5, 130)):
            for opts in ({}, {"bias": True}, {"elementwise_affine": False}, {"p": 0.5, "eps_mode": "outside"},
                         {"offset": 1.0, "eps": 1e-5}, {"out_dtype": torch.float32}):
                module = rmsnorm.RMSNorm(n, dtype=dtype, backend="triton", **opts)
                x = torch.randn(m, n, dtype=dtype)
                xg = x.clone().requires_grad_(True)
                out = opts.get("out_dtype", dtype)
                grads = []
                for _ in range(3):  # the first call binds, the later ones run from C++ (and its autograd node)
                    with torch.no_grad():
                        module(x)
                    xg.grad = None
                    module.zero_grad(set_to_none=True)
                    y = module(xg)
                    node = type(y.grad_fn).__name__
                    y.backward(torch.randn(m, n, dtype=out))
                    grads.append([(t.grad.dtype, t.grad.shape) if t.grad is not None else None
                                  for t in (xg, *module.parameters())])
                if node != "CppFunction":  # (the C++ node; the Python one is EntryFunctionBackward)
                    failures.append(f"{dtype} {m}x{n} {opts}: grad-mode calls recorded by {node}")
                if grads[1:] != grads[:2]:
                    failures.append(f"{dtype} {m}x{n} {opts}: gradients {grads}")
                # create_graph: the node calls back into Python (the differentiable decomposition), whose
                # numbers are real here (no kernel involved): they must be the reference backend's
                if dtype == torch.float32 and "out_dtype" not in opts:
                    dy = torch.randn(m, n, dtype=dtype)
                    params = [p for p in module.parameters()]
                    got = torch.autograd.grad(module(xg), [xg, *params], dy, create_graph=True)
                    ref = module.__class__(n, dtype=dtype, backend="reference", **opts)
                    ref.load_state_dict(module.state_dict())
                    want = torch.autograd.grad(ref(xg), [xg, *ref.parameters()], dy)
                    if any(not torch.allclose(a, b, rtol=1e-5, atol=1e-5) for a, b in zip(got, want)):
                        failures.append(f"{dtype} {m}x{n} {opts}: create_graph gradients differ from the reference")
                plan = module._entry[1]
                for rows in plan.table.values():
                    if rows is None or any(v is None for v in rows.cxx.values()):
                        failures.append(f"{dtype} {m}x{n} {opts}: a launch left to Python")
                cases += 1
    print(f"{len(checked)} C++ launches over {cases} cases compared with Triton's own; {len(failures)} differ")
    for f in failures[:20]:
        print("  " + f)
    return 1 if failures or not checked else 0


def measure(out: Path | None, quick: bool = False) -> list[dict]:
    import torch
    import triton
    import triton.language as tl

    from rmsnorm.backends.triton import launch, prebound

    _stand_in()
    from rmsnorm.bench.timing import measure_group
    from rmsnorm.host import cpu_model

    class Noop(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, w):
            return x.view_as(x)

        @staticmethod
        def backward(ctx, dy):
            return dy, None

    @triton.jit
    def copy(X, Y, N, BLOCK: tl.constexpr):
        i = tl.arange(0, BLOCK)
        tl.store(Y + i, tl.load(X + i, mask=i < N), mask=i < N)

    rows = []
    torch.set_num_threads(1)
    for m, n in SHAPES:
        fns = _callables(m, n, Noop, copy)
        timings = measure_group(fns, samples=3 if quick else 15, min_samples=3 if quick else 5,
                                budget_s=0.01 if quick else 0.3)
        base_f, base_rt = timings["no-op forward"].median_s, timings["no-op fwd+bwd"].median_s
        base_g = timings["no-op forward (grad mode)"].median_s
        for name, t in timings.items():
            base = base_rt if "bwd" in name else base_g if "grad mode" in name else base_f
            rows.append({"m": m, "n": n, "dtype": "bfloat16", "what": name, "median_us": t.median_s * 1e6,
                         "ratio_to_noop": t.median_s / base, "cpu": cpu_model(), "torch": torch.__version__,
                         "triton": triton.__version__})
    print(f"host: {cpu_model()}, torch {torch.__version__}, triton {triton.__version__}, 1 thread, bf16; ratios "
          "to the no-op autograd.Function (no_grad rows: its forward under no_grad; grad-mode rows: its forward "
          "in grad mode; fwd+bwd rows: its round trip)")
    print("| M×N | " + " | ".join(dict.fromkeys(r["what"] for r in rows)) + " |")
    print("|---|" + "---|" * len(dict.fromkeys(r["what"] for r in rows)))
    for m, n in SHAPES:
        cells = [f"{r['median_us']:.1f} ({r['ratio_to_noop']:.2f})" for r in rows if (r["m"], r["n"]) == (m, n)]
        print(f"| {m}×{n} | " + " | ".join(cells) + " |")
    hits = sum(len(p._cache) for p in vars(launch).values() if isinstance(p, prebound.Prebound))
    print(f"pre-bound kernels: {hits} specializations cached, pre-binding "
          f"{'on' if prebound._enabled[0] else 'OFF (the launcher did not bind)'}")
    if out is not None:
        out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=None, help="write the rows as JSONL here")
    p.add_argument("--quick", action="store_true", help="a few samples only (a smoke test of the path)")
    p.add_argument("--check", action="store_true",
                   help="instead of timing: compare every C++ launch with Triton's own launch, byte for byte")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        if args.check:
            return check_cxx_launches()
        measure(args.out, args.quick)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        _build_stub(Path(tmp))
        # the loader reads LD_LIBRARY_PATH at process start: the measurement runs in a child
        env = dict(os.environ, LD_LIBRARY_PATH=f"{tmp}:{os.environ.get('LD_LIBRARY_PATH', '')}",
                   TRITON_LIBCUDA_PATH=tmp, TRITON_CACHE_DIR=str(Path(tmp) / "triton-cache"),
                   TRITON_DEFAULT_FP_FUSION="1")
        env.pop("TRITON_INTERPRET", None)
        child = [sys.executable, __file__, "--child"] + (["--out", str(args.out.resolve())] if args.out else []) + (
            ["--quick"] if args.quick else []) + (["--check"] if args.check else [])
        return subprocess.run(child, env=env).returncode


if __name__ == "__main__":
    raise SystemExit(main())
