"""Stages 2 and 0 under DeepSpeed ZeRO-2 and ZeRO-3 (launched with configs/accelerate/deepspeed_zero{2,3}_cpu.yaml,
as users launch the GPU configs) in 2 CPU processes (gloo, fp32), through the FSDP tests' workers, which train as
the launch says.

What is compared: one process training on the union of both ranks' samples of each step gives the ZeRO run's losses
and weights within float tolerance (DeepSpeed averages the ranks' gradients as DDP does, the trainer marks the last
pass of a step, and the engine clips at optim.grad_clip); a ZeRO run killed (kill -9 on every rank right after a
checkpoint) and resumed equals the uninterrupted one bit for bit (full fp32 weights plus each rank's own optimizer
partitions); the exported model gives the in-memory engine's logits. Skipped only where deepspeed cannot be
imported (pip install 'unicode-mllm[deepspeed]')."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.test_fsdp import _free_port, assert_export_gives_logits, assert_one_process_matches, final_weights
from tests.test_mllm_training import make_config
from unicode_mllm.config import config_to_dict

pytest.importorskip("deepspeed", reason="deepspeed is not installed (pip install 'unicode-mllm[deepspeed]')")

ROOT = Path(__file__).resolve().parents[1]


def launch_worker(worker: str, args: list[str], zero: int) -> tuple[int, str]:
    """Run tests/WORKER in 2 CPU processes through `accelerate launch` with the ZeRO-`zero` CPU config; returns
    (exit status, the ranks' error lines)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "FSDP_"))}
    env.update(OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", PYTHONPATH=str(ROOT))
    config = ROOT / "configs" / "accelerate" / f"deepspeed_zero{zero}_cpu.yaml"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config)]
    cmd += ["--main_process_port", str(_free_port()), str(Path(__file__).with_name(worker)), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    ranks = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("[rank")]
    return proc.returncode, "\n".join(ranks[-40:]) or proc.stderr[-4000:]


def launch(cfg, tmp_path: Path, name: str, zero: int, extra: tuple[str, ...] = ()) -> tuple[int, dict, str]:
    """Stage 2 (tests/fsdp_mllm_worker.py) with `cfg`; returns (exit status, the worker's result, errors)."""
    cfg_path, out_path = tmp_path / f"{name}.json", tmp_path / f"{name}.result.json"
    cfg_path.write_text(json.dumps(config_to_dict(cfg)))
    rc, err = launch_worker("fsdp_mllm_worker.py", [str(cfg_path), str(out_path), *extra], zero)
    result = json.loads(out_path.read_text()) if out_path.exists() else {}
    return rc, result, err


def stage2_config(dirs, tmp_path: Path, run: str):
    lm, vt, shapes = dirs
    # Two sample groups a step: the trainer's own accumulation (only the last pass steps the engine); a clip that bites.
    optim = {"grad_clip": 0.5, "grad_accum": 2}
    return make_config(lm, vt, shapes, tmp_path / run, train={"steps": 4, "ckpt_every": 2}, optim=optim)


@pytest.fixture
def dirs(tiny_lm_dir, tiny_visual_tokenizer_dir, tiny_shapes_dir):
    return tiny_lm_dir, tiny_visual_tokenizer_dir, tiny_shapes_dir


def test_zero3_matches_one_process_resumes_after_kill_and_exports(dirs, tmp_path):
    rc, whole, err = launch(stage2_config(dirs, tmp_path, "whole"), tmp_path, "whole", 3, ("--dump-samples",))
    assert rc == 0, err
    assert whole["distributed_type"] == "DEEPSPEED" and whole["world_size"] == 2
    assert len(whole["losses"]) == 4
    # One process on both ranks' samples (its clipping and AdamW in torch): the engine's losses and weights.
    assert_one_process_matches(
        stage2_config(dirs, tmp_path, "single"), tmp_path / "whole", whole["losses"], Path(whole["final_dir"])
    )
    assert_export_gives_logits(tmp_path / "whole", whole["final_dir"])
    step2 = tmp_path / "whole" / "checkpoints" / "step-00000002"
    assert sorted(p.name for p in step2.glob("*.safetensors")) == [
        "optimizer.rank00000.safetensors",
        "optimizer.rank00001.safetensors",
        "trainable.safetensors",
    ]

    rc, _, err = launch(stage2_config(dirs, tmp_path, "killed"), tmp_path, "killed", 3, ("--kill-after", "2"))
    assert rc != 0
    assert (tmp_path / "killed" / "checkpoints" / "step-00000002").is_dir(), err
    rc, resumed, err = launch(stage2_config(dirs, tmp_path, "killed"), tmp_path, "resumed", 3, ("--resume",))
    assert rc == 0, err
    assert resumed["losses"] == whole["losses"]  # steps 3-4 after the resume: the same as uninterrupted
    a, b = final_weights(whole), final_weights(resumed)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key  # bit-identical


def test_zero2_matches_one_process_and_exports(dirs, tmp_path):
    rc, run, err = launch(stage2_config(dirs, tmp_path, "run"), tmp_path, "run", 2, ("--dump-samples",))
    assert rc == 0, err
    assert run["distributed_type"] == "DEEPSPEED" and run["world_size"] == 2
    assert_one_process_matches(
        stage2_config(dirs, tmp_path, "single"), tmp_path / "run", run["losses"], Path(run["final_dir"])
    )
    assert_export_gives_logits(tmp_path / "run", run["final_dir"])


# ----- stage 0 ---------------------------------------------------------------------------------------


def lm_log(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines()]


def lm_weights(out_dir: Path) -> dict[str, torch.Tensor]:
    return {k: v for p in sorted((out_dir / "model").glob("*.safetensors")) for k, v in load_file(p).items()}


def test_stage0_under_zero2_matches_one_process_and_resumes_after_kill_bit_identically(tmp_path):
    """Stage 0 (a whole LlamaForCausalLM trains) under ZeRO-2: the losses and weights of one process on the
    same global batches; a kill -9 right after step 2's checkpoint resumes to the same weights bit for bit."""
    from transformers import AutoModelForCausalLM

    from tests.test_lm import TINY
    from unicode_mllm.config import load_config
    from unicode_mllm.stages.lm.config import LMTrainConfig
    from unicode_mllm.stages.lm.pretrain import train_lm

    rc, err = launch_worker("fsdp_lm_worker.py", [str(tmp_path / "zero")], 2)
    assert rc == 0, err
    assert (tmp_path / "zero" / "distributed_type.txt").read_text() == "DEEPSPEED"
    train_lm(load_config(LMTrainConfig, overrides=[*TINY, "train.batch_size=4"]), tmp_path / "one")  # both ranks'
    a, b = lm_log(tmp_path / "zero"), lm_log(tmp_path / "one")
    assert [r["step"] for r in a] == [1, 2, 3, 4]
    for x, y in zip(a, b, strict=True):
        assert x["train/loss"] == pytest.approx(y["train/loss"], rel=1e-5), x["step"]
    wa, wb = lm_weights(tmp_path / "zero"), lm_weights(tmp_path / "one")
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=1e-4, atol=1e-5, msg=key)
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "zero" / "model") is not None  # the export loads

    rc, err = launch_worker("fsdp_lm_worker.py", [str(tmp_path / "killed"), "--kill-after", "2"], 2)
    assert rc != 0 and (tmp_path / "killed" / "checkpoints" / "step-00000002").is_dir(), err
    rc, err = launch_worker("fsdp_lm_worker.py", [str(tmp_path / "killed"), "--resume"], 2)
    assert rc == 0, err
    assert [r["train/loss"] for r in lm_log(tmp_path / "killed")] == [r["train/loss"] for r in a]
    wc = lm_weights(tmp_path / "killed")
    assert all(torch.equal(wa[k], wc[k]) for k in wa)


@pytest.mark.parametrize("zero", [pytest.param(2, marks=pytest.mark.slow), 3])  # ZeRO-3 also partitions the base
def test_lora_under_zero_exports_the_merged_model(dirs, tmp_path, zero):
    """LoRA (adapters and the embedding table train, the base is frozen and, under ZeRO-3, partitioned too): the
    adapters are saved apart and the merged export gives the unmerged in-memory engine's logits."""
    lm, vt, shapes = dirs
    lora = {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0}
    cfg = make_config(lm, vt, shapes, tmp_path / "lora", model={"lora": lora}, train={"steps": 2, "ckpt_every": 1})
    rc, result, err = launch(cfg, tmp_path, "lora", zero)
    assert rc == 0, err
    assert result["distributed_type"] == "DEEPSPEED"
    assert (tmp_path / "lora" / "final_lora" / "adapter_config.json").is_file()
    assert_export_gives_logits(tmp_path / "lora", result["final_dir"])
