"""The GPU kit: one command that turns a lent GPU (one H100/H200, under 10 minutes) into evidence.

    python benchmarks/gpu_suite.py --out gpu_kit_out                  # on the GPU
    python benchmarks/gpu_suite.py --out /tmp/kit --cpu-smoke         # every section at toy size on the CPU
    python benchmarks/gpu_suite.py --out DIR --only quantizer,lora_step

Writes DIR/gpu_suite.json and DIR/gpu_suite.md: the card's name, the software versions, and per section its
status, time, figures (each with its unit and the settings it was measured at) and method. Sections, in order
(sizes in gpu_kit/plan.py; BENCHMARKS.md "GPU kit" has the formulas):
    stages_bf16           a few bf16 steps of stage 0, 1 and 2 through the trainers: steps/s, final loss finite;
    small_preset          configs/*/small.yaml end to end (data -> stages 0-2 -> held-out VQA, text-to-image);
    quantizer             one quantizer step at 8192 tokens x 32000 x 4096, native and library backends;
    tokenizer_throughput  encode/decode images/s of the 256 px tokenizer (llama7b_256's shape);
    lora_step             the 7B LoRA stage-2 step: tokens/s, MFU, peak memory, with and without checkpointing;
    image_decoding        image-span decoding codes/s at a 7B shape against the HBM-bandwidth bound.
"""

import sys

from gpu_kit.runner import main

if __name__ == "__main__":
    sys.exit(main())
