"""Sentinel ids and special strings, nothing else."""

IGNORE_INDEX = -100  # torch's cross-entropy skips this label by default
IMAGE_PLACEHOLDER_ID = -200  # negative, so it can never be a real vocabulary id

IMAGE_PLACEHOLDER = "<image>"  # where an image goes in a prompt (LLaVA convention)
IMAGE_START = "<img>"
IMAGE_END = "</img>"
