"""The Triton kernels against the reference. Without a GPU they run on CPU tensors in Triton's interpreter
(TRITON_INTERPRET=1, set by conftest.py): small shapes, every flag combination, explicit configurations.
The interpreter truncates bf16/fp16 casts instead of rounding: low precision allows 1 more ulp."""


import pytest
import torch

import rmsnorm

from helpers import available, check_against_reference, max_err, rand, run_with_grads

pytestmark = pytest.mark.skipif(not available("triton"), reason="triton backend unavailable")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ULPS = 0.0 if DEVICE == "cuda" else 1.0


def check(x, w, b, r, **kw):
    check_against_reference(x, w, b, r, backend="triton", low_atol_ulps=ULPS, **kw)


@pytest.mark.parametrize("n", [1, 2, 7, 127, 1000])
def test_shapes(n, poison):
    for m in (0, 1, 5):
        x, w = rand(m, n, device=DEVICE, seed=n), rand(n, device=DEVICE, seed=n + 1)
        check(x, w, rand(n, device=DEVICE), rand(m, n, device=DEVICE), p=0.25)


def test_strided_rows_and_multi_dim(poison):
    base = rand(6, 100, dtype=torch.bfloat16, device=DEVICE)
    check(base[:, 3:67], rand(64, dtype=torch.bfloat16, device=DEVICE), None,
          rand(6, 90, dtype=torch.bfloat16, device=DEVICE)[:, :64])
    check(rand(3, 4, 6, 5, device=DEVICE), rand(6, 5, device=DEVICE), None, None, p=0.5)


def _explicit(monkeypatch, fwd=None, bwd=None):
    from rmsnorm.backends.triton import launch

    if fwd is not None:
        monkeypatch.setattr(launch, "fwd_config", lambda *a, **k: fwd)
    if bwd is not None:
        monkeypatch.setattr(launch, "bwd_config", lambda *a, **k: bwd)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("flags", [{}, {"p": 0.3, "eps_mode": "outside"}, {"cast": "llama", "offset": 1.0}])
def test_looped_forward_and_tiled_backward(dtype, flags, monkeypatch, poison):
    """The huge-N paths, forced on small rows with small blocks (several loop steps per row)."""
    from rmsnorm.backends.triton.heuristics import BwdConfig, FwdConfig

    _explicit(monkeypatch, FwdConfig(1, 16, 4, False), BwdConfig(1, 16, 4, False, 3))
    x, w = rand(7, 70, dtype=dtype, device=DEVICE), rand(70, dtype=dtype, device=DEVICE)
    check(x, w, rand(70, dtype=dtype, device=DEVICE), rand(7, 70, dtype=dtype, device=DEVICE), **flags)
    check(x, w, None, None, **flags)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("team,chunk,programs", [(1, 128, 0), (2, 64, 0), (4, 32, 6), (8, 16, 0)])
@pytest.mark.parametrize("flags", [{}, {"p": 0.3, "eps_mode": "outside"}, {"cast": "llama", "offset": 1.0}])
def test_split_row_team_kernels(dtype, team, chunk, programs, flags, monkeypatch, poison):
    """Rows shared by teams of programs (each a chunk of the row). Without a GPU the team launches twice
    without its barrier (the interpreter runs programs one after another): every part but the barrier."""
    from rmsnorm.backends.triton.heuristics import BwdConfig, FwdConfig

    _explicit(monkeypatch, FwdConfig(1, chunk, 4, False, team=team, programs=programs * team),
              BwdConfig(1, chunk, 4, False, 0, team=team))
    n = chunk * team - 5 if team > 1 else 100
    x, w = rand(7, n, dtype=dtype, device=DEVICE, scale=2.0), rand(n, dtype=dtype, device=DEVICE)
    check(x, w, rand(n, dtype=dtype, device=DEVICE), rand(7, n, dtype=dtype, device=DEVICE), **flags)
    check(base := rand(7, n + 9, dtype=dtype, device=DEVICE)[:, 4:n + 4], w, None, None, **flags)
    assert base.stride(0) == n + 9


def test_team_config_must_cover_the_row(monkeypatch):
    from rmsnorm.backends.triton.heuristics import FwdConfig

    _explicit(monkeypatch, FwdConfig(1, 16, 4, False, team=2))
    with pytest.raises(ValueError, match="cannot cover"):
        rmsnorm.rms_norm(rand(2, 40, device=DEVICE), backend="triton")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_persistent_looped_forward_with_l2_hints(dtype, monkeypatch, poison):
    from rmsnorm.backends.triton.heuristics import FwdConfig

    _explicit(monkeypatch, FwdConfig(1, 16, 4, False, programs=3, evict=True))
    x, w = rand(7, 70, dtype=dtype, device=DEVICE), rand(70, dtype=dtype, device=DEVICE)
    check(x, w, rand(70, dtype=dtype, device=DEVICE), rand(7, 70, dtype=dtype, device=DEVICE), p=0.3)
    check(x, w, None, None, cast="llama")


def test_tuned_table_entries_map_to_configs(tmp_path):
    import json

    from rmsnorm.backends.triton import heuristics as H

    path = tmp_path / "tuned.json"
    path.write_text(json.dumps({"meta": {"card": "test"}, "fwd": {"2": [
        {"n": 16384, "kind": "default"}, {"n": 65536, "kind": "team", "block_n": 16384, "num_warps": 16},
        {"n": 131072, "kind": "looped", "block_n": 8192, "num_warps": 16, "programs": 40, "evict": True}]},
        "bwd": {"2": [{"n": 16384, "kind": "team", "block_n": 4096, "num_warps": 8}]}}))
    table = H.tuned_table(path)
    assert H.fwd_config(4096, 1024, 2, table=table).single  # below the table: hand-set rules
    assert H.fwd_config(512, 32768, 2, table=table) == H.fwd_config(512, 32768, 2, table={})
    assert H.fwd_config(1024, 100000, 2, table=table) == H.FwdConfig(1, 16384, 16, False, team=8)
    assert H.fwd_config(64, 262144, 2, table=table) == H.FwdConfig(1, 8192, 16, False, programs=40, evict=True)
    assert H.fwd_config(64, 262144, 4, table=table) == H.fwd_config(64, 262144, 4, table={})  # no fp32 entries
    assert H.bwd_config(64, 20000, 132, 2, table=table) == H.BwdConfig(1, 4096, 8, False, 0, team=8)
    assert H.tuned_table(tmp_path / "missing.json") == {}


@pytest.mark.parametrize("block_m,programs,acc", [(1, 1, True), (2, 3, False), (4, 2, True), (8, 5, False)])
def test_explicit_row_tiles_and_persistent_grids(block_m, programs, acc, monkeypatch, poison):
    from rmsnorm.backends.triton.heuristics import BwdConfig, FwdConfig

    _explicit(monkeypatch, FwdConfig(block_m, 64, 4, True), BwdConfig(block_m, 64, 4, True, programs, acc))
    x, w = rand(11, 50, device=DEVICE), rand(50, device=DEVICE)
    check(x, w, rand(50, device=DEVICE), rand(11, 50, device=DEVICE), p=0.5)


def test_weight_gradient_is_deterministic():
    x, w = rand(64, 96, device=DEVICE), rand(96, device=DEVICE)
    g1 = run_with_grads(x, w, None, None, "triton")[1]
    g2 = run_with_grads(x, w, None, None, "triton")[1]
    assert torch.equal(g1[1], g2[1]) and torch.equal(g1[0], g2[0])


def test_heuristics_cover_the_range():
    from rmsnorm.backends.triton.heuristics import LIMITS, bwd_config, fwd_config

    for n in (1, 7, 1024, 4096, 16384, 32768, 65536, 262144):
        f = fwd_config(1 << 27 // n if n > 1 else 4096, n, 2, LIMITS, {})
        assert f.single == (n <= LIMITS.fwd_single_max) and f.block_n >= (n if f.single else 1)
        assert f.block_m * f.block_n <= max(LIMITS.tile_elements, f.block_n) and f.num_warps in (4, 8, 16, 32)
        b = bwd_config(4096, n, 132, 2, LIMITS, {})
        assert b.single == (n <= LIMITS.bwd_single_max) and 1 <= b.programs <= 4096


@pytest.mark.skipif(DEVICE != "cuda", reason="needs CUDA")
def test_large_rows_on_gpu():
    for n in (65537, 262144):
        x, w = rand(4, n, dtype=torch.bfloat16, device="cuda"), rand(n, dtype=torch.bfloat16, device="cuda")
        check(x, w, None, None)


def test_auto_selection_never_picks_the_interpreter():
    from rmsnorm.backends import registry
    from rmsnorm.spec import plain

    if DEVICE == "cpu":
        assert registry.select(None, rand(2, 8), None, plain(torch.float32)).name != "triton"
    else:
        assert registry.select(None, rand(2, 8, device="cuda"), None, plain(torch.float32)).name == "triton"
    x = rand(2, 8, device=DEVICE)
    assert max_err(rmsnorm.rms_norm(x, backend="triton"), rmsnorm.rms_norm(x, backend="reference")) < 1e-5


def _gated_matches_the_reference(x, w, b, z, **kw):
    """The call on the Triton row kernels (GatedFunction) and on the reference: outputs and every gradient
    (bf16 within the interpreter's truncation: a few ulps; dW/db summed over the rows of x)."""
    res = {}
    for backend in ("triton", "reference"):
        leaves = [t.clone().to(DEVICE).requires_grad_(True) if t is not None else None for t in (x, w, b, z)]
        gate = dict(gate=leaves[3]) if z is not None else {}
        y = rmsnorm.rms_norm(leaves[0], leaves[1], leaves[2], backend=backend, eps=1e-5, **gate, **kw)
        dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y.dtype).to(DEVICE)
        res[backend] = (y, torch.autograd.grad(y, [t for t in leaves if t is not None], dy))
    assert type(res["triton"][0].grad_fn).__name__ == "GatedFunctionBackward"
    eps = 1e-6 if x.dtype == torch.float32 else 3 * torch.finfo(x.dtype).eps
    (y, gs), (yr, gr) = res["triton"], res["reference"]
    assert y.dtype == yr.dtype
    assert ((y.float() - yr.float()).abs() <= eps * (1 + yr.float().abs())).all()
    for a, c in zip(gs, gr, strict=True):
        assert a.dtype == c.dtype and max_err(a, c) <= 4 * eps * (1 + c.float().abs().max().item()) * x.shape[0] ** 0.5


@pytest.mark.parametrize("mode", ["before", "after"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("opts", [dict(cast="llama"), dict(gate_act="sigmoid", bias=True, eps_mode="outside"),
                                  dict(offset=1.0, p=0.5)])
def test_gated_rows_match_the_reference(mode, dtype, opts, poison):
    """Gated calls on the Triton row kernels: outputs and every gradient against the decomposition."""
    opts = dict(opts)
    bias = opts.pop("bias", False)
    g = torch.Generator().manual_seed(7)
    x, z = (torch.randn(6, 40, generator=g) * 2).to(dtype), torch.randn(6, 40, generator=g).to(dtype)
    w, b = torch.randn(40, generator=g).to(dtype), (torch.randn(40, generator=g).to(dtype) if bias else None)
    _gated_matches_the_reference(x, w, b, z, gate_mode=mode, **opts)


@pytest.mark.parametrize("mode", ["before", "after", None])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("group,m,n,opts", [(8, 5, 32, dict(cast="llama")), (5, 7, 15, dict(bias=True, offset=1.0)),
                                            (16, 3, 96, dict(gate_act="sigmoid", eps_mode="outside")),
                                            (6, 9, 36, dict(no_gain=True, bias=True))])
def test_grouped_calls_match_the_reference(mode, dtype, group, m, n, opts, poison):
    """Grouped calls (gated or not) on the Triton row kernels, each group a row with its part of the gain:
    outputs and every gradient against the decomposition."""
    opts = dict(opts)
    bias, no_gain = opts.pop("bias", False), opts.pop("no_gain", False)
    g = torch.Generator().manual_seed(group)
    x, z = (torch.randn(m, n, generator=g) * 2).to(dtype), torch.randn(m, n, generator=g).to(dtype)
    w = None if no_gain else torch.randn(n, generator=g).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    gate = dict(gate_mode=mode) if mode else {}
    _gated_matches_the_reference(x, w, b, z if mode else None, group_size=group, **gate, **opts)


def test_grouped_backward_blocks_take_one_group_of_each_position():
    from rmsnorm.backends.triton.heuristics import BwdConfig, grouped_bwd_config

    cfg = BwdConfig(8, 64, 4, True, 10, True)
    assert [grouped_bwd_config(cfg, p).block_m for p in (1, 2, 3, 4, 6, 8, 16, 24)] == [1, 2, 1, 4, 2, 8, 8, 8]
    assert not grouped_bwd_config(cfg, 4).acc_in_regs
