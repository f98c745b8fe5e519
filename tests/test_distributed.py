"""rmsnorm.RMSNorm under DDP, FSDP2 and tensor + sequence parallelism (2 gloo processes on CPU): one training
step matches the single-process step (loss and every parameter after the optimizer step)."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp2", "tp"])
def test_two_process_step_matches_single_process(mode, tmp_path):
    out = tmp_path / "result.json"
    port = _port()
    path = str(HERE) + os.pathsep + os.environ.get("PYTHONPATH", "")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={port}", str(HERE / "dist_worker.py"), mode, str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads(out.read_text())
    assert res["loss"] == pytest.approx(res["ref_loss"], rel=1e-5)
    assert res["max_param_err"] < 1e-5, res["errs"]
