"""The three training stages, one package each, all `TrainingStage`s of the shared loop (runtime/training_loop.py:
cadence, Ctrl-C, max_minutes, checkpoints and exact resume, final save, logging).

    stage  package                  trains                                                  command
    0      stages/lm/               a byte-level BPE + a LLaMA on the shapes world's text   unicode-mllm train-lm
    1      stages/tokenizer/        the visual tokenizer on image reconstruction, its       unicode-mllm train-tokenizer
                                    codebook following the LLM's embedding table
    2      stages/mllm/             the LLM with the decompression loss and instruction     unicode-mllm train-mllm
                                    tuning, the visual tokenizer frozen

`pipeline.py` chains them; stage 1's public entry is also the top-level `tokenizer_training` package.
"""
