"""Fault injection: the three trainers, run through the CLI in subprocesses, are SIGKILLed inside their checkpoint
writer and at seeded random moments, then resumed with --resume until done; their final weights must equal an
uninterrupted run's bit for bit, also when a resume starts from an epoch's last batch. A full disk during a save
stops a run with a one-line error (exit 2), keeps the previous checkpoint, and the run resumes after.

Kills inside the writer are deterministic: the UNICODE_MLLM_CHECKPOINT_FAULT hook of runtime/checkpoint.py makes
the process kill itself (or fail with ENOSPC) at a chosen point of a chosen step's save. The default variant kills
each stage once, in the save that follows an epoch's last batch (at a seeded point of the writer), so the resume
starts from that epoch-end checkpoint; the three stages' subprocesses run side by side. The slow variant adds many
kills per stage, in the writer and at seeded random moments:

    OMP_NUM_THREADS=1 python -m pytest tests/test_fault_injection.py -m slow -s
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.test_checkpoint import LM_EPOCHS, epoch_shapes_dir  # noqa: F401 (a fixture)
from tests.test_mllm_training import make_config
from tests.test_tokenizer_training import tiny_cfg
from unicode_mllm.config import dump_config, load_config
from unicode_mllm.runtime.checkpoint import FAULT_ENV, CheckpointManager

STEPS = 6
ROOT = Path(__file__).resolve().parents[1]
RUN_TIMEOUT_S = 300


@dataclass
class Stage:
    name: str
    command: str
    model_file: str  # the trained weights in the final model, relative to the run folder
    epoch_end: int  # the step that takes an epoch's last batch (tests/test_checkpoint.py's data)


STAGES = {
    "lm": Stage("lm", "train-lm", "model/model.safetensors", 4),
    "tokenizer": Stage("tokenizer", "train-tokenizer", "final/model.safetensors", 2),
    "mllm": Stage("mllm", "train-mllm", "final/lm/model.safetensors", 4),
}


def stage_config(name: str, dirs: dict[str, Path]):
    """The stage's tiny config: STEPS steps, a checkpoint after every one, epochs of 2-4 steps."""
    if name == "lm":
        from unicode_mllm.stages.lm import LMTrainConfig

        return load_config(LMTrainConfig, overrides=[*LM_EPOCHS, f"train.steps={STEPS}"])
    if name == "tokenizer":
        settings = {"train.steps": STEPS, "train.ckpt_every": 1, "codebook.blend.ramp_steps": 2}
        return tiny_cfg(dirs["lm"], dirs["shapes"], "unused", **settings)
    return make_config(dirs["lm"], dirs["vt"], dirs["shapes"], "unused", train={"steps": STEPS, "ckpt_every": 1})


def train_in_process(name: str, cfg, out: Path) -> None:
    """The uninterrupted reference run (the same code as the CLI's, without a process start)."""
    if name == "lm":
        from unicode_mllm.stages.lm import train_lm

        train_lm(cfg, out)
    elif name == "tokenizer":
        from unicode_mllm.stages.tokenizer.trainer import train_tokenizer

        train_tokenizer(cfg, out)
    else:
        from unicode_mllm.stages.mllm import train_mllm

        train_mllm(cfg, out)


@dataclass
class Attempt:
    resume: bool
    fault: str  # the FAULT_ENV value, or "kill after N s", or ""
    returncode: int
    stderr: str
    leftovers: list[str]  # temporary entries in checkpoints/ after the attempt


@dataclass
class Chain:
    """One stage's runs into one folder, killed and resumed until it finished."""

    stage: Stage
    config: Path
    out: Path
    attempts: list[Attempt] = field(default_factory=list)

    def run(self, fault: str = "", kill_after: float | None = None) -> Attempt:
        resume = CheckpointManager(self.out / "checkpoints").exists()
        command = [sys.executable, "-m", "unicode_mllm.cli", self.stage.command, "--config", str(self.config)]
        command += ["--out", str(self.out), *(["--resume"] if resume else [])]
        # The same intra-op threads as the in-process reference run: the same float sums, bit for bit.
        env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), FAULT_ENV: fault}
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            _, stderr = proc.communicate(timeout=kill_after if kill_after is not None else RUN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            if kill_after is None:
                raise
            proc.send_signal(signal.SIGKILL)
            _, stderr = proc.communicate()
            fault = f"kill after {kill_after:.1f} s"
        leftovers = sorted(p.name for p in (self.out / "checkpoints").glob(".*.tmp"))
        attempt = Attempt(resume, fault, proc.returncode, stderr, leftovers)
        self.attempts.append(attempt)
        return attempt

    @property
    def kills(self) -> int:
        return sum(a.returncode == -signal.SIGKILL for a in self.attempts)

    @property
    def resumes(self) -> int:
        return sum(a.resume for a in self.attempts)

    def latest_step(self) -> int:
        latest = CheckpointManager(self.out / "checkpoints").latest()
        return int(latest.name.removeprefix("step-")) if latest is not None else 0


def same_weights(a: Path, b: Path) -> bool:
    x, y = load_file(str(a)), load_file(str(b))
    return x.keys() == y.keys() and all(x[k].dtype == y[k].dtype and torch.equal(x[k], y[k]) for k in x)


def temp_entries(out: Path) -> list[str]:
    return sorted(p.name for folder in (out, out / "checkpoints") for p in folder.glob(".*.tmp"))


def summary(chain: Chain, identical: bool) -> str:
    writer = sum(a.returncode == -signal.SIGKILL and a.fault.startswith("kill@") for a in chain.attempts)
    return (
        f"fault injection, {chain.stage.name}: {len(chain.attempts)} runs, {chain.kills} SIGKILLs ({writer} inside "
        f"the checkpoint writer), {chain.resumes} resumes, final weights {'bit-identical' if identical else 'DIFFER'}"
    )


@pytest.fixture(scope="module")
def dirs(tiny_lm_dir, tiny_visual_tokenizer_dir, epoch_shapes_dir):  # noqa: F811 (the imported fixture)
    return {"lm": tiny_lm_dir, "vt": tiny_visual_tokenizer_dir, "shapes": epoch_shapes_dir}


def default_chain(chain: Chain) -> Chain:
    """Killed (at a seeded point of the writer) while saving the step after an epoch's last batch, so the resume
    starts at that epoch end; stage 2 then fills the disk at the next save; resumed until done."""
    after_epoch = chain.stage.epoch_end + 1
    point = random.Random(f"fault-{chain.stage.name}").choice(["write", "rename", "pointer"])
    chain.run(f"kill@{point}:{after_epoch}")
    if chain.stage.name == "mllm":
        chain.run(f"enospc@write:{after_epoch + 1}")
    chain.run()
    return chain


@pytest.fixture(scope="module")
def default_chains(dirs, tmp_path_factory):
    """Every stage's default chain (subprocesses side by side) and its uninterrupted reference (in process)."""
    root = tmp_path_factory.mktemp("faults")
    chains = {}
    for name, stage in STAGES.items():
        config = root / f"{name}.yaml"
        config.write_text(dump_config(stage_config(name, dirs)))
        chains[name] = Chain(stage, config, root / name)
    with ThreadPoolExecutor(max_workers=len(chains)) as pool:
        futures = {name: pool.submit(default_chain, chain) for name, chain in chains.items()}
        for name in STAGES:
            train_in_process(name, stage_config(name, dirs), root / f"{name}-reference")
        for future in futures.values():
            future.result()
    return chains, root


@pytest.mark.parametrize("name", list(STAGES))
def test_a_run_killed_after_an_epoch_end_resumes_to_the_same_weights(default_chains, name):
    chains, root = default_chains
    chain = chains[name]
    killed, *_, finished = chain.attempts
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    if "@pointer:" not in killed.fault:  # killed before its folder was renamed into place: a temp folder is left
        assert any(n.startswith(f".step-{chain.stage.epoch_end + 1:08d}.") for n in killed.leftovers), killed
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert all(a.resume for a in chain.attempts[1:])
    # The first resume starts from the checkpoint of the epoch's last batch.
    assert f"step-{chain.stage.epoch_end:08d}" in chain.attempts[1].stderr
    assert temp_entries(chain.out) == []  # the next run removed what the killed writer left
    identical = same_weights(chain.out / chain.stage.model_file, root / f"{name}-reference" / chain.stage.model_file)
    print(summary(chain, identical))
    assert identical


def test_a_full_disk_stops_the_run_with_one_line_and_it_resumes_after(default_chains):
    chains, _ = default_chains
    chain = chains["mllm"]
    full = chain.attempts[1]
    step = chain.stage.epoch_end + 2
    assert full.returncode == 2, full.stderr[-2000:]
    lines = [line for line in full.stderr.splitlines() if line.startswith("error:")]
    assert lines == [full.stderr.strip().splitlines()[-1]] and "Traceback" not in full.stderr
    assert lines[0].startswith(f"error: could not write checkpoint {chain.out / 'checkpoints' / f'step-{step:08d}'}")
    assert "(No space left on device)" in lines[0] and "rerun with --resume" in lines[0]
    assert full.leftovers == []  # the failed save removed its temp folder
    assert f"resumed from {chain.out / 'checkpoints' / f'step-{step - 1:08d}'}" in chain.attempts[2].stderr
    assert chain.attempts[2].returncode == 0


@pytest.mark.slow
@pytest.mark.parametrize("name", list(STAGES))
def test_many_kills_at_random_moments_resume_to_the_same_weights(dirs, tmp_path, name):
    """KILLS SIGKILLs per stage, about half inside the checkpoint writer (a random later step and point of the
    save), the others after a random time (seeded), each run followed by --resume until one finishes; a run
    that finishes before its kill ends its round, and the next round starts afresh in a new folder."""
    kills = 10
    stage = STAGES[name]
    config = tmp_path / f"{name}.yaml"
    config.write_text(dump_config(stage_config(name, dirs)))
    reference = Chain(stage, config, tmp_path / "reference")
    started = time.perf_counter()
    assert reference.run().returncode == 0
    duration = time.perf_counter() - started
    rng = random.Random(f"many-kills-{name}")
    rounds: list[tuple[Chain, bool]] = []
    while sum(chain.kills for chain, _ in rounds) < kills:
        chain = Chain(stage, config, tmp_path / f"round-{len(rounds)}")
        while True:
            if sum(c.kills for c, _ in rounds) + chain.kills >= kills:
                attempt = chain.run()
            elif rng.random() < 0.5 and chain.latest_step() < STEPS:
                step = rng.randint(chain.latest_step() + 1, STEPS)
                attempt = chain.run(f"kill@{rng.choice(['write', 'rename', 'pointer', 'saved'])}:{step}")
            else:
                attempt = chain.run(kill_after=rng.uniform(0.4, 1.05) * duration)
            if attempt.returncode == 0:
                break
            assert attempt.returncode == -signal.SIGKILL, attempt.stderr[-2000:]
            assert len(chain.attempts) < 4 * kills, "the run never finished"
        assert temp_entries(chain.out) == []
        rounds.append((chain, same_weights(chain.out / stage.model_file, reference.out / stage.model_file)))
        print(summary(chain, rounds[-1][1]))
    total = [a for chain, _ in rounds for a in chain.attempts]
    writer = sum(a.returncode == -signal.SIGKILL and a.fault.startswith("kill@") for a in total)
    print(
        f"fault injection, {name}, {len(rounds)} rounds: {len(total)} runs, {sum(c.kills for c, _ in rounds)} "
        f"SIGKILLs ({writer} inside the checkpoint writer), {sum(c.resumes for c, _ in rounds)} resumes, "
        f"{sum(same for _, same in rounds)} of {len(rounds)} final models bit-identical"
    )
    assert all(same for _, same in rounds)
