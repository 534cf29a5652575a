from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from unicode_mllm.errors import UserError
from unicode_mllm.runtime.devices import select_device, select_dtype
from unicode_mllm.runtime.seeding import capture_rng_state, restore_rng_state, seed_everything


def draw():
    return random.random(), float(np.random.rand()), float(torch.rand(1))


def test_seed_everything_is_deterministic():
    seed_everything(7)
    a = draw()
    seed_everything(7)
    assert draw() == a
    seed_everything(8)
    assert draw() != a


def test_rng_capture_restore_through_json():
    seed_everything(1)
    draw()
    state = json.loads(json.dumps(capture_rng_state()))
    expected = draw()
    seed_everything(99)
    restore_rng_state(state)
    assert draw() == expected


def test_device_and_dtype_selection():
    assert select_device("cpu").type == "cpu"
    assert select_device("auto").type in {"cpu", "cuda", "mps"}
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="device 'cuda' was requested but CUDA is not available"):
            select_device("cuda")
    with pytest.raises(UserError, match="device 'tpu' is unknown"):
        select_device("tpu")
    cpu = torch.device("cpu")
    assert select_dtype("auto", cpu) == torch.float32
    assert select_dtype("bf16", cpu) == torch.bfloat16
    with pytest.raises(UserError, match="fp16' is not supported on CPU"):
        select_dtype("fp16", cpu)


def test_stage_accelerators_may_change_precision_within_one_process():
    from unicode_mllm.runtime.accelerator import stage_accelerator

    for precision in ("bf16", "no", "bf16"):
        assert stage_accelerator("test", cpu=True, mixed_precision=precision).mixed_precision == precision
    stage_accelerator("test", cpu=True, mixed_precision="no")  # leave the default for later tests


def test_deepspeed_is_refused_in_one_line_where_a_stage_does_not_support_it(monkeypatch):
    from accelerate.utils import DistributedType

    import unicode_mllm.runtime.accelerator as module

    class DeepSpeedAccelerator(module.Accelerator):
        @property
        def distributed_type(self):
            return DistributedType.DEEPSPEED

    monkeypatch.setattr(module, "Accelerator", DeepSpeedAccelerator)
    reason = ": its codebook EMA statistics are all-reduced across whole replicas, so stage 1 runs under DDP"
    with pytest.raises(UserError, match=r"^train-tokenizer: accelerate is set up for DeepSpeed, .*codebook EMA.*DDP"):
        module.stage_accelerator("train-tokenizer", no_fsdp_reason=reason, cpu=True)
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")  # as `accelerate launch` sets it: refused before setup
    with pytest.raises(UserError, match=r"^demo: accelerate is set up for DeepSpeed, .*ddp_bf16\.yaml") as refusal:
        module.stage_accelerator("demo", cpu=True)
    assert "\n" not in str(refusal.value)


def test_fsdp_is_refused_in_one_line_where_a_stage_does_not_support_it(monkeypatch):
    from accelerate.utils import DistributedType

    import unicode_mllm.runtime.accelerator as module

    class FSDPAccelerator(module.Accelerator):
        @property
        def distributed_type(self):
            return DistributedType.FSDP

    monkeypatch.setattr(module, "Accelerator", FSDPAccelerator)
    with pytest.raises(UserError, match=r"^train-tokenizer: accelerate is set up for FSDP, .*codebook EMA.*DDP"):
        module.stage_accelerator("train-tokenizer", no_fsdp_reason=": its codebook EMA statistics are all-reduced, DDP")
    with pytest.raises(UserError, match=r"^demo: accelerate is set up for FSDP, .*ddp_bf16\.yaml"):
        module.stage_accelerator("demo", cpu=True)
    assert module.stage_accelerator("train-mllm", fsdp=True, cpu=True).distributed_type == DistributedType.FSDP


def test_cuda_rng_states_of_another_gpu_count_are_skipped_with_a_warning(monkeypatch, caplog):
    state = capture_rng_state()
    state["cuda"] = [state["torch"], state["torch"]]  # as if saved on two GPUs
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", restored.append)
    with caplog.at_level("WARNING"):
        restore_rng_state(state)
    assert restored == [] and "2 CUDA RNG states, 1 GPUs here" in caplog.text
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    restore_rng_state(state)
    assert len(restored) == 1 and len(restored[0]) == 2


def test_logs_off_a_terminal_are_single_unwrapped_lines(capsys):
    """Rich wraps log lines at 80 columns off a terminal; the plain handler used there keeps one line per record,
    written to the stderr of the moment (here pytest's capture)."""
    import logging

    from unicode_mllm.runtime.progress import _log_handler

    logger = logging.getLogger("unicode_mllm.test_plain_logs")
    logger.propagate = False
    handler = _log_handler(terminal=False)
    logger.addHandler(handler)
    try:
        message = "skipping the rest of broken shard " + "/very/long/path" * 12 + " (ReadError: invalid header)"
        logger.warning(message)
    finally:
        logger.removeHandler(handler)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.rstrip().endswith(message) and "WARNING" in err


def _time_budget_rank(rank: int, init_file: str, out_dir: str) -> None:
    import time

    import torch.distributed as dist

    from unicode_mllm.runtime.time_budget import out_of_time

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        now = time.perf_counter()
        started = now - 120 if rank == 0 else now  # rank 0 is past a 1-minute budget, rank 1 is not
        verdicts = [out_of_time(started, 1.0), out_of_time(now, 1.0), out_of_time(started, None)]
        (Path(out_dir) / f"{rank}.json").write_text(json.dumps(verdicts))
    finally:
        dist.destroy_process_group()


def test_max_minutes_stops_every_rank_at_the_same_step(tmp_path):
    """One rank past train.max_minutes stops both (a rank-local verdict would leave the other in a collective)."""
    import torch.multiprocessing as mp

    mp.spawn(_time_budget_rank, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    verdicts = [json.loads((tmp_path / f"{r}.json").read_text()) for r in range(2)]
    assert verdicts == [[True, False, False], [True, False, False]]
