"""README.md model cards for the folders the trainers save (stage 0 LM, stage 1 tokenizer, stage 2 MLLM).

Written at the end of training from the run's own files: the resolved training config (YAML), the data it read
(the config's data section; sample counts and skips from final_metrics.json), the final metrics (final_metrics.json
as written), the command line that ran, and what the model is for and not for.
"""

from __future__ import annotations

import json
import shlex
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from unicode_mllm.config import dump_config
from unicode_mllm.shard_manifest import read_manifest

CARD_NAME = "README.md"
# A run shorter than this is called a demonstration of the pipeline in its card (the CPU presets train for
# hundreds to a few thousand steps; the paper's models for hundreds of thousands).
DEMO_STEPS = 10_000

_STAGES = {
    "lm": (
        "Stage 0: a small LLaMA-architecture causal language model pre-trained from scratch, with its text tokenizer",
        "Load with `transformers.AutoModelForCausalLM.from_pretrained(folder)` and "
        "`AutoTokenizer.from_pretrained(folder)`. It is the language model stage 1's codebook and stage 2 start from.",
    ),
    "tokenizer": (
        "Stage 1: a UniCode visual tokenizer (encoder, stacked quantizer over an LLM-derived codebook, decoder)",
        "Load with `unicode_mllm.visual_tokenizer.VisualTokenizer.from_pretrained(folder)` or, after "
        "`import unicode_mllm`, `transformers.AutoModel.from_pretrained(folder)`. Its codes are token ids of the "
        "language model named in its config (`llm_name_or_path`); stage 2 trains that LM to read and write them.",
    ),
    "mllm": (
        "Stage 2: a UniCode multimodal LLM (causal LM + frozen visual tokenizer) that reads and writes images "
        "through its vocabulary",
        "Load with `unicode_mllm.model.UniCodeMLLM.from_pretrained(folder)` or, after `import unicode_mllm`, "
        "`transformers.AutoModel.from_pretrained(folder)`; `unicode-mllm ask` / `answer` / `generate-image` use it.",
    ),
}
_TAGS = {"lm": "causal-lm", "tokenizer": "visual-tokenizer", "mllm": "multimodal"}
_DATA_KEYS = ("data", "data_reader", "corpus_tokens", "tokens_seen")  # final_metrics entries that describe the data


def command_line() -> str:
    """The command that is running, as a shell line (`unicode-mllm train-mllm --config ...`)."""
    argv = list(sys.argv)
    if argv:
        argv[0] = Path(argv[0]).name
    return shlex.join(argv)


def render_card(
    stage: str,
    cfg: Any,
    final_metrics: Mapping[str, Any],
    *,
    command: str | None = None,
    data_section: str = "data",
) -> str:
    """The card's markdown. stage: 'lm', 'tokenizer' or 'mllm'; cfg: the run's dataclass config."""
    title, usage = _STAGES[stage]
    config_yaml = dump_config(cfg)
    config_tree = yaml.safe_load(config_yaml) or {}
    data_config = config_tree.get(data_section, {}) if isinstance(config_tree, dict) else {}
    data_figures = {k: final_metrics[k] for k in _DATA_KEYS if k in final_metrics}
    metrics = {k: v for k, v in final_metrics.items() if k not in _DATA_KEYS}
    steps = final_metrics.get("step", final_metrics.get("steps"))
    lines = [
        "---",
        "library_name: unicode-mllm",
        "tags: [unicode-mllm, "
        + {"lm": "causal-lm", "tokenizer": "visual-tokenizer", "mllm": "multimodal"}[stage]
        + "]",
        "---",
        "",
        f"# {title}",
        "",
        "Written by unicode-mllm at the end of the training run, from the run's own files "
        "(config.yaml, final_metrics.json).",
        "",
        "## Command",
        "",
        "```bash",
        command if command is not None else command_line(),
        "```",
        "",
        "## Data",
        "",
        f"The `{data_section}` section of the training config:",
        "",
        "```yaml",
        yaml.safe_dump(data_config, sort_keys=False).rstrip() if data_config else "(none)",
        "```",
        "",
    ]
    lines += _shard_table(data_config)
    if data_figures:
        lines += [
            "What the run read (samples, skips and their reasons, tokens), from final_metrics.json:",
            "",
            "```json",
            json.dumps(data_figures, indent=2),
            "```",
            "",
        ]
    lines += ["## Final metrics", "", "| metric | value |", "| --- | --- |"]
    lines += [f"| {key} | {_cell(value)} |" for key, value in metrics.items()]
    lines += ["", "## Intended use", "", usage, "", "## Limitations", ""]
    if isinstance(steps, int) and steps < DEMO_STEPS:
        lines.append(
            f"- Trained for {steps} steps: a run of this size (such as the tiny CPU presets) is a demonstration "
            "that the pipeline works end to end, **not a capable model**. Do not use it for anything but tests "
            "and demos."
        )
    lines += [
        "- It knows only its training data (above); expect nothing outside that distribution.",
        "- Research code: outputs are unfiltered and may be wrong; no safety tuning was done.",
        "",
        "## Training config",
        "",
        "```yaml",
        config_yaml.rstrip(),
        "```",
        "",
    ]
    return "\n".join(lines)


def write_model_card(folder: str | Path, stage: str, cfg: Any, final_metrics_file: str | Path, **kwargs: Any) -> Path:
    """Write folder/README.md from the run's final_metrics.json; returns its path."""
    from unicode_mllm.runtime.checkpoint import atomic_write_text

    metrics = json.loads(Path(final_metrics_file).read_text())
    path = Path(folder) / CARD_NAME
    atomic_write_text(path, render_card(stage, cfg, metrics, **kwargs))
    return path


def _shard_folders(node: Any) -> list[str]:
    """Every `shards` folder named in a data section (stage 1: data.shards; stage 2: data.shards or sources)."""
    if isinstance(node, dict):
        found = [node["shards"]] if isinstance(node.get("shards"), str) else []
        return found + [f for key, value in node.items() if key != "shards" for f in _shard_folders(value)]
    if isinstance(node, list):
        return [f for value in node for f in _shard_folders(value)]
    return []


def _shard_table(data_config: Any) -> list[str]:
    """Samples per split of each shard folder, from its manifest (a folder that cannot be read is named)."""
    rows = []
    for folder in dict.fromkeys(_shard_folders(data_config)):
        try:
            splits = read_manifest(folder).splits
            counts = ", ".join(f"{name} {summary.num_samples}" for name, summary in splits.items())
        except Exception as e:  # a card never fails a finished run
            counts = f"(manifest not readable: {type(e).__name__})"
        rows.append(f"| {folder} | {counts} |")
    if not rows:
        return []
    header = ["Shard folders (samples per split, from each manifest):", "", "| folder | samples |", "| --- | --- |"]
    return [*header, *rows, ""]


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    text = json.dumps(value) if isinstance(value, dict | list) else str(value)
    return text.replace("|", "\\|")
