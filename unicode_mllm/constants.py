"""Sentinel ids and special strings, nothing else."""

IGNORE_INDEX = -100  # torch's cross-entropy skips this label by default
IMAGE_PLACEHOLDER_ID = -200  # negative, so it can never be a real vocabulary id

IMAGE_PLACEHOLDER = "<image>"  # where an image goes in a prompt (LLaVA convention)
IMAGE_START = "<img>"
IMAGE_END = "</img>"

# The chat roles: the stage-0 corpus writes its question/answer lines with them and the stage-2 "plain"
# template reuses them, so the LM has read them before it is instruction-tuned.
USER_PREFIX = "USER:"
ASSISTANT_PREFIX = "ASSISTANT:"
