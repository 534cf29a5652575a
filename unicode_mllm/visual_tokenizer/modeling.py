"""The visual tokenizer as a Hugging Face model: encoder -> stacked quantizer -> decoder.

Codes are rows of the unified codebook; `code_to_token_id` (kept in the config) maps them to LLM
vocabulary ids, which are the interface to the LLM. `save_pretrained` writes `config.json` (with the
id map, model_type and auto_map), `model.safetensors` and the loader file `modeling_unicode_mllm.py`;
`from_pretrained` rebuilds the same model. `VisualTokenizerConfig` is defined in `unicode_mllm/hf_auto.py`
(importable from here too), which registers both with transformers' Auto classes.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from einops import rearrange
from torch import Tensor, nn
from transformers import AutoModel, PreTrainedModel

from unicode_mllm.errors import ConfigError, UserError
from unicode_mllm.hf_auto import VisualTokenizerConfig, auto_map, write_auto_file
from unicode_mllm.runtime.model_folders import (
    HF_CONFIG,
    VISUAL_TOKENIZER,
    check_weight_shapes,
    hub_errors,
    require_visual_tokenizer,
)
from unicode_mllm.visual_tokenizer.autoencoder import AutoencoderShape, Decoder, Encoder
from unicode_mllm.visual_tokenizer.code_map import CodeTokenMap
from unicode_mllm.visual_tokenizer.language_codebook import LanguageCodebook
from unicode_mllm.visual_tokenizer.stacking import build_stack


@dataclass
class VisualTokenizerOutput:
    """reconstruction: (b, 3, H, W) in ~[-1, 1]; codes: (b, h, w, d) code indices; commit_loss: ()."""

    reconstruction: Tensor
    codes: Tensor
    commit_loss: Tensor


class VisualTokenizer(PreTrainedModel):
    """Images (b, 3, H, W) in [-1, 1] <-> codes (b, h, w, d) <-> LLM token ids (b, h, w, d)."""

    config_class = VisualTokenizerConfig
    main_input_name = "pixel_values"
    base_model_prefix = "visual_tokenizer"
    # The library lists the one shared codebook under every residual layer's key; only layer 0's
    # copy is saved (see `save_pretrained`), the others are the same tensors after construction.
    _keys_to_ignore_on_load_missing: ClassVar[list[str]] = [r"rvq\.layers\.[1-9][0-9]*\._codebook\."]

    def __init__(self, config: VisualTokenizerConfig, sync_codebook: bool = False):
        super().__init__(config)
        config.check()
        arch = AutoencoderShape(
            ch=config.ch,
            ch_mult=tuple(config.ch_mult),
            num_res_blocks=config.num_res_blocks,
            attn_resolutions=tuple(config.attn_resolutions),
            resolution=config.image_size,
            dropout=config.dropout,
        )
        self.encoder = Encoder(arch, z_channels=config.z_channels)
        self.stack = build_stack(
            config.stacking,
            z_channels=config.z_channels,
            llm_width=config.llm_width,
            num_codes=config.num_codes,
            depth=config.depth if config.stacking == "rq" else None,
            settings=config.quantizer,
            sync_codebook=sync_codebook,
        )
        self.decoder = Decoder(arch, in_channels=self.stack.decoder_in_channels)
        self._code_map: CodeTokenMap | None = None
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        # Keep PyTorch's default initialisation of convs and the quantizer's own buffers.
        return

    # ----- shapes --------------------------------------------------------------------------

    @property
    def quantizer(self):
        return self.stack.quantizer

    @property
    def latent_hw(self) -> tuple[int, int]:
        side = self.config.image_size // self.config.downsample_factor
        return (side, side)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return (*self.latent_hw, self.config.z_channels)

    @property
    def code_shape(self) -> tuple[int, int, int]:
        """(h, w, d): the LLM reads h*w aggregated embeddings and writes h*w*d codes."""
        return self.stack.code_shape(self.latent_hw)

    @property
    def num_read_tokens(self) -> int:
        h, w, _ = self.code_shape
        return h * w

    @property
    def num_write_tokens(self) -> int:
        h, w, d = self.code_shape
        return h * w * d

    def _check_images(self, pixel_values: Tensor, any_size: bool = False) -> None:
        size = self.config.image_size
        if pixel_values.ndim != 4 or pixel_values.shape[1] != 3:
            raise UserError(f"images must be (b, 3, H, W) in [-1, 1], got {tuple(pixel_values.shape)}")
        if not any_size and tuple(pixel_values.shape[2:]) != (size, size):
            raise UserError(
                f"images must be (b, 3, {size}, {size}) in [-1, 1], got {tuple(pixel_values.shape)}; "
                f"resize to {size}x{size} RGB"
            )

    # ----- the model ----------------------------------------------------------------------

    def forward(self, pixel_values: Tensor, freeze_codebook: bool | None = None) -> VisualTokenizerOutput:
        self._check_images(pixel_values)
        z = self.encoder(pixel_values)
        out = self.stack(z, freeze_codebook=freeze_codebook)
        return VisualTokenizerOutput(self.decoder(out.z_q), out.codes, out.commit_loss)

    @torch.no_grad()
    def encode(self, pixel_values: Tensor, any_size: bool = False) -> Tensor:
        """(b, 3, H, W) in [-1, 1] -> codes (b, h, w, d) int64 (no codebook update).

        any_size: also code images of another size than the training one (the encoder is convolutional, so
        they come on a proportionally larger or smaller grid that `decode` and the LLM presets do not take;
        for probes). Otherwise H = W = image_size is required.
        """
        self._check_images(pixel_values, any_size)
        was_training = self.training
        self.eval()
        # Codes are data: the same image must give the same ids in `tokenize`, on the fly in stage 2 and at
        # inference, whatever autocast the caller runs under (a bf16 encoder flips near-ties).
        device_type = pixel_values.device.type
        try:
            with torch.autocast(device_type, enabled=False):
                features = self.encoder(pixel_values.to(self.encoder.conv_in.weight.dtype))
                return self.stack(features, freeze_codebook=True).codes
        finally:
            self.train(was_training)

    @torch.no_grad()
    def decode(self, codes: Tensor) -> Tensor:
        """codes (b, h, w, d) -> images (b, 3, H, W), clamped to [-1, 1]."""
        if tuple(codes.shape[1:]) != self.code_shape:
            raise UserError(f"codes must be (b, {', '.join(map(str, self.code_shape))}), got {tuple(codes.shape)}")
        return self.decoder(self.stack.decode_codes(codes)).clamp(-1.0, 1.0)

    # ----- the interface to the LLM ------------------------------------------------------------

    @property
    def code_map(self) -> CodeTokenMap:
        """Codes <-> LLM token ids, from `config.code_to_token_id` (on the CPU; each call moves what it reads)."""
        # Built on first use, not kept as buffers: HF's loader constructs the model on the meta device and leaves
        # non-persistent buffers empty; the map already lives in config.json.
        if self._code_map is None:
            self._code_map = CodeTokenMap(self.config.code_to_token_id, self.config.llm_vocab_size, device="cpu")
        return self._code_map

    @property
    def code_to_token_id(self) -> Tensor:
        """(v,) LLM token id of each code."""
        return self.code_map.code_to_token_id

    @property
    def token_id_to_code(self) -> Tensor:
        """(llm_vocab_size,) code of each LLM token id, -1 where the id is not a visual code."""
        return self.code_map.token_id_to_code

    def codes_to_token_ids(self, codes: Tensor) -> Tensor:
        return self.code_map.codes_to_token_ids(codes)

    def token_ids_to_codes(self, token_ids: Tensor) -> Tensor:
        """Inverse of `codes_to_token_ids`; raises UserError for ids that are not visual codes."""
        return self.code_map.token_ids_to_codes(token_ids)

    def is_code_token_id(self, token_ids: Tensor) -> Tensor:
        return self.code_map.is_code_token_id(token_ids)

    @staticmethod
    def aggregate_embeddings(token_ids: Tensor, embeddings: nn.Module | Tensor) -> Tensor:
        """(b, h, w, d) LLM token ids -> (b, h*w, c): what the LLM reads for them (`aggregate_embeddings`)."""
        return aggregate_embeddings(token_ids, embeddings)

    @torch.no_grad()
    def encoding_fingerprint(self) -> str:
        """16 hex digits of a SHA-256 over everything that decides the codes of an image: the encoder's and
        the quantizer stack's tensors (weights, codebook, norm statistics, search basis) and the code ->
        token id map. `unicode-mllm tokenize` stores it with pre-extracted ids so that stage 2 can refuse
        ids written by another tokenizer of the same code shape. The decoder does not enter it.
        """
        digest = hashlib.sha256()
        digest.update(repr(list(self.config.code_to_token_id)).encode())
        for prefix, module in (("encoder", self.encoder), ("stack", self.stack)):
            for name, tensor in sorted(module.state_dict().items()):
                digest.update(f"{prefix}.{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
                digest.update(tensor.detach().to("cpu").reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()[:16]

    def save_pretrained(self, save_directory, **kwargs) -> None:
        """HF save, minus the duplicate keys of the shared codebook (safetensors refuses shared tensors); config.json
        carries `auto_map` and the folder the loader file it names (hf_auto.py: trust_remote_code=True)."""
        if "state_dict" not in kwargs:
            kwargs["state_dict"] = {k: v for k, v in self.state_dict().items() if not _is_shared_codebook_copy(k)}
        self.config.auto_map = auto_map("visual_tokenizer")
        super().save_pretrained(save_directory, **kwargs)
        write_auto_file(save_directory)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs) -> VisualTokenizer:
        """HF load after checking the folder: UserError (one line) for a folder of another kind, a missing
        path, damaged weights or a bad config.json, instead of a randomly initialised model or a traceback."""
        folder = require_visual_tokenizer(pretrained_model_name_or_path)
        if folder is not None and kwargs.get("config") is None:
            kwargs["config"] = _checked_config(folder)
        if folder is not None:
            _check_fits_weights(folder, kwargs["config"])
        with hub_errors(pretrained_model_name_or_path, VISUAL_TOKENIZER, folder):
            return super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)

    # ----- construction from an LLM ----------------------------------------------------------

    @classmethod
    def from_language_codebook(
        cls, codebook: LanguageCodebook, *, sync_codebook: bool = False, **config_kwargs
    ) -> VisualTokenizer:
        """A fresh tokenizer whose codebook is installed from C_L (or, in 'separate' mode, its own).

        sync_codebook: all-reduce EMA statistics across ranks (an explicit bool, computed by the
        caller after the process group exists). config_kwargs: `VisualTokenizerConfig` fields.
        """
        num_codes = config_kwargs.pop("num_codes", 256)  # 'separate' only: the size of its own codebook
        config = VisualTokenizerConfig(llm_width=codebook.llm_width, **config_kwargs)
        mode = config.quantizer.mode
        if mode == "separate":
            # Its own codes become new vocabulary appended after the LLM's (the paper's "separate").
            ids = list(range(codebook.vocab_size, codebook.vocab_size + num_codes))
            config.num_codes, config.code_to_token_id, config.llm_vocab_size = num_codes, ids, ids[-1] + 1
        else:
            config.num_codes = codebook.num_codes
            config.code_to_token_id = codebook.code_to_token_id.tolist()
            config.llm_vocab_size = codebook.vocab_size
        model = cls(config, sync_codebook=sync_codebook)
        if mode == "separate":
            gen = torch.Generator().manual_seed(0)
            model.quantizer.init_codebook_randomly(mean_norm=float(codebook.mean_norm), generator=gen)
        else:
            model.quantizer.install(codebook.embeddings)
        return model


def aggregate_embeddings(token_ids: Tensor, embeddings: nn.Module | Tensor) -> Tensor:
    """(b, h, w, d) LLM token ids -> (b, h*w, c): the sum over depth of the LLM's embeddings of each position's codes.

    The one definition of an image's aggregated reading (`UniCodeMLLM.embed_images` reads through it).
    embeddings: the LLM's input-embedding module (`lm.get_input_embeddings()`): its output is what the LLM
    reads, with any scaling the module applies (Gemma's multiplies by sqrt(hidden size)); or a raw (V, c)
    table. The depth is summed in fp32 (a bf16 LLM would otherwise round after every addition) and the sum
    returned in the embeddings' dtype.
    """
    if isinstance(embeddings, nn.Module):
        embeds = embeddings(token_ids)  # (b, h, w, d, c)
    else:
        embeds = nn.functional.embedding(token_ids, embeddings)
    return rearrange(embeds.float().sum(dim=3).to(embeds.dtype), "b h w c -> b (h w) c")


def _checked_config(folder: Path) -> VisualTokenizerConfig:
    """The folder's config, built and checked here so that a bad value names config.json."""
    try:
        config = VisualTokenizerConfig.from_pretrained(folder)
        config.check()
    except (ConfigError, TypeError, ValueError) as e:  # only the file's values reach this code
        raise UserError(f"{folder / 'config.json'}: {e}; re-save the tokenizer or fix the value") from None
    return config


# train-tokenizer saves the resolved training config beside the weights (runtime/run_files.FINAL_CONFIG_FILENAME).
_TRAIN_CONFIG = "train_config.yaml"


def _check_fits_weights(folder: Path, config: VisualTokenizerConfig) -> None:
    """config.json's sizes fit the weights: every tensor's shape (headers only, against a model built on the meta
    device), and the image size, which no tensor records (the convolutions take any size; a 32 px tokenizer
    run at 64 px reconstructs at ~12 dB), against the training config saved with the weights when present."""
    with torch.device("meta"):
        shapes = {key: tuple(t.shape) for key, t in VisualTokenizer(config).state_dict().items()}
    check_weight_shapes(folder, shapes)
    trained = _trained_image_size(folder / _TRAIN_CONFIG)
    if trained is not None and trained != config.image_size:
        raise UserError(
            f"{folder}: {HF_CONFIG} has image_size {config.image_size} but the weights were trained at {trained} "
            f"({_TRAIN_CONFIG}: model.image_size); restore image_size {trained} in {HF_CONFIG}"
        )


def _trained_image_size(path: Path) -> int | None:
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) if path.is_file() else None
    except (OSError, UnicodeDecodeError, yaml.YAMLError):  # a damaged record is no evidence either way
        return None
    model = data.get("model") if isinstance(data, dict) else None
    size = model.get("image_size") if isinstance(model, dict) else None
    return size if isinstance(size, int) and not isinstance(size, bool) else None


def _is_shared_codebook_copy(key: str) -> bool:
    return re.search(VisualTokenizer._keys_to_ignore_on_load_missing[0], key) is not None


# hf_auto registers the config and a stand-in that imports this module; the real class replaces the stand-in.
AutoModel.register(VisualTokenizerConfig, VisualTokenizer, exist_ok=True)
