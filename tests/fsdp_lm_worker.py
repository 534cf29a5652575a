"""Run by tests/test_fsdp.py and tests/test_deepspeed.py under a 2-process CPU launch: stage 0 (train_lm) of
tests/test_lm.py's TINY preset, under FSDP2, DeepSpeed ZeRO or DDP as the launch says.

    fsdp_lm_worker.py OUT_DIR [--kill-after STEP] [--resume]

--kill-after: every rank SIGKILLs itself right after the checkpoint of that step (a kill -9 mid-run).
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import torch.distributed as dist
from accelerate.state import AcceleratorState

from tests.test_lm import TINY
from unicode_mllm.config import load_config
from unicode_mllm.stages.lm import pretrain
from unicode_mllm.stages.lm.config import LMTrainConfig


def main(out_dir: str, kill_after: int | None, resume: bool) -> None:
    if kill_after is not None:
        save = pretrain.LMTrainer.save_checkpoint

        def save_then_die(trainer):
            path = save(trainer)
            if trainer.step == kill_after:
                dist.barrier()  # every rank has taken part in the gather; rank 0 has written the checkpoint
                os.kill(os.getpid(), signal.SIGKILL)
            return path

        pretrain.LMTrainer.save_checkpoint = save_then_die
    cfg = load_config(LMTrainConfig, overrides=TINY)
    pretrain.train_lm(cfg, out_dir, resume=resume)
    state = AcceleratorState()  # the stage's, until another stage starts in this process
    if state.is_main_process:
        (Path(out_dir) / "distributed_type.txt").write_text(state.distributed_type.value)


if __name__ == "__main__":
    args = sys.argv[1:]
    kill = int(args[args.index("--kill-after") + 1]) if "--kill-after" in args else None
    main(args[0], kill, "--resume" in args)
