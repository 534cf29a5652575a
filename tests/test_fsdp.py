"""Stages 2 and 0 under FSDP2 (accelerate's plugin, launched with configs/accelerate/fsdp2_cpu.yaml) in 2 CPU
processes (gloo): the losses and weights of a DDP run of the same ranks, a kill -9 that resumes to the same weights
bit for bit, and an exported model that gives the in-memory model's logits.

What is compared: each rank reads half the records; the loss of a step is normalised over the labelled tokens of
every rank's samples (`MLLMTrainer.loss_scales` all-reduces the counts), so one process training on the union of
the two ranks' samples of each step gives the same losses and weights within float tolerance; FSDP vs DDP agree
likewise (reduce-scatter and all-reduce add in different orders); an FSDP run stopped and resumed equals the
uninterrupted one exactly (same reductions, same data position and RNG)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.test_mllm_training import make_config
from unicode_mllm.config import config_to_dict

ROOT = Path(__file__).resolve().parents[1]
FSDP2_CPU = ROOT / "configs" / "accelerate" / "fsdp2_cpu.yaml"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_worker(worker: str, args: list[str], *, fsdp: bool) -> tuple[int, str]:
    """Run tests/WORKER in 2 CPU processes: FSDP2 through `accelerate launch` with the CPU config file, as users
    launch it, or plain DDP through torch.distributed.run; returns (exit status, the ranks' error lines)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "FSDP_"))}
    env.update(OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", PYTHONPATH=str(ROOT))
    port = str(_free_port())
    if fsdp:  # distributed_type: FSDP, fsdp_version: 2, use_cpu: true
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(FSDP2_CPU)]
        cmd += ["--main_process_port", port]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port]
    script = str(Path(__file__).with_name(worker))
    proc = subprocess.run([*cmd, script, *args], capture_output=True, text=True, env=env, timeout=300)
    ranks = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("[rank")]
    return proc.returncode, "\n".join(ranks[-40:]) or proc.stderr[-4000:]


def launch(cfg, tmp_path: Path, name: str, *, fsdp: bool, extra: tuple[str, ...] = ()) -> tuple[int, dict, str]:
    """Stage 2 (tests/fsdp_mllm_worker.py) with `cfg`; returns (exit status, the worker's result, errors)."""
    cfg_path, out_path = tmp_path / f"{name}.json", tmp_path / f"{name}.result.json"
    cfg_path.write_text(json.dumps(config_to_dict(cfg)))
    rc, err = launch_worker("fsdp_mllm_worker.py", [str(cfg_path), str(out_path), *extra], fsdp=fsdp)
    result = json.loads(out_path.read_text()) if out_path.exists() else {}
    return rc, result, err


def final_weights(result: dict) -> dict[str, torch.Tensor]:
    folder = Path(result["final_dir"])
    return {f"{p.name}/{k}": v for p in sorted(folder.rglob("*.safetensors")) for k, v in load_file(p).items()}


def test_fsdp2_matches_ddp_resumes_after_kill_and_exports(
    tiny_lm_dir, tiny_visual_tokenizer_dir, tiny_shapes_dir, tmp_path
):
    def cfg(run: str):
        return make_config(
            tiny_lm_dir, tiny_visual_tokenizer_dir, tiny_shapes_dir, tmp_path / run, train={"steps": 4, "ckpt_every": 2}
        )

    rc, fsdp, err = launch(cfg("fsdp"), tmp_path, "fsdp", fsdp=True, extra=("--dump-samples",))
    assert rc == 0, err
    assert fsdp["distributed_type"] == "FSDP" and fsdp["fsdp2"] and fsdp["world_size"] == 2
    assert_one_process_matches(cfg("single"), tmp_path / "fsdp", fsdp["losses"], Path(fsdp["final_dir"]))
    rc, ddp, err = launch(cfg("ddp"), tmp_path, "ddp", fsdp=False)
    assert rc == 0, err
    assert ddp["distributed_type"] == "MULTI_CPU"
    # Same ranks, same records per rank, same loss normalisation: FSDP's reduce-scatter equals DDP's all-reduce
    # up to the order of float additions.
    assert len(fsdp["losses"]) == 4
    torch.testing.assert_close(torch.tensor(fsdp["losses"]), torch.tensor(ddp["losses"]), rtol=1e-5, atol=1e-6)
    a, b = final_weights(fsdp), final_weights(ddp)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=key)

    # kill -9 on every rank right after step 2's checkpoint, then --resume: the weights of the uninterrupted run
    rc, _, err = launch(cfg("killed"), tmp_path, "killed", fsdp=True, extra=("--kill-after", "2"))
    assert rc != 0
    assert (tmp_path / "killed" / "checkpoints").exists(), err
    rc, resumed, err = launch(cfg("killed"), tmp_path, "resumed", fsdp=True, extra=("--resume",))
    assert rc == 0, err
    assert resumed["losses"] == fsdp["losses"]  # the metrics of steps 1-2 kept, 3-4 the same as uninterrupted
    c = final_weights(resumed)
    for key in a:
        assert torch.equal(a[key], c[key]), key  # bit-identical

    assert_export_gives_logits(tmp_path / "fsdp", fsdp["final_dir"])


def assert_one_process_matches(cfg, run_dir: Path, losses: list[float], final_dir: Path) -> None:
    """One process trained on the union of both ranks' samples of every step: the 2-process losses and weights."""
    from unicode_mllm.stages.mllm.trainer import MLLMTrainer

    ranks = [torch.load(run_dir / f"samples_rank{r}.pt", weights_only=False) for r in range(2)]
    steps = iter([a + b for a, b in zip(*ranks, strict=True)])
    single = MLLMTrainer(cfg)
    single.next_samples = lambda: next(steps)
    one = [single.train_step()["loss"] for _ in range(len(losses))]
    torch.testing.assert_close(torch.tensor(one), torch.tensor(losses), rtol=1e-5, atol=1e-6)
    trained = {n.removeprefix("lm."): p for n, p in single.mllm.named_parameters() if p.requires_grad}
    saved = {k: v for p in sorted((final_dir / "lm").glob("*.safetensors")) for k, v in load_file(p).items()}
    compared = [k for k in saved if k in trained]
    assert compared, (sorted(saved)[:3], sorted(trained)[:3])
    for key in compared:
        torch.testing.assert_close(trained[key], saved[key], rtol=1e-4, atol=1e-5, msg=key)


def assert_export_gives_logits(run_dir: Path, final_dir: str) -> None:
    """The exported model (UniCodeMLLM.from_pretrained) gives the in-memory FSDP model's logits."""
    from unicode_mllm.model.mllm import UniCodeMLLM

    saved = torch.load(run_dir / "logits.pt")
    model = UniCodeMLLM.from_pretrained(final_dir).eval()
    with torch.no_grad():
        logits = model(**saved["inputs"]).logits
    torch.testing.assert_close(logits, saved["logits"], rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_fsdp2_lora_exports_the_merged_model(tiny_lm_dir, tiny_visual_tokenizer_dir, tiny_shapes_dir, tmp_path):
    """LoRA under FSDP2 (adapters and embeddings trainable next to a frozen base in the same FSDP units): the
    adapters are saved apart and the merged export gives the unmerged in-memory model's logits."""
    lora = {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0}
    cfg = make_config(tiny_lm_dir, tiny_visual_tokenizer_dir, tiny_shapes_dir, tmp_path / "lora", model={"lora": lora})
    rc, result, err = launch(cfg, tmp_path, "lora", fsdp=True)
    assert rc == 0, err
    assert result["distributed_type"] == "FSDP" and result["fsdp2"]
    assert (tmp_path / "lora" / "final_lora" / "adapter_config.json").is_file()
    assert_export_gives_logits(tmp_path / "lora", result["final_dir"])


@pytest.mark.slow
def test_an_fsdp_checkpoint_resumes_under_ddp(tiny_lm_dir, tiny_visual_tokenizer_dir, tiny_shapes_dir, tmp_path):
    """FSDP's checkpoints hold the full tensors in the layout DDP writes: a run stopped under FSDP continues under
    DDP to the weights of an uninterrupted FSDP run (within float tolerance: the gradient reductions differ)."""

    def cfg(steps: int):
        return make_config(
            tiny_lm_dir,
            tiny_visual_tokenizer_dir,
            tiny_shapes_dir,
            tmp_path / "run",
            train={"steps": steps, "ckpt_every": 2},
        )

    rc, whole, err = launch(cfg(4), tmp_path, "whole", fsdp=True)
    assert rc == 0, err
    whole_weights = final_weights(whole)
    (tmp_path / "run").rename(tmp_path / "whole_run")
    rc, _, err = launch(cfg(4), tmp_path, "first", fsdp=True, extra=("--kill-after", "2"))
    assert rc != 0 and (tmp_path / "run" / "checkpoints").exists(), err
    rc, resumed, err = launch(cfg(4), tmp_path, "second", fsdp=False, extra=("--resume",))
    assert rc == 0, err
    assert resumed["distributed_type"] == "MULTI_CPU"
    torch.testing.assert_close(torch.tensor(resumed["losses"]), torch.tensor(whole["losses"]), rtol=1e-5, atol=1e-6)
    weights = final_weights(resumed)
    for key in whole_weights:
        torch.testing.assert_close(weights[key], whole_weights[key], rtol=1e-4, atol=1e-5, msg=key)


# ----- stage 0 ---------------------------------------------------------------------------------------


def lm_log(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines()]


def lm_weights(out_dir: Path) -> dict[str, torch.Tensor]:
    return {k: v for p in sorted((out_dir / "model").glob("*.safetensors")) for k, v in load_file(p).items()}


def test_stage0_under_fsdp2_matches_ddp(tmp_path):
    """Stage 0 (a whole LlamaForCausalLM trains): FSDP2 gives DDP's losses and weights; the export loads."""
    rc, err = launch_worker("fsdp_lm_worker.py", [str(tmp_path / "fsdp")], fsdp=True)
    assert rc == 0, err
    rc, err = launch_worker("fsdp_lm_worker.py", [str(tmp_path / "ddp")], fsdp=False)
    assert rc == 0, err
    assert (tmp_path / "fsdp" / "distributed_type.txt").read_text() == "FSDP"
    assert (tmp_path / "ddp" / "distributed_type.txt").read_text() == "MULTI_CPU"
    a, b = lm_log(tmp_path / "fsdp"), lm_log(tmp_path / "ddp")
    assert [r["step"] for r in a] == [1, 2, 3, 4]
    for x, y in zip(a, b, strict=True):
        assert x["train/loss"] == pytest.approx(y["train/loss"], rel=1e-5), x["step"]
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(tmp_path / "fsdp" / "model") is not None  # the export loads
    wa, wb = lm_weights(tmp_path / "fsdp"), lm_weights(tmp_path / "ddp")
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=1e-4, atol=1e-5, msg=key)


@pytest.mark.slow
def test_stage0_under_fsdp2_resumes_after_kill_bit_identically(tmp_path):
    """A kill -9 right after step 2's checkpoint resumes to the uninterrupted FSDP run's weights bit for bit."""
    rc, err = launch_worker("fsdp_lm_worker.py", [str(tmp_path / "whole")], fsdp=True)
    assert rc == 0, err
    rc, err = launch_worker("fsdp_lm_worker.py", [str(tmp_path / "killed"), "--kill-after", "2"], fsdp=True)
    assert rc != 0 and (tmp_path / "killed" / "checkpoints").exists(), err
    rc, err = launch_worker("fsdp_lm_worker.py", [str(tmp_path / "killed"), "--resume"], fsdp=True)
    assert rc == 0, err
    assert [r["train/loss"] for r in lm_log(tmp_path / "killed")] == [
        r["train/loss"] for r in lm_log(tmp_path / "whole")
    ]
    wa, wc = lm_weights(tmp_path / "whole"), lm_weights(tmp_path / "killed")
    assert all(torch.equal(wa[k], wc[k]) for k in wa)
