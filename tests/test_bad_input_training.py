"""Bad input to the three training stages: existing runs, lost or damaged checkpoints, missing splits,
corrupt training images, Ctrl-C. Each test fails on the code before the fix (audit rows 1-5, 18, 23-25)."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import shutil
import signal
import tarfile

import pytest
import torch

from tests.test_lm import TINY
from tests.test_mllm_training import make_config
from tests.test_tokenizer_training import tiny_cfg
from unicode_mllm.config import load_config
from unicode_mllm.data.batches import EpochBatches
from unicode_mllm.data.stream import StreamingDataset
from unicode_mllm.errors import UserError
from unicode_mllm.runtime.checkpoint import CheckpointManager
from unicode_mllm.stages.lm import LMTrainConfig, train_lm
from unicode_mllm.stages.mllm import MLLMTrainer, train_mllm
from unicode_mllm.stages.tokenizer.trainer import TokenizerTrainer, train_tokenizer


def _save(mgr: CheckpointManager, step: int) -> None:
    mgr.save(step, {"model": {"w": torch.full((2,), float(step))}}, {"note": step})


def _fake_run(out_dir, final: bool = False):
    """An out_dir that holds one checkpoint (and a final model): enough for the checks that run before loading."""
    _save(CheckpointManager(out_dir / "checkpoints"), 3)
    if final:
        (out_dir / "final").mkdir()


@pytest.fixture
def mllm_cfg(tiny_lm_dir, tiny_visual_tokenizer_dir, tiny_shapes_dir):
    def build(out_dir, shapes_dir=tiny_shapes_dir, **sections):
        return make_config(tiny_lm_dir, tiny_visual_tokenizer_dir, shapes_dir, out_dir, **sections)

    return build


# ----- row 1: a fresh run never overwrites another --------------------------------------------------


def test_every_stage_refuses_to_overwrite_a_run_without_resume(mllm_cfg, tiny_lm_dir, tiny_shapes_dir, tmp_path):
    _fake_run(tmp_path / "mm")
    with pytest.raises(UserError, match=r"mm already holds checkpoints \(newest step-00000003\); pass --resume"):
        train_mllm(mllm_cfg(tmp_path / "mm"))
    _fake_run(tmp_path / "tk")
    with pytest.raises(UserError, match=r"tk already holds checkpoints .*or train into another --out"):
        train_tokenizer(tiny_cfg(tiny_lm_dir, tiny_shapes_dir, tmp_path / "tk"))
    (tmp_path / "done" / "final").mkdir(parents=True)  # checkpoints deleted, the model kept
    with pytest.raises(UserError, match=r"done already holds a finished model in final/"):
        train_mllm(mllm_cfg(tmp_path / "done"))
    (tmp_path / "lm" / "model").mkdir(parents=True)
    with pytest.raises(UserError, match=r"lm already holds a finished model in model/"):
        train_lm(load_config(LMTrainConfig, overrides=TINY), tmp_path / "lm")


def test_cli_refusal_is_one_line_with_exit_2(tiny_lm_dir, tiny_visual_tokenizer_dir, tiny_shapes_dir, tmp_path, capsys):
    from unicode_mllm.cli import main

    _fake_run(tmp_path / "run")
    config = tmp_path / "mllm.yaml"
    config.write_text(
        f"model:\n  lm: {tiny_lm_dir}\n  visual_tokenizer: {tiny_visual_tokenizer_dir}\n"
        f"data:\n  shards: {tiny_shapes_dir}\n"
    )
    code = main(["train-mllm", "--config", str(config), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "pass --resume" in err


def test_a_trainer_that_loaded_a_checkpoint_may_fit_without_resume(mllm_cfg, tmp_path):
    trainer = MLLMTrainer(mllm_cfg(tmp_path, train={"steps": 2}))
    trainer.train_step()
    trainer.save_checkpoint()
    resumed = MLLMTrainer(mllm_cfg(tmp_path, train={"steps": 2}))
    resumed.load_checkpoint()
    assert resumed.fit().steps == 2  # continuing its own run, not overwriting another one


# ----- rows 2, 18, 24: lost pointer, damaged checkpoints ----------------------------------------------


def test_lost_or_damaged_pointer_falls_back_to_the_newest_step_folder(tmp_path, caplog):
    mgr = CheckpointManager(tmp_path, keep_last=3)
    for step in (1, 2, 3):
        _save(mgr, step)
    mgr.pointer.unlink()
    assert mgr.exists()  # never "empty": a fresh run would overwrite these
    with caplog.at_level(logging.WARNING):
        assert mgr.load().step == 3
    assert "latest.json is missing; using the newest step-* folder, step-00000003" in caplog.text
    mgr.pointer.write_text('{"name": ')
    assert mgr.load().step == 3
    mgr.pointer.write_text('{"name": "step-00000009"}')
    assert mgr.load().step == 3


@pytest.mark.parametrize("damaged", ["model.safetensors", "state.json"])
def test_damaged_newest_checkpoint_falls_back_to_the_one_before(tmp_path, caplog, damaged):
    mgr = CheckpointManager(tmp_path)
    _save(mgr, 2)
    _save(mgr, 3)
    path = tmp_path / "step-00000003" / damaged
    path.write_bytes(path.read_bytes()[:20])
    with caplog.at_level(logging.WARNING):
        loaded = mgr.load()
    assert loaded.step == 2 and torch.equal(loaded.tensors["model"]["w"], torch.full((2,), 2.0))
    assert f"checkpoint file {path} is damaged" in caplog.text and "resuming from step-00000002 instead" in caplog.text


def test_truncated_state_json_names_the_file_when_nothing_older_is_left(tmp_path):
    mgr = CheckpointManager(tmp_path)
    _save(mgr, 3)
    state = tmp_path / "step-00000003" / "state.json"
    state.write_text(state.read_text()[:10])
    with pytest.raises(UserError) as err:
        mgr.load()
    message = str(err.value)
    assert f"checkpoint file {state} is damaged (not valid JSON" in message and "\n" not in message
    assert "train into another --out to start over" in message


def test_stage0_resumes_from_step_folders_after_latest_json_is_lost(tmp_path, caplog):
    cfg = load_config(LMTrainConfig, overrides=[*TINY, "train.steps=2", "train.ckpt_every=1"])
    out_dir = tmp_path / "lm"
    train_lm(cfg, out_dir)
    (out_dir / "checkpoints" / "latest.json").unlink()
    shutil.rmtree(out_dir / "checkpoints" / "step-00000002")  # the run "died" after step 1's checkpoint
    with caplog.at_level(logging.INFO):
        train_lm(cfg, out_dir, resume=True)
    assert "resuming" in caplog.text and "from step-00000001" in caplog.text  # not "starting fresh"
    rows = [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]


# ----- row 23: --resume without a checkpoint -------------------------------------------------------------


def test_resume_without_a_checkpoint_fails_alike_in_every_stage(mllm_cfg, tiny_lm_dir, tiny_shapes_dir, tmp_path):
    expected = r"--resume: no checkpoint in .*checkpoints; check --out, or leave out --resume to start afresh"
    with pytest.raises(UserError, match=expected):
        train_lm(load_config(LMTrainConfig, overrides=TINY), tmp_path / "lm", resume=True)
    with pytest.raises(UserError, match=expected):
        train_tokenizer(tiny_cfg(tiny_lm_dir, tiny_shapes_dir, tmp_path / "tk"), resume=True)
    with pytest.raises(UserError, match=expected):
        train_mllm(mllm_cfg(tmp_path / "mm"), resume=True)


# ----- row 3: splits checked before step 1 ----------------------------------------------------------------


def test_missing_eval_split_is_found_before_training(mllm_cfg, tiny_lm_dir, tiny_shapes_dir, tmp_path):
    with pytest.raises(UserError, match=r"eval.splits names split 'test', but .*manifest.json has only"):
        train_mllm(mllm_cfg(tmp_path / "mm", eval={"splits": ["heldout", "test"]}))
    cfg = tiny_cfg(tiny_lm_dir, tiny_shapes_dir, tmp_path / "tk", **{"data.eval_splits": "[val, test]"})
    with pytest.raises(UserError, match=r"data.eval_splits names split 'test'.*set data.eval_splits"):
        train_tokenizer(cfg)
    assert not (tmp_path / "mm").exists() and not (tmp_path / "tk").exists()


# ----- rows 4, 5: skips of corrupt images are counted truly and reported -----------------------------------


def _corrupt_every(shapes_dir, out_dir, every: int):
    """A copy of `shapes_dir` whose train images i % every == 0 (in shard order) are truncated PNGs."""
    shutil.copytree(shapes_dir, out_dir)
    count = 0
    for shard in sorted(out_dir.glob("train-*.tar")):
        members = []
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                data = tar.extractfile(m).read()
                if m.name.endswith(".png"):
                    data = data[:60] if count % every == 0 else data
                    count += 1
                members.append((m, data))
        with tarfile.open(shard, "w") as tar:
            for m, data in members:
                m.size = len(data)
                tar.addfile(m, io.BytesIO(data))
    return out_dir


@pytest.fixture
def corrupt_shapes_dir(tiny_shapes_dir, tmp_path):
    return _corrupt_every(tiny_shapes_dir, tmp_path / "corrupt", every=4)  # 12 of 48 train images


def test_skip_limit_fails_early_with_true_counts_and_the_config_key(corrupt_shapes_dir):
    dataset = StreamingDataset(corrupt_shapes_dir, "train", shuffle=False, image_format="tensor", expected_size=32)
    batches = iter(EpochBatches(dataset, 4, max_skip_fraction=0.01))
    with pytest.raises(UserError) as err:
        next(batches)  # the first corrupt image already settles it: no need to train an epoch first
    message = str(err.value)
    assert re.match(r"skipped [12] of [56] samples \([\d.]+%\): [12] corrupt image so far", message)
    assert "more than data.max_skip_fraction=0.01 of the 48 samples of split 'train'" in message
    assert "raise data.max_skip_fraction" in message


def test_epoch_end_check_counts_delivered_samples(corrupt_shapes_dir):
    dataset = StreamingDataset(corrupt_shapes_dir, "train", shuffle=False, image_format="tensor", expected_size=32)
    epoch = EpochBatches(dataset, 4, max_skip_fraction=0.3)
    stream = iter(epoch)
    for _ in range(36 // 4):  # the epoch's 36 good samples
        next(stream)
    assert epoch.report.summary() == "skipped 12 of 48 samples (25.00%): 12 corrupt image"  # was "12 of 12"
    next(stream)  # 25% is under the limit: the next epoch starts
    assert epoch.position.epoch == 1


def test_stage2_reports_reader_skips_and_resume_keeps_counting(mllm_cfg, corrupt_shapes_dir, tmp_path):
    cfg = mllm_cfg(tmp_path / "mm", corrupt_shapes_dir, data={"max_skip_fraction": 1.0, "records_per_batch": 8})
    first = MLLMTrainer(cfg)
    first.train_step()
    first.save_checkpoint()
    first.train_step()
    expected = first.reader_skips_state()
    resumed = MLLMTrainer(cfg)
    resumed.load_checkpoint()
    resumed.train_step()
    assert resumed.reader_skips_state() == expected  # the replayed part of the epoch is not counted twice
    assert expected[corrupt_shapes_dir.name]["skipped"]["corrupt image"] > 0  # per data source
    metrics = resumed.fit().metrics
    assert "corrupt image" in metrics["data_reader"]
    saved = json.loads((tmp_path / "mm" / "final_metrics.json").read_text())
    assert saved["data_reader"] == metrics["data_reader"]


def test_stage1_final_metrics_report_reader_skips(tiny_lm_dir, corrupt_shapes_dir, tmp_path):
    cfg = tiny_cfg(tiny_lm_dir, corrupt_shapes_dir, tmp_path, **{"train.steps": 4, "data.max_skip_fraction": 1.0})
    result = TokenizerTrainer(cfg).fit()
    saved = json.loads((tmp_path / "final_metrics.json").read_text())
    assert "corrupt image" in result.metrics["data"] and saved["data"] == result.metrics["data"]


def test_stage1_short_run_past_the_skip_limit_fails_after_saving(tiny_lm_dir, corrupt_shapes_dir, tmp_path):
    """Three steps over data a quarter corrupt, limit 15%: the run ends far from an epoch's end and the early bound
    (15% of the whole split, 7 images) is not reached, yet it must not exit 0 (it did, with one info line)."""
    overrides = {"train.steps": 3, "codebook.blend.ramp_steps": 3, "data.max_skip_fraction": 0.15}
    cfg = tiny_cfg(tiny_lm_dir, corrupt_shapes_dir, tmp_path, **overrides)
    trainer = TokenizerTrainer(cfg)
    with pytest.raises(UserError, match=r"corrupt image, more than data.max_skip_fraction=0.15"):
        trainer.fit()
    assert trainer.ckpt.load().step == 3  # the checkpoint was written first: nothing is lost


# ----- row 25: Ctrl-C saves a checkpoint --------------------------------------------------------------


def test_ctrl_c_finishes_the_step_saves_and_says_how_to_resume(tiny_lm_dir, tiny_shapes_dir, tmp_path, caplog):
    trainer = TokenizerTrainer(tiny_cfg(tiny_lm_dir, tiny_shapes_dir, tmp_path, **{"train.ckpt_every": 100}))
    step = trainer.train_step

    def step_then_ctrl_c(images):
        logs = step(images)
        if trainer.step == 2:
            os.kill(os.getpid(), signal.SIGINT)  # arrives mid-step: the step still completes
        return logs

    trainer.train_step = step_then_ctrl_c
    before = signal.getsignal(signal.SIGINT)  # Python's default_int_handler, or SIG_IGN in a background job
    with caplog.at_level(logging.WARNING), pytest.raises(KeyboardInterrupt):
        trainer.fit()
    assert trainer.ckpt.load().step == 2
    assert f"interrupted at step 2; checkpoint saved to {tmp_path / 'checkpoints' / 'step-00000002'}" in caplog.text
    assert signal.getsignal(signal.SIGINT) is before  # the handler the run found is back
    assert TokenizerTrainer(tiny_cfg(tiny_lm_dir, tiny_shapes_dir, tmp_path)).fit(resume=True).steps == 6
