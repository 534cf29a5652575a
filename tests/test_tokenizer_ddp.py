"""A 2-process CPU (gloo) stage-1 run keeps the codebook identical on both ranks."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_tokenizer_training import tiny_cfg
from unicode_mllm.config import config_to_dict


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("backend", ["native", "library"])
def test_two_process_gloo_run_keeps_codebooks_identical(tiny_lm_dir, tiny_shapes_dir, tmp_path, backend):
    cfg = tiny_cfg(
        tiny_lm_dir,
        tiny_shapes_dir,
        tmp_path / "run",
        **{"codebook.blend.schedule": "interval", "codebook.blend.every": 2, "codebook.backend": backend},
    )
    cfg_path, out_path = tmp_path / "cfg.json", tmp_path / "result.json"
    cfg_path.write_text(json.dumps(config_to_dict(cfg)))
    worker = Path(__file__).with_name("ddp_tokenizer_worker.py")
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MASTER_ADDR": "127.0.0.1",
        "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
    }
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(_free_port()),
        str(worker),
        str(cfg_path),
        str(out_path),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out_path.read_text())
    assert result["world_size"] == 2 and result["sync_codebook"] is True
    assert result["batches_differ"]  # each rank reads its own shard
    assert result["codebook_moved"] > 0  # EMA really updated it
    assert result["codebook_max_diff"] == 0.0
    assert result["weight_max_diff"] == 0.0  # DDP kept the decoder in step too
