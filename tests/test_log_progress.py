"""Progress off a terminal: a log file gets plain progress lines during a stage and at its end."""

from __future__ import annotations

import logging
import sys

import pytest

from unicode_mllm.runtime import progress as progress_module
from unicode_mllm.runtime.progress import make_progress, setup_logging, track


class _Captured:
    def __init__(self, capsys):
        self.capsys = capsys
        self.text = ""

    def getvalue(self) -> str:
        self.text += self.capsys.readouterr().err
        return self.text


@pytest.fixture
def plain_stderr(capsys):
    """stderr captured as a log file would be (not a tty), with the library's logging set up for it."""
    assert not sys.stderr.isatty() and not progress_module.console.is_terminal
    root = logging.getLogger()
    before = list(root.handlers)
    for handler in before:
        root.removeHandler(handler)
    setup_logging("INFO")
    yield _Captured(capsys)
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in before:
        root.addHandler(handler)


def test_lines_during_and_at_the_end_of_a_stage(plain_stderr, monkeypatch):
    monkeypatch.setenv("UNICODE_MLLM_PROGRESS_SECONDS", "0")  # a line at every update
    with make_progress() as progress:
        task = progress.add_task("stage 0: LM", total=4, stats="")
        for step in range(1, 5):
            progress.update(task, completed=step, stats=f"loss {5 - step:.3f}")
    lines = [line for line in plain_stderr.getvalue().splitlines() if "INFO stage 0: LM" in line]
    assert len(lines) == 4, lines
    assert any("1/4 (25%)" in line and "loss 4.000" in line for line in lines), lines
    assert any("4/4 (100%)" in line and "done" in line for line in lines), lines
    assert all(line.startswith("[") for line in lines)  # plain log lines ([time] INFO ...), not a drawn bar


def test_lines_are_rate_limited_but_the_end_is_always_logged(plain_stderr, monkeypatch):
    monkeypatch.setenv("UNICODE_MLLM_PROGRESS_SECONDS", "3600")
    with make_progress() as progress:
        task = progress.add_task("stage 1: tokenizer", total=100, stats="")
        for step in range(1, 101):
            progress.update(task, completed=step)
    lines = [line for line in plain_stderr.getvalue().splitlines() if "INFO stage 1: tokenizer" in line]
    assert len(lines) == 2, lines  # the first update and the end
    assert "1/100" in lines[0] and "100/100 (100%)" in lines[1] and "done" in lines[1]


def test_a_stopped_stage_logs_where_it_stopped(plain_stderr, monkeypatch):
    monkeypatch.setenv("UNICODE_MLLM_PROGRESS_SECONDS", "3600")
    with make_progress() as progress:
        task = progress.add_task("stage 2: MLLM", total=10, stats="")
        for step in range(1, 4):
            progress.update(task, completed=step)
    last = [line for line in plain_stderr.getvalue().splitlines() if "INFO stage 2: MLLM" in line][-1]
    assert "3/10" in last and "stopped" in last


def test_track_and_disabled_progress(plain_stderr, monkeypatch):
    monkeypatch.setenv("UNICODE_MLLM_PROGRESS_SECONDS", "0")
    assert list(track(range(3), "reading val")) == [0, 1, 2]
    assert "reading val 3/3 (100%)" in plain_stderr.getvalue()
    with make_progress(disable=True) as progress:  # other ranks: nothing
        task = progress.add_task("rank 1", total=2, stats="")
        progress.update(task, completed=2)
    assert "rank 1" not in plain_stderr.getvalue()


def test_each_trainer_logs_progress_lines_off_a_terminal(
    plain_stderr, monkeypatch, tiny_lm_dir, tiny_visual_tokenizer_dir, tiny_shapes_dir, tmp_path
):
    """`unicode-mllm demo > log` showed nothing during stage 0: now each stage logs its progress and its end."""
    from tests.test_lm import TINY as TINY_LM
    from tests.test_mllm_training import make_config as mllm_config
    from tests.test_tokenizer_training import tiny_cfg
    from unicode_mllm.config import load_config
    from unicode_mllm.stages.lm import LMTrainConfig, train_lm
    from unicode_mllm.stages.mllm import train_mllm
    from unicode_mllm.stages.tokenizer.trainer import TokenizerTrainer

    monkeypatch.setenv("UNICODE_MLLM_PROGRESS_SECONDS", "0")
    train_lm(load_config(LMTrainConfig, overrides=TINY_LM), tmp_path / "lm")
    TokenizerTrainer(tiny_cfg(tiny_lm_dir, tiny_shapes_dir, tmp_path / "vt")).fit()
    train_mllm(mllm_config(tiny_lm_dir, tiny_visual_tokenizer_dir, tiny_shapes_dir, tmp_path / "mllm"))
    text = plain_stderr.getvalue()
    for stage, steps in (("stage 0: LM", 4), ("stage 1: tokenizer", 6), ("stage 2: MLLM", 3)):
        lines = [line for line in text.splitlines() if f"INFO {stage} " in line]
        assert f"INFO {stage} 1/{steps}" in lines[0] and "loss" in lines[0], lines
        assert f"{steps}/{steps} (100%)" in lines[-1] and "done" in lines[-1], lines
