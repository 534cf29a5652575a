"""Stage 2: fine-tune the LLM with the frozen visual tokenizer (decompression + instruction tuning).

cfg = load_config(MLLMTrainConfig, "configs/mllm/tiny.yaml")
result = train_mllm(cfg)   # UniCodeMLLM.from_pretrained(result.final_dir)
"""

from unicode_mllm.stages.mllm.config import (
    LoraConfig,
    MLLMDataConfig,
    MLLMEvalConfig,
    MLLMLoopConfig,
    MLLMModelConfig,
    MLLMOptimConfig,
    MLLMTrainConfig,
    TaskWeights,
)
from unicode_mllm.stages.mllm.eval_set import EvalSample, build_eval_samples, evaluate_teacher_forced, token_losses
from unicode_mllm.stages.mllm.sample_stream import MLLMBatches, RecordTokenIds, length_chunks
from unicode_mllm.stages.mllm.task_mixture import RecordPlan, TaskMixture
from unicode_mllm.stages.mllm.trainer import MLLMTrainer, MLLMTrainResult, build_model, train_mllm

__all__ = [
    "EvalSample",
    "LoraConfig",
    "MLLMBatches",
    "MLLMDataConfig",
    "MLLMEvalConfig",
    "MLLMLoopConfig",
    "MLLMModelConfig",
    "MLLMOptimConfig",
    "MLLMTrainConfig",
    "MLLMTrainResult",
    "MLLMTrainer",
    "RecordPlan",
    "RecordTokenIds",
    "TaskMixture",
    "TaskWeights",
    "build_eval_samples",
    "build_model",
    "evaluate_teacher_forced",
    "length_chunks",
    "token_losses",
    "train_mllm",
]
