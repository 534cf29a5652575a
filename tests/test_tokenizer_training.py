"""Stage-1 training: the blend schedules, a short real run, exact resume, the config checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from unicode_mllm.config import config_from_dict
from unicode_mllm.errors import ConfigError
from unicode_mllm.stages.tokenizer.blend_schedule import BlendConfig, BlendSchedule
from unicode_mllm.stages.tokenizer.config import TokenizerTrainConfig
from unicode_mllm.stages.tokenizer.trainer import TokenizerTrainer
from unicode_mllm.visual_tokenizer.modeling import VisualTokenizer


def tiny_cfg(lm_dir, shapes_dir, out_dir, **overrides) -> TokenizerTrainConfig:
    base = {
        "model": {"image_size": 32, "ch": 8, "ch_mult": [1, 2], "z_channels": 8, "num_res_blocks": 1, "depth": 2},
        "codebook": {"llm": str(lm_dir), "blend": {"schedule": "ramp", "ramp_steps": 4}},
        "loss": {"lpips_trunk": "random", "disc_start": 1, "disc_ch": 8, "disc_layers": 2},
        "data": {"shards": str(shapes_dir), "batch_size": 4, "shuffle_buffer": 16},
        "train": {
            "steps": 6,
            "device": "cpu",
            "out_dir": str(out_dir),
            "log_every": 1,
            "eval_every": 6,
            "eval_batches": 1,
            "ckpt_every": 3,
            "seed": 0,
        },
    }
    return config_from_dict(TokenizerTrainConfig, base, [f"{k}={v}" for k, v in overrides.items()])


def test_ramp_schedule_reaches_language_codebook_then_fixes_it():
    s = BlendSchedule(BlendConfig(schedule="ramp", ramp_steps=4))
    lams = [s.lam_after(k) for k in range(1, 7)]
    assert lams == [3 / 4, 2 / 3, 1 / 2, 0.0, None, None]
    share = 1.0  # the visual codebook's share after k compounding blends falls linearly: 1 - k/4
    for k, lam in enumerate(lams[:4], start=1):
        share *= lam
        assert share == pytest.approx(1 - k / 4)
    assert not s.codebook_fixed(3) and s.codebook_fixed(4)
    assert s.gan_scale(0) == 1.0 and s.gan_scale(4) == pytest.approx(0.1) and s.gan_scale(2) == pytest.approx(0.55)


def test_interval_schedule_blends_every_k_steps():
    s = BlendSchedule(BlendConfig(schedule="interval", every=3, lam=0.8))
    assert [s.lam_after(k) for k in range(1, 7)] == [None, None, 0.8, None, None, 0.8]
    assert not s.codebook_fixed(100) and s.gan_scale(100) == 1.0


def test_mode_and_schedule_must_agree(tmp_path):
    with pytest.raises(ConfigError, match="codebook.mode='frozen' never blends"):
        config_from_dict(TokenizerTrainConfig, {"codebook": {"mode": "frozen"}})
    with pytest.raises(ConfigError, match="ramp_steps \\(2000\\) must be <= train.steps \\(10\\)"):
        config_from_dict(TokenizerTrainConfig, {"codebook": {"blend": {"ramp_steps": 2000}}, "train": {"steps": 10}})


def test_short_ramp_run_ends_on_the_language_codebook(tiny_lm_dir, tiny_shapes_dir, tmp_path):
    trainer = TokenizerTrainer(tiny_cfg(tiny_lm_dir, tiny_shapes_dir, tmp_path))
    result = trainer.fit()
    assert result.steps == 6
    assert result.metrics["rel_distance"] < 1e-6  # ramp ended at step 4; tail steps keep C == C_L
    for name in ("config.json", "model.safetensors", "train_config.yaml"):
        assert (result.final_dir / name).is_file()
    assert (tmp_path / "curves.png").is_file() and (tmp_path / "samples" / "recon-0000006.png").is_file()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "total" in r] == [1, 2, 3, 4, 5, 6]
    assert rows[-1]["psnr_val"] > 0
    assert "d_loss" not in rows[0] and "d_loss" in rows[1]  # the discriminator starts at loss.disc_start=1
    # The saved tokenizer's codes are ordinary LLM token ids of the tiny LM.
    from transformers import AutoTokenizer

    tokenizer = VisualTokenizer.from_pretrained(result.final_dir)
    text_tokenizer = AutoTokenizer.from_pretrained(tiny_lm_dir)
    ids = tokenizer.codes_to_token_ids(tokenizer.encode(torch.zeros(2, 3, 32, 32)))
    assert not set(ids.flatten().tolist()) & set(text_tokenizer.all_special_ids)
    assert int(ids.max()) < len(text_tokenizer)


def test_resume_gives_the_same_next_step_loss(tiny_lm_dir, tiny_shapes_dir, tmp_path):
    full = TokenizerTrainer(tiny_cfg(tiny_lm_dir, tiny_shapes_dir, tmp_path / "a", **{"train.steps": 5}))
    full_logs = [full.train_step(full.next_batch()) for _ in range(5)]
    losses = [row["total"] for row in full_logs]

    first = TokenizerTrainer(tiny_cfg(tiny_lm_dir, tiny_shapes_dir, tmp_path / "b", **{"train.steps": 5}))
    for _ in range(3):
        first.train_step(first.next_batch())
    first.save_checkpoint()
    del first
    torch.manual_seed(1234)  # disturb the global RNG: resume must restore it
    resumed = TokenizerTrainer(tiny_cfg(tiny_lm_dir, tiny_shapes_dir, tmp_path / "b", **{"train.steps": 5}))
    resumed.load_checkpoint()
    assert resumed.step == 3
    after_logs = [resumed.train_step(resumed.next_batch()) for _ in range(2)]
    assert [row["total"] for row in after_logs] == losses[3:]
    # the logged code usage (a window over recent steps) is restored too, not restarted
    assert [row["usage"] for row in after_logs] == [row["usage"] for row in full_logs[3:]]


def test_native_backend_trains_and_round_trips(tiny_lm_dir, tiny_shapes_dir, tmp_path):
    trainer = TokenizerTrainer(tiny_cfg(tiny_lm_dir, tiny_shapes_dir, tmp_path, **{"codebook.backend": "native"}))
    logs = [trainer.train_step(trainer.next_batch()) for _ in range(2)]
    assert all(row["total"] > 0 for row in logs) and trainer.tokenizer.config.quantizer.backend == "native"
    path = trainer.save_final()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.equal(VisualTokenizer.from_pretrained(path).encode(x), trainer.tokenizer.encode(x))


def test_subspace_search_trains_saves_and_reloads(tiny_lm_dir, tiny_shapes_dir, tmp_path):
    overrides = {"codebook.backend": "native", "codebook.search_dim": 4}
    trainer = TokenizerTrainer(tiny_cfg(tiny_lm_dir, tiny_shapes_dir, tmp_path, **overrides))
    [trainer.train_step(trainer.next_batch()) for _ in range(2)]
    path = trainer.save_final()
    loaded = VisualTokenizer.from_pretrained(path)
    assert loaded.config.quantizer.search_dim == 4 and loaded.quantizer.rvq.search_dim == 4
    assert torch.equal(loaded.quantizer.rvq.search_basis, trainer.tokenizer.quantizer.rvq.search_basis)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.equal(loaded.encode(x), trainer.tokenizer.encode(x))


def test_search_dim_needs_the_native_backend(tiny_lm_dir, tiny_shapes_dir, tmp_path):
    with pytest.raises(ConfigError, match="needs codebook.backend='native'"):
        tiny_cfg(tiny_lm_dir, tiny_shapes_dir, tmp_path, **{"codebook.search_dim": 4, "codebook.backend": "library"})


@pytest.mark.parametrize("mode", ["frozen", "separate", "dual"])
def test_other_codebook_modes_run(tiny_lm_dir, tiny_shapes_dir, tmp_path, mode):
    cfg = tiny_cfg(
        tiny_lm_dir,
        tiny_shapes_dir,
        tmp_path,
        **{
            "codebook.mode": mode,
            "codebook.blend.schedule": "none",
            "train.steps": 2,
            "codebook.separate_num_codes": 16,
        },
    )
    trainer = TokenizerTrainer(cfg)
    before = trainer.tokenizer.quantizer.codebook.clone()
    for _ in range(2):
        trainer.train_step(trainer.next_batch())
    after = trainer.tokenizer.quantizer.codebook
    if mode == "frozen":
        assert torch.equal(before, after) and trainer.relative_distance() == 0.0
    else:
        assert not torch.equal(before, after)
    if mode == "separate":
        assert trainer.relative_distance() is None and after.shape[0] == 16
        assert int(trainer.tokenizer.code_to_token_id.min()) >= trainer.tokenizer.config.llm_vocab_size - 16


def test_trains_in_a_process_where_an_earlier_stage_used_bf16(tiny_lm_dir, tiny_shapes_dir, tmp_path):
    # The demo runs stages 0-2 in one process; on a bf16 GPU the LM stages are bf16 and this preset fp32.
    # accelerate refuses a second Accelerator with another precision unless each stage starts clean.
    from unicode_mllm.runtime.accelerator import stage_accelerator

    earlier = stage_accelerator("test", cpu=True, mixed_precision="bf16")  # what stage 0 builds on a bf16 GPU
    assert earlier.mixed_precision == "bf16"
    trainer = TokenizerTrainer(tiny_cfg(tiny_lm_dir, tiny_shapes_dir, tmp_path, **{"train.mixed_precision": "auto"}))
    assert trainer.accelerator.mixed_precision == "no"  # 'auto' on a CPU: fp32
    assert trainer.train_step(trainer.next_batch())["total"] > 0


@pytest.mark.parametrize("backend", ["native", "library"])
def test_both_quantizer_backends_train_and_native_is_the_default(tiny_lm_dir, tiny_shapes_dir, tmp_path, backend):
    assert TokenizerTrainConfig().codebook.backend == "native"  # the faster one (BENCHMARKS.md) is the default
    cfg = tiny_cfg(tiny_lm_dir, tiny_shapes_dir, tmp_path, **{"train.steps": 4, "codebook.backend": backend})
    trainer = TokenizerTrainer(cfg)
    losses = [trainer.train_step(trainer.next_batch())["total"] for _ in range(2)]
    assert all(torch.isfinite(torch.tensor(loss)) for loss in losses)
    assert trainer.tokenizer.config.quantizer.backend == backend


def test_max_minutes_stops_saves_and_resumes(tiny_lm_dir, tiny_shapes_dir, tmp_path, caplog):
    """A run past train.max_minutes stops after the step it is in, saves a checkpoint and a model; --resume goes on."""
    from unicode_mllm.stages.tokenizer.trainer import train_tokenizer

    cfg = tiny_cfg(tiny_lm_dir, tiny_shapes_dir, tmp_path, **{"train.max_minutes": 1e-9})
    with caplog.at_level("WARNING"):
        train_tokenizer(cfg)
    assert "train.max_minutes=1e-09 reached at step 1" in caplog.text
    assert json.loads((tmp_path / "checkpoints" / "latest.json").read_text())["step"] == 1
    resumed = train_tokenizer(tiny_cfg(tiny_lm_dir, tiny_shapes_dir, tmp_path), resume=True)
    assert resumed.steps == 6


TINY_PRESET = Path(__file__).resolve().parents[1] / "configs" / "tokenizer" / "tiny.yaml"


def test_codebook_section_is_the_quantizer_settings_passed_whole():
    """`codebook:` extends `QuantizerSettings`: the keys users write (configs/tokenizer/tiny.yaml) are its fields,
    the quantizer-only ones (search_dtype, native_code_chunk_size) reach the tokenizer too, and its checks run."""
    from unicode_mllm.config import load_config
    from unicode_mllm.quantizer_settings import QuantizerSettings
    from unicode_mllm.stages.tokenizer.trainer import tokenizer_kwargs

    overrides = ["codebook.search_dtype=fp32", "codebook.native_code_chunk_size=64"]
    cfg = load_config(TokenizerTrainConfig, TINY_PRESET, overrides)
    quantizer = tokenizer_kwargs(cfg)["quantizer"]
    assert type(quantizer) is QuantizerSettings and quantizer == QuantizerSettings.of(cfg.codebook)
    assert (quantizer.mode, quantizer.norm_matching, quantizer.backend, quantizer.search_dim) == (
        "language_driven",
        "moments",
        "native",
        8,
    )
    assert (quantizer.search_dtype, quantizer.native_code_chunk_size) == ("fp32", 64)
    with pytest.raises(ConfigError, match="tiny.yaml: codebook.search_dtype='bf16' needs codebook.backend='native'"):
        load_config(
            TokenizerTrainConfig,
            TINY_PRESET,
            ["codebook.backend=library", "codebook.search_dim=null", "codebook.search_dtype=bf16"],
        )
    with pytest.raises(ConfigError, match="model.stacking 'vq' has depth 1; got model.depth=2"):
        load_config(TokenizerTrainConfig, TINY_PRESET, ["model.stacking=vq", "model.depth=2"])
