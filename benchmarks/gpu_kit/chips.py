"""The machine under test: the card's name and datasheet peaks, and the versions of the software that ran."""

from __future__ import annotations

import dataclasses
import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


@dataclass(frozen=True)
class ChipSpec:
    """Datasheet figures: dense (no 2:4 sparsity) bf16 tensor-core peak and HBM bandwidth."""

    label: str
    bf16_dense_tflops: float
    hbm_tb_per_s: float


# NVIDIA datasheets. Matched against torch.cuda.get_device_name() in order: every word must appear (upper case),
# so an "NVIDIA H100 80GB HBM3" (SXM) falls through the PCIe and NVL rows to the plain H100 one.
SPECS: tuple[tuple[tuple[str, ...], ChipSpec], ...] = (
    (("H200",), ChipSpec("H200", 989.0, 4.8)),
    (("H100", "PCIE"), ChipSpec("H100 PCIe", 756.0, 2.0)),
    (("H100", "NVL"), ChipSpec("H100 NVL", 835.0, 3.9)),
    (("H100",), ChipSpec("H100 SXM", 989.0, 3.35)),
)


def chip_spec(device_name: str) -> ChipSpec | None:
    """The datasheet row for a device name, or None for a card the table does not know (no MFU, no bound)."""
    name = device_name.upper()
    for words, spec in SPECS:
        if all(word in name for word in words):
            return spec
    return None


def cpu_model() -> str:
    info = Path("/proc/cpuinfo")
    for line in info.read_text(errors="replace").splitlines() if info.is_file() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()


def describe_device(device: torch.device) -> dict[str, Any]:
    """What the outputs say about the device: its name (torch.cuda.get_device_name on a GPU), memory, the
    datasheet row used for MFU and the bandwidth bound (None where the table has no row)."""
    name = device_name(device)
    out: dict[str, Any] = {"type": device.type, "name": name}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        out.update(
            total_memory_gib=round(props.total_memory / 2**30, 1),
            compute_capability=f"{props.major}.{props.minor}",
            multiprocessors=props.multi_processor_count,
            visible_devices=torch.cuda.device_count(),
        )
    else:
        out["cpu_cores"] = os.cpu_count()
    spec = chip_spec(name) if device.type == "cuda" else None
    out["spec"] = dataclasses.asdict(spec) if spec else None
    out["spec_source"] = "NVIDIA datasheet (dense bf16, HBM)" if spec else "no datasheet row: MFU and bounds omitted"
    return out


def _version(module: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:  # not installed: the outputs say None
        return None


def software_versions() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "transformers": _version("transformers"),
        "peft": _version("peft"),
        "accelerate": _version("accelerate"),
        "vector-quantize-pytorch": _version("vector-quantize-pytorch"),
        # TF32 decides fp32 matmul/conv speed (the quantizer and the tokenizer's encode run in fp32).
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "tf32_cudnn": torch.backends.cudnn.allow_tf32,
        "torch_threads": torch.get_num_threads(),
    }
