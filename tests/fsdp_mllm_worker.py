"""Run by tests/test_fsdp.py and tests/test_deepspeed.py under a 2-process CPU launch (gloo): stage 2 as the launch
says (FSDP2 when ACCELERATE_USE_FSDP=true, DeepSpeed ZeRO when ACCELERATE_USE_DEEPSPEED=true, DDP otherwise).

    fsdp_mllm_worker.py CFG_JSON OUT_JSON [--kill-after STEP] [--resume] [--dump-samples]

--kill-after: every rank SIGKILLs itself right after the checkpoint of that step (a kill -9 mid-run).
Rank 0 writes OUT_JSON: the logged losses, the distributed type, and (in out_dir) logits.pt, the
in-memory model's logits on the first eval sample with the inputs that made them. --dump-samples: every rank
saves the samples of each of its steps to out_dir/samples_rank{R}.pt (for the one-process comparison).
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import torch

from unicode_mllm.config import config_from_dict
from unicode_mllm.data.mllm_samples import MODEL_INPUTS
from unicode_mllm.stages.mllm.config import MLLMTrainConfig
from unicode_mllm.stages.mllm.trainer import MLLMTrainer


def main(cfg_path: str, out_path: str, kill_after: int | None, resume: bool, dump_samples: bool = False) -> None:
    cfg = config_from_dict(MLLMTrainConfig, json.loads(Path(cfg_path).read_text()))
    trainer = MLLMTrainer(cfg)
    steps: list = []
    if dump_samples:
        draw = trainer.next_samples

        def recorded():
            steps.append(draw())
            return steps[-1]

        trainer.next_samples = recorded
    if kill_after is not None:
        save = trainer.save_checkpoint

        def save_then_die():
            path = save()
            if trainer.step == kill_after:
                trainer.accelerator.wait_for_everyone()
                os.kill(os.getpid(), signal.SIGKILL)
            return path

        trainer.save_checkpoint = save_then_die
    result = trainer.fit(resume=resume)
    if dump_samples:
        torch.save(steps, Path(cfg.train.out_dir) / f"samples_rank{trainer.accelerator.process_index}.pt")
    batch = trainer.collator([trainer.eval_samples()[0].sample])
    inputs = {k: batch[k] for k in MODEL_INPUTS if k != "labels"}
    trainer.model.eval()
    with torch.no_grad():
        logits = trainer.model(**inputs).logits  # every rank: a collective forward under FSDP
    if trainer.accelerator.is_main_process:
        torch.save({"inputs": inputs, "logits": logits}, Path(cfg.train.out_dir) / "logits.pt")
        rows = [json.loads(line) for line in (Path(cfg.train.out_dir) / "metrics.jsonl").read_text().splitlines()]
        losses = {row["step"]: row["loss"] for row in rows if "loss" in row}
        info = {
            "distributed_type": trainer.accelerator.distributed_type.value,
            "fsdp2": bool(getattr(trainer.accelerator, "is_fsdp2", False)),
            "world_size": trainer.accelerator.num_processes,
            "steps": result.steps,
            "losses": [losses[s] for s in sorted(losses)],
            "final_dir": str(result.final_dir),
        }
        Path(out_path).write_text(json.dumps(info))
    trainer.accelerator.wait_for_everyone()


if __name__ == "__main__":
    args = sys.argv[1:]
    kill = int(args[args.index("--kill-after") + 1]) if "--kill-after" in args else None
    main(args[0], args[1], kill, "--resume" in args, "--dump-samples" in args)
