"""The pre-bound Triton launcher's bookkeeping, with a stand-in kernel (no GPU, no compilation): the first
launch of a specialization goes through the kernel's own path, later ones straight to the compiled kernel's
run with the constexprs appended in signature order; anything that could change Triton's choice is a new key."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from rmsnorm.backends.triton import prebound


class FakeCompiled:
    function, packed_metadata = "fn", "meta"

    def __init__(self, log):
        self.log = log

    def run(self, *a):
        self.log.append(("run", a))


class FakeKernel:
    arg_names = ("X", "N", "eps", "BLOCK", "FLAG")

    def __init__(self):
        self.log: list = []
        self.compiled = FakeCompiled(self.log)

    def __getitem__(self, grid):
        def launch(*args, **consts):
            self.log.append(("triton", grid, args, consts))
            return self.compiled

        return launch


@pytest.fixture
def cpu_prebound(monkeypatch):
    monkeypatch.setattr(prebound, "DEVICES", {"cpu"})
    monkeypatch.setattr(prebound, "_enabled", [True])

    class Driver:
        @staticmethod
        def get_current_device():
            return 0

        @staticmethod
        def get_current_stream(index):
            return 7

    class Runtime:
        launch_enter_hook = launch_exit_hook = None

    class Knobs:
        runtime = Runtime

    class Runtime_driver:
        active = Driver

    monkeypatch.setattr(prebound, "_triton", (Knobs, Runtime_driver))
    return Knobs


def test_second_launch_is_prebound_with_constexprs_in_order(cpu_prebound):
    k = FakeKernel()
    p = prebound.Prebound(k)
    x = torch.zeros(64)
    consts = {"FLAG": True, "BLOCK": 64, "num_warps": 4}
    p.launch((3,), (x, 64, 1e-6), consts, x.device)
    p.launch((3,), (x, 64, 1e-6), consts, x.device)
    assert [e[0] for e in k.log] == ["triton", "run"]
    assert k.log[1][1] == (3, 1, 1, 7, "fn", "meta", None, None, None, x, 64, 1e-6, 64, True)


def test_anything_triton_specializes_on_is_a_new_key(cpu_prebound):
    k = FakeKernel()
    p = prebound.Prebound(k)
    x = torch.zeros(65)
    base = ((x, 64, 1e-6), {"FLAG": True, "BLOCK": 64, "num_warps": 4})
    variants = [((x[1:], 64, 1e-6), base[1]),  # misaligned pointer
                ((x.half(), 64, 1e-6), base[1]),  # dtype
                ((x, 1, 1e-6), base[1]),  # an int that is 1
                ((x, 48, 1e-6), base[1]),  # another int
                (base[0], {"FLAG": False, "BLOCK": 64, "num_warps": 4}),
                (base[0], {"FLAG": True, "BLOCK": 64, "num_warps": 8})]
    p.launch((1,), *base, x.device)
    for args, consts in variants:
        p.launch((1,), args, consts, x.device)
    assert all(e[0] == "triton" for e in k.log)
    p.launch((1,), *base, x.device)
    assert k.log[-1][0] == "run"


def test_hooks_and_other_devices_take_tritons_path(cpu_prebound):
    k = FakeKernel()
    p = prebound.Prebound(k)
    x = torch.zeros(64)
    args, consts = (x, 64, 1e-6), {"FLAG": True, "BLOCK": 64}
    p.launch((1,), args, consts, x.device)
    cpu_prebound.runtime.launch_enter_hook = lambda *a: None
    try:
        p.launch((1,), args, consts, x.device)
    finally:
        cpu_prebound.runtime.launch_enter_hook = None
    p.launch((1,), args, consts, torch.device("meta"))
    assert [e[0] for e in k.log] == ["triton", "triton", "triton"]


def test_a_launcher_that_does_not_bind_turns_prebinding_off(cpu_prebound):
    k = FakeKernel()

    def broken(*a):
        raise TypeError("other launcher signature")

    k.compiled.run = broken
    p = prebound.Prebound(k)
    x = torch.zeros(64)
    args, consts = (x, 64, 1e-6), {"FLAG": True, "BLOCK": 64}
    p.launch((1,), args, consts, x.device)
    p.launch((1,), args, consts, x.device)
    p.launch((1,), args, consts, x.device)
    assert [e[0] for e in k.log] == ["triton", "triton", "triton"]
    assert prebound._enabled == [False]


def _stand_in_run(option: str) -> str:
    """benchmarks/cuda_host_cost.py with ``option`` (Triton's real launcher on a stand-in libcuda): its output."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    if shutil.which("cc") is None:
        pytest.skip("needs a C compiler")
    root = Path(__file__).resolve().parents[1]
    run = subprocess.run([sys.executable, str(root / "benchmarks" / "cuda_host_cost.py"), option],
                         capture_output=True, text=True, timeout=900, cwd=root)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return run.stdout


def test_prebound_launches_bind_to_tritons_real_launcher():
    """--quick: Triton's real CUDA launcher against a stand-in libcuda, so that a Triton whose launcher takes
    other arguments fails here rather than silently on a GPU."""
    out = _stand_in_run("--quick")
    assert "pre-binding on" in out, out[-2000:]


def test_cxx_launches_match_tritons_own_byte_for_byte():
    """--check: every launch the GPU eager entry makes from C++ (its packed parameters, grid, block, shared
    memory, stream) against Triton's own launch of the same kernel with the same arguments, as a stand-in
    libcuda records them; forward and backward over dtypes, shapes and options; grad-mode calls recorded by
    the C++ node; create_graph gradients through it equal to the reference backend's."""
    out = _stand_in_run("--check")
    assert " 0 differ" in out, out[-2000:]


def test_cxx_launch_packing(monkeypatch):
    """The parameter layout cxx_launch packs: constexprs left out, scalars at their natural alignment,
    tensors as patched pointer slots by identity with the sources, then two null scratch pointers."""

    class Meta:
        num_ctas, launch_cooperative_grid, launch_pdl = 1, False, False
        global_scratch_size = profile_scratch_size = 0
        shared, num_warps = 64, 4

    from types import MappingProxyType

    class Src:
        signature = MappingProxyType({"X": "*bf16", "N": "i32", "eps": "fp32", "Y": "*bf16", "S": "i64",
                                      "BLOCK": "constexpr"})

    class Compiled:
        metadata, src, function, run = Meta, Src, 1234, object()

    class Kernel:
        arg_names = ("X", "N", "eps", "Y", "S", "BLOCK")

    made = {}

    class Launch:
        def __init__(self, *a):
            made["args"] = a

    class Mod:
        TritonLaunch = Launch

    monkeypatch.setattr(prebound, "_cxx_state", [Mod])
    monkeypatch.setattr(prebound, "_enabled", [True])
    bound = prebound.Bound(Kernel, (3,), {"BLOCK": 128}, torch.device("cpu"))
    bound.compiled, bound.tail = Compiled, (128,)
    x, y = torch.zeros(4), torch.zeros(4)
    assert prebound.cxx_launch(bound, (x, 7, 0.5, y, 2**40), (y, x)) is not None
    function, grid, block, shared, packed, offsets, sizes, slots, device = made["args"]
    assert (function, grid, block, shared, device) == (1234, (3, 1, 1), 128, 64, -1)
    assert offsets == [0, 8, 12, 16, 24, 32, 40] and sizes == [8, 4, 4, 8, 8, 8, 8]
    assert slots == [(0, 1), (3, 0)]  # X is source 1, Y source 0
    import struct

    assert packed[8:12] == struct.pack("<i", 7) and packed[12:16] == struct.pack("<f", 0.5)
    assert packed[24:32] == struct.pack("<q", 2**40) and packed[32:] == bytes(16)
    # anything it cannot pack exactly: no C++ launch
    assert prebound.cxx_launch(bound, (x, 2**40, 0.5, y, 1), (x, y)) is None  # i32 out of range
    assert prebound.cxx_launch(bound, (x, 7, 0.5, torch.zeros(4), 1), (x, y)) is None  # a tensor not in sources
    Meta.global_scratch_size = 16
    assert prebound.cxx_launch(bound, (x, 7, 0.5, y, 1), (x, y)) is None
