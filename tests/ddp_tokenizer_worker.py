"""Run by tests/test_tokenizer_ddp.py under torch.distributed.run (2 CPU processes, gloo)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from unicode_mllm.config import config_from_dict
from unicode_mllm.stages.tokenizer.config import TokenizerTrainConfig
from unicode_mllm.stages.tokenizer.trainer import TokenizerTrainer


def codebook_syncs(rvq: torch.nn.Module) -> bool:
    """Whether the EMA statistics are all-reduced: the native backend's flag, or the library's all-reduce function."""
    if hasattr(rvq, "sync_codebook"):
        return bool(rvq.sync_codebook)
    return rvq.layers[0]._codebook.all_reduce_fn.__name__ != "noop"


def main(cfg_path: str, out_path: str) -> None:
    cfg = config_from_dict(TokenizerTrainConfig, json.loads(Path(cfg_path).read_text()))
    trainer = TokenizerTrainer(cfg)
    first_keys = []
    for _ in range(3):
        batch = trainer.next_batch()
        first_keys.append(float(batch.sum()))
        trainer.train_step(batch)
    codebook = trainer.tokenizer.quantizer.codebook.contiguous()
    gathered = [torch.zeros_like(codebook) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, codebook)
    weight = trainer.tokenizer.decoder.last_layer_weight.detach().contiguous()
    weights = [torch.zeros_like(weight) for _ in range(dist.get_world_size())]
    dist.all_gather(weights, weight)
    batch_sums = [None] * dist.get_world_size()
    dist.all_gather_object(batch_sums, first_keys)
    if dist.get_rank() == 0:
        result = {
            "world_size": dist.get_world_size(),
            "codebook_max_diff": float((gathered[0] - gathered[1]).abs().max()),
            "weight_max_diff": float((weights[0] - weights[1]).abs().max()),
            "codebook_moved": trainer.relative_distance(),
            "batches_differ": batch_sums[0] != batch_sums[1],
            "sync_codebook": codebook_syncs(trainer.tokenizer.quantizer.rvq),
        }
        with open(out_path, "w") as f:
            json.dump(result, f)
    dist.barrier()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
