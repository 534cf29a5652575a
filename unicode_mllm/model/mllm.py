"""`UniCodeMLLM`: a Hugging Face causal LM that reads and writes images through its own vocabulary.

The model holds the LM (any `AutoModelForCausalLM`, optionally wrapped by peft LoRA), the frozen
`VisualTokenizer` whose codes are LM token ids, and the text tokenizer. It is a composition rather than
a `LlamaForCausalLM` subclass (LLaVA's way): composition keeps the LM loadable by
`AutoModelForCausalLM.from_pretrained` for any architecture, lets peft wrap and unwrap it (LoRA
merge for export) without a model class of our own, and still never copies HF's forward.

Reading an image: its (h, w, d) token ids go through the LM's *own current* input-embedding layer and
are either summed over depth (`aggregated`, h*w embeddings, the default) or laid out one per id
(`interleaved`, h*w*d embeddings), then spliced over the placeholder span (`unicode_mllm/splice.py`).
Writing an image: the LM emits `<img>` + h*w*d ids (raster order, depth-first) + `</img>` as ordinary
next tokens (`token_layout.py` gives the order).

Add-ons (`unicode_mllm.addons`): every image read goes through one hook, `read_hook` (`addons/read_hook.py`),
built from the config's `compressor` (a visual-token compressor between the h*w summed embeddings and the LM;
an image read then takes `tokens_per_image` slots) and `token_reduction` (inference-time reduction of the
image spans of *text answers*). The hook holds their checks and their part of the saved folder; its modules
(the compressor) are submodules of the model, so stage 2 trains and checkpoints them with the LM. Neither
touches what the LM writes (text-to-image and decompression targets keep all h*w*d codes).

Saved layout (`save_pretrained`):

    unicode_mllm.json        reading mode, code shape, special token ids, template, where the tokenizer is,
                             the add-ons: the compressor (name + options) and the token-reduction config
    config.json              the Hugging Face entry (`hf_auto.UniCodeMLLMHFConfig`: model_type "unicode_mllm",
                             auto_map, the name of unicode_mllm.json): `transformers.AutoModel.from_pretrained`
                             loads the folder after `import unicode_mllm` (or with trust_remote_code=True)
    modeling_unicode_mllm.py the loader file auto_map names (imports the installed package; hf_auto.py)
    lm/                      the LM and the text tokenizer (AutoModelForCausalLM / AutoTokenizer load it)
    visual_tokenizer/        a copy of the visual tokenizer (unless saved by reference)
    compressor.safetensors   the compressor's weights (only when it has parameters)

Folders saved before config.json existed (unicode_mllm.json only) load as before with `from_pretrained`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from einops import rearrange
from torch import Tensor, nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from unicode_mllm.addons.compression import CompressorConfig
from unicode_mllm.addons.read_hook import AddonsConfig, ReadHook
from unicode_mllm.addons.token_reduction.config import TokenReductionConfig
from unicode_mllm.constants import IGNORE_INDEX, IMAGE_PLACEHOLDER_ID
from unicode_mllm.errors import UserError
from unicode_mllm.hf_auto import UniCodeMLLMHFConfig, auto_map, write_auto_file
from unicode_mllm.model.special_tokens import MultimodalTokenIds, add_multimodal_tokens
from unicode_mllm.runtime.model_folders import (
    LANGUAGE_MODEL,
    MLLM_CONFIG,
    hub_errors,
    read_json_object,
    require_language_model,
    require_mllm,
)
from unicode_mllm.splice import SplicedInputs, splice_image_embeddings
from unicode_mllm.token_layout import READING_MODES, ReadingMode  # shared with data/
from unicode_mllm.visual_tokenizer.modeling import VisualTokenizer, aggregate_embeddings

log = logging.getLogger(__name__)

CONFIG_NAME = MLLM_CONFIG
LM_DIR = "lm"
VISUAL_TOKENIZER_DIR = "visual_tokenizer"
HF_CONFIG_NAME = "config.json"
# What transformers' Auto classes pass on to a registered model's from_pretrained besides the folder.
_AUTO_KWARGS = (
    "config",
    "trust_remote_code",
    "adapter_kwargs",
    "cache_dir",
    "force_download",
    "local_files_only",
    "token",
    "revision",
    "proxies",
    "subfolder",
    "code_revision",
    "_from_auto",
    "_commit_hash",
)
FORMAT_VERSION = 1  # compressor and token_reduction are optional keys: older files load with identity / off


@dataclass(frozen=True)
class LoraSettings:
    """peft LoRA on the LM; defaults are the reference code's (r 128, alpha 256)."""

    r: int = 128
    alpha: int = 256
    dropout: float = 0.05
    target_modules: str | tuple[str, ...] = "all-linear"  # peft's shortcut: every linear layer but the LM head

    def to_peft(self) -> Any:
        from peft import LoraConfig

        if self.r < 1:
            raise ValueError(f"LoRA rank r must be >= 1, got {self.r}")
        targets = self.target_modules if isinstance(self.target_modules, str) else list(self.target_modules)
        return LoraConfig(
            r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout, target_modules=targets, task_type="CAUSAL_LM"
        )


@dataclass(frozen=True)
class UniCodeMLLMConfig:
    """What `unicode_mllm.json` records next to the LM."""

    reading: ReadingMode
    code_shape: tuple[int, int, int]
    token_ids: MultimodalTokenIds
    template: str = "plain"
    visual_tokenizer: str = VISUAL_TOKENIZER_DIR  # relative to the saved folder, or an absolute reference
    format_version: int = FORMAT_VERSION
    extra: dict[str, Any] = field(default_factory=dict)  # free-form notes (training run, data mixture)
    addons: AddonsConfig = field(default_factory=AddonsConfig)  # stored as its own top-level entries

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version,
            "reading": self.reading,
            "code_shape": list(self.code_shape),
            "token_ids": self.token_ids.to_dict(),
            "template": self.template,
            "visual_tokenizer": self.visual_tokenizer,
            **self.addons.to_dict(),
            "extra": self.extra,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = CONFIG_NAME) -> UniCodeMLLMConfig:
        if data.get("format_version") != FORMAT_VERSION:
            raise UserError(f"{source}: format_version {data.get('format_version')!r}, expected {FORMAT_VERSION}")
        if data.get("reading") not in READING_MODES:
            raise UserError(f"{source}: reading {data.get('reading')!r} is unknown; one of {list(READING_MODES)}")
        _check_config_types(data, source)
        addons = AddonsConfig.from_dict(data, source)  # ConfigError naming the key
        try:
            token_ids = MultimodalTokenIds.from_dict(data["token_ids"])
        except TypeError as e:  # unknown or missing names
            raise UserError(f"{source}: token_ids {data['token_ids']} do not fit ({e}); re-save the model") from None
        return cls(
            reading=data["reading"],
            code_shape=tuple(data["code_shape"]),  # type: ignore[arg-type]
            token_ids=token_ids,
            template=data.get("template", "plain"),
            visual_tokenizer=data.get("visual_tokenizer", VISUAL_TOKENIZER_DIR),
            extra=dict(data.get("extra", {})),
            addons=addons,
        )


def _check_config_types(data: dict[str, Any], source: str) -> None:
    """UserError naming the key for a hand-edited or damaged `unicode_mllm.json` (else a KeyError/TypeError later)."""
    for key in ("code_shape", "token_ids"):
        if key not in data:
            raise UserError(f"{source}: {key} is missing; re-save the model")
    shape = data["code_shape"]
    if not (isinstance(shape, list) and len(shape) == 3 and all(type(n) is int and n > 0 for n in shape)):
        raise UserError(f"{source}: code_shape must be 3 positive ints [h, w, d], got {shape!r}; re-save the model")
    ids = data["token_ids"]
    if not (isinstance(ids, dict) and all(v is None or type(v) is int for v in ids.values())):
        raise UserError(f"{source}: token_ids must map names to ints, got {ids!r}; re-save the model")
    for key, kind in (("template", str), ("visual_tokenizer", str), ("extra", dict)):
        if key in data and not isinstance(data[key], kind):
            raise UserError(f"{source}: {key} must be a {kind.__name__}, got {data[key]!r}; re-save the model")


class UniCodeMLLM(nn.Module):
    """A causal LM + a frozen visual tokenizer whose codes are the LM's token ids.

    lm: a HF causal LM (`AutoModelForCausalLM`); its embeddings are grown if the text tokenizer needs
        new special tokens (existing rows kept, see `model/special_tokens.py`).
    visual_tokenizer: frozen here (no gradients, always in eval mode).
    text_tokenizer: gains `<img>`, `</img>`, `<image>` and a pad token where missing.
    reading: `aggregated` (h*w embeddings per image read) or `interleaved` (h*w*d).
    template: the conversation template name the data uses (recorded, see `data/conversation.py`).
    compressor, token_reduction: the add-ons of image reads (default `identity` and off), handed to the
        reading hook `read_hook`, whose modules become submodules (`compressor`, trained in stage 2 with the
        LM when it has parameters).

    Raises UserError when the visual codebook's width is not the LM's, a code's token id is not one of
    the LM's ids, or the add-ons do not fit the model (`ReadHook`).
    """

    def __init__(
        self,
        lm: PreTrainedModel,
        visual_tokenizer: VisualTokenizer,
        text_tokenizer: Any,
        *,
        reading: ReadingMode = "aggregated",
        template: str = "plain",
        visual_tokenizer_source: str | None = None,
        compressor: CompressorConfig | None = None,
        token_reduction: TokenReductionConfig | None = None,
    ):
        super().__init__()
        if reading not in READING_MODES:
            raise UserError(f"reading {reading!r} is unknown; choose one of {list(READING_MODES)}")
        width = lm.get_input_embeddings().weight.shape[1]
        if visual_tokenizer.config.llm_width != width:
            raise UserError(
                f"visual tokenizer codebook width {visual_tokenizer.config.llm_width} differs from the LM's embedding "
                f"width {width}; build the tokenizer from this LM's embeddings"
            )
        self.lm = lm
        self.visual_tokenizer = visual_tokenizer
        self.text_tokenizer = text_tokenizer
        self.token_ids = add_multimodal_tokens(text_tokenizer, lm, visual_tokenizer.code_to_token_id)
        vocab = lm.get_input_embeddings().weight.shape[0]
        top = int(visual_tokenizer.code_to_token_id.max())
        if top >= vocab:  # add_multimodal_tokens grows the LM; this guards a base LM it could not grow
            raise UserError(f"visual code token id {top} is outside the LM vocabulary of {vocab} rows")
        self.reading: ReadingMode = reading
        self.template = template
        self.visual_tokenizer_source = visual_tokenizer_source
        visual_tokenizer.requires_grad_(False)
        visual_tokenizer.eval()
        h, w, _ = self.code_shape
        num_layers = getattr(lm.config, "num_hidden_layers", None)
        self.read_hook = ReadHook(
            AddonsConfig(compressor or CompressorConfig(), token_reduction or TokenReductionConfig()),
            reading=reading,
            grid_hw=(h, w),
            uncompressed_tokens=self.uncompressed_tokens_per_image,
            width=width,
            num_layers=num_layers if isinstance(num_layers, int) else None,
        )
        for name, module in self.read_hook.modules().items():  # their parameters train and save with the model
            self.add_module(name, module)

    # ----- sizes and config -----------------------------------------------------------------------

    @property
    def code_shape(self) -> tuple[int, int, int]:
        return tuple(self.visual_tokenizer.code_shape)  # type: ignore[return-value]

    @property
    def uncompressed_tokens_per_image(self) -> int:
        """Embeddings of an uncompressed read: h*w (aggregated) or h*w*d (interleaved)."""
        vt = self.visual_tokenizer
        return vt.num_read_tokens if self.reading == "aggregated" else vt.num_write_tokens

    @property
    def tokens_per_image(self) -> int:
        """Embeddings one read image takes (`ReadHook.tokens_per_image`: the compressor's span)."""
        return self.read_hook.tokens_per_image

    @property
    def token_reduction(self) -> TokenReductionConfig:
        """Inference-time token reduction of text answers, the reading hook's (checked when set)."""
        return self.read_hook.token_reduction

    @token_reduction.setter
    def token_reduction(self, config: TokenReductionConfig) -> None:
        self.read_hook.token_reduction = config

    @property
    def num_write_tokens(self) -> int:
        return self.visual_tokenizer.num_write_tokens

    @property
    def config(self) -> UniCodeMLLMConfig:
        return UniCodeMLLMConfig(
            reading=self.reading,
            code_shape=self.code_shape,
            token_ids=self.token_ids,
            template=self.template,
            addons=self.read_hook.config,
        )

    def train(self, mode: bool = True) -> UniCodeMLLM:
        super().train(mode)
        self.visual_tokenizer.eval()  # frozen: its EMA codebook must never move during stage 2
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    # ----- images ------------------------------------------------------------------------------

    @torch.no_grad()
    def encode_images(self, pixel_values: Tensor) -> Tensor:
        """(n, 3, H, W) in [-1, 1] -> (n, h, w, d) int64 LLM token ids."""
        return self.visual_tokenizer.codes_to_token_ids(self.visual_tokenizer.encode(pixel_values))

    def embed_images(self, image_token_ids: Tensor) -> Tensor:
        """(n, h, w, d) LLM token ids -> (n, s, c) with the LM's current input embeddings.

        s = h*w (sum over depth) for `aggregated`, h*w*d (raster order, depth-first) for `interleaved`.
        Raises ValueError for a wrong shape or an id that is not a visual code.
        """
        if image_token_ids.ndim != 4 or tuple(image_token_ids.shape[1:]) != self.code_shape:
            shape = ", ".join(map(str, self.code_shape))
            raise ValueError(f"image_token_ids must be (n, {shape}), got {tuple(image_token_ids.shape)}")
        if not bool(self.visual_tokenizer.is_code_token_id(image_token_ids).all()):
            raise ValueError("image_token_ids hold ids that are not visual codes (codes passed for token ids?)")
        if self.reading == "aggregated":  # the sum over depth, in fp32 (the public API's own function)
            return aggregate_embeddings(image_token_ids, self.lm.get_input_embeddings())
        embeds = self.lm.get_input_embeddings()(image_token_ids)  # (n, h, w, d, c)
        return rearrange(embeds, "n h w d c -> n (h w d) c")

    def read_image_embeds(
        self, image_token_ids: Tensor, image_is_uncompressed: Tensor | None = None
    ) -> Tensor | list[Tensor]:
        """(n, h, w, d) LLM token ids -> the embeddings the LM reads for them, through the reading hook.

        Returns (n, s, c) with s = `tokens_per_image` (`embed_images` itself without a compressor), or a list
        of n (s_i, c) tensors when `image_is_uncompressed` (n,) bool marks some, not all, images to be read
        uncompressed (h*w, decompression samples).
        """
        return self.read_hook.read(self.embed_images(image_token_ids), image_is_uncompressed)

    def build_inputs(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        image_token_ids: Tensor | None = None,
        images_per_sample: Tensor | None = None,
        image_is_uncompressed: Tensor | None = None,
    ) -> SplicedInputs:
        """(b, t) ids with placeholder spans + (n, h, w, d) images -> inputs_embeds, mask, positions.

        image_is_uncompressed: (n,) bool, images whose span holds the uncompressed grid (see `read_image_embeds`).
        """
        image_embeds = None
        if image_token_ids is not None and image_token_ids.shape[0] > 0:
            image_embeds = self.read_image_embeds(image_token_ids.to(input_ids.device), image_is_uncompressed)
        return self.splice_image_embeds(input_ids, image_embeds, attention_mask, images_per_sample)

    def splice_image_embeds(
        self,
        input_ids: Tensor,
        image_embeds: Tensor | list[Tensor] | None,
        attention_mask: Tensor | None = None,
        images_per_sample: Tensor | None = None,
    ) -> SplicedInputs:
        """`splice_image_embeddings` with the LM's current input embeddings and this model's pad id.

        input_ids: (b, t) with placeholder spans; image_embeds: (n, s, c) or n (s_i, c) tensors, already read
        (`read_image_embeds`, or another reader such as the high-res views). Raises ValueError when they do not
        fit the spans.
        """
        return splice_image_embeddings(
            input_ids,
            image_embeds,
            self.lm.get_input_embeddings(),
            attention_mask,
            pad_token_id=self.token_ids.pad,
            images_per_sample=images_per_sample,
        )

    # ----- the LM --------------------------------------------------------------------------------

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        labels: Tensor | None = None,
        image_token_ids: Tensor | None = None,
        images_per_sample: Tensor | None = None,
        image_is_uncompressed: Tensor | None = None,
        position_ids: Tensor | None = None,
        **lm_kwargs: Any,
    ) -> Any:
        """Splice the images in and run the LM; returns the LM's output (logits (b, t, V), loss).

        input_ids: (b, t) with IMAGE_PLACEHOLDER_ID spans; labels: (b, t), IGNORE_INDEX where not
        trained (the LM shifts them itself); image_token_ids: (n, h, w, d) LLM token ids;
        image_is_uncompressed: (n,) bool, reads that bypass the compressor (decompression samples).
        position_ids: (b, t) for packed rows (`data/packing.py`), restarting at 0 at every sample; the LM then
        gets no 2D mask and builds its block-diagonal causal mask from the restarts (`attention_mask` still
        marks the padding for the splice's checks). None: positions from `attention_mask`.
        Raises ValueError when a placeholder slot carries a label, or the images do not fit the spans.
        """
        if labels is not None:
            if labels.shape != input_ids.shape:
                raise ValueError(f"labels {tuple(labels.shape)} and input_ids {tuple(input_ids.shape)} differ")
            if bool(((input_ids == IMAGE_PLACEHOLDER_ID) & (labels != IGNORE_INDEX)).any()):
                raise ValueError("labels on image placeholder slots: an image the LM reads is never a target")
        spliced = self.build_inputs(
            input_ids, attention_mask, image_token_ids, images_per_sample, image_is_uncompressed
        )
        if position_ids is not None:  # packed rows: the restarting positions are the mask
            # transformers reads sequence boundaries from the positions only with no 2D mask and no KV cache
            return self.lm(
                inputs_embeds=spliced.inputs_embeds,
                attention_mask=None,
                position_ids=position_ids.to(spliced.inputs_embeds.device),
                labels=labels,
                **{**lm_kwargs, "use_cache": False},
            )
        return self.forward_spliced(spliced, labels, **lm_kwargs)

    def forward_spliced(self, spliced: SplicedInputs, labels: Tensor | None = None, **lm_kwargs: Any) -> Any:
        """Run the LM on already spliced inputs (embeddings, mask, positions); returns the LM's output."""
        return self.lm(
            inputs_embeds=spliced.inputs_embeds,
            attention_mask=spliced.attention_mask,
            position_ids=spliced.position_ids,
            labels=labels,
            **lm_kwargs,
        )

    # ----- LoRA ----------------------------------------------------------------------------------

    @property
    def has_lora(self) -> bool:
        from peft import PeftModel

        return isinstance(self.lm, PeftModel)

    def enable_lora(self, settings: LoraSettings | None = None) -> None:
        """Wrap the LM with peft LoRA adapters; only the adapters train afterwards."""
        from peft import get_peft_model

        if self.has_lora:
            raise UserError("LoRA is already enabled on this model")
        self.lm = get_peft_model(self.lm, (settings or LoraSettings()).to_peft())

    def merge_lora(self) -> None:
        """Fold the LoRA adapters into the LM weights and drop peft (for export and fast inference)."""
        if not self.has_lora:
            raise UserError("no LoRA adapters to merge; call enable_lora first")
        self.lm = self.lm.merge_and_unload()

    def save_lora_adapter(self, path: str | Path) -> None:
        """Save only the adapters (peft format); reload them with `load_lora_adapter` on the same base.

        When the embedding table trains beside the adapters (stage 2's `lora.train_embeddings`: the codebook the
        LLM reads images through), its rows go into the adapter file too (peft's `save_embedding_layers`), so
        the folder holds everything the run changed."""
        if not self.has_lora:
            raise UserError("no LoRA adapters to save; call enable_lora first")
        embeddings_trained = bool(self.lm.get_input_embeddings().weight.requires_grad)
        self.lm.save_pretrained(str(path), save_embedding_layers=embeddings_trained)

    def load_lora_adapter(self, path: str | Path, is_trainable: bool = False) -> None:
        """Attach adapters saved by `save_lora_adapter` to this (base) model."""
        from peft import PeftModel

        if self.has_lora:
            raise UserError("LoRA is already enabled on this model; load adapters onto the base model")
        self.lm = PeftModel.from_pretrained(self.lm, str(path), is_trainable=is_trainable)

    # ----- save / load ---------------------------------------------------------------------------

    def save_pretrained(self, path: str | Path, *, copy_visual_tokenizer: bool = True) -> None:
        """Write the layout in the module docstring. The visual tokenizer is copied, or, with
        `copy_visual_tokenizer=False`, referenced by the absolute path it was loaded from.

        Raises UserError while LoRA adapters are unmerged (merge_lora() for export, or save_lora_adapter).
        """
        if self.has_lora:
            raise UserError(
                "LoRA adapters are not merged; call merge_lora() before save_pretrained, or save_lora_adapter()"
            )
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.lm.save_pretrained(path / LM_DIR)
        self.text_tokenizer.save_pretrained(path / LM_DIR)
        if copy_visual_tokenizer:
            self.visual_tokenizer.save_pretrained(path / VISUAL_TOKENIZER_DIR)
            reference = VISUAL_TOKENIZER_DIR
        else:
            if self.visual_tokenizer_source is None:
                raise UserError("the visual tokenizer was not loaded from a folder; save it with copy_visual_tokenizer")
            reference = str(Path(self.visual_tokenizer_source).resolve())
        config = replace(self.config, visual_tokenizer=reference)
        self.read_hook.save(path)
        (path / CONFIG_NAME).write_text(json.dumps(config.to_dict(), indent=2) + "\n")
        UniCodeMLLMHFConfig(mllm_config=CONFIG_NAME, auto_map=auto_map("mllm")).to_json_file(path / HF_CONFIG_NAME)
        write_auto_file(path)

    @classmethod
    def from_components(
        cls,
        lm_name_or_path: str | Path,
        visual_tokenizer_path: str | Path,
        *,
        reading: ReadingMode = "aggregated",
        template: str = "plain",
        compressor: CompressorConfig | None = None,
        token_reduction: TokenReductionConfig | None = None,
        **lm_kwargs: Any,
    ) -> UniCodeMLLM:
        """Build from a HF causal LM (with its text tokenizer) and a saved visual tokenizer (stage 2 start).

        A compressor with parameters starts from its fresh initialisation (train it in stage 2).
        """
        # The small tokenizer first, so that a bad folder fails before the LM loads. Both are checked up front: a
        # folder of another kind, a missing path or damaged files is a one-line UserError.
        visual_tokenizer = VisualTokenizer.from_pretrained(str(visual_tokenizer_path))
        with hub_errors(lm_name_or_path, LANGUAGE_MODEL, require_language_model(lm_name_or_path)):
            lm = AutoModelForCausalLM.from_pretrained(str(lm_name_or_path), **lm_kwargs)
            text_tokenizer = AutoTokenizer.from_pretrained(str(lm_name_or_path))
        return cls(
            lm,
            visual_tokenizer,
            text_tokenizer,
            reading=reading,
            template=template,
            visual_tokenizer_source=str(visual_tokenizer_path),
            compressor=compressor,
            token_reduction=token_reduction,
        )

    @classmethod
    def from_pretrained(cls, path: str | Path, *model_args: Any, **lm_kwargs: Any) -> UniCodeMLLM:
        """Load what `save_pretrained` wrote. lm_kwargs go to `AutoModelForCausalLM.from_pretrained`, less the
        ones `transformers.AutoModel.from_pretrained` adds (its config, hub settings: the folder is local).

        Raises UserError when the folder is not a saved UniCodeMLLM or its parts disagree with the config.
        """
        if model_args:
            raise TypeError(f"UniCodeMLLM.from_pretrained takes the folder only, got extra {model_args!r}")
        for key in _AUTO_KWARGS:
            lm_kwargs.pop(key, None)
        path = require_mllm(path)  # names the folder's kind when it is a tokenizer, an LM or no model at all
        config_file = path / CONFIG_NAME
        config = UniCodeMLLMConfig.from_dict(read_json_object(config_file), source=str(config_file))
        vt_path = Path(config.visual_tokenizer)
        vt_path = vt_path if vt_path.is_absolute() else path / vt_path
        for part, what in ((path / LM_DIR, "language model"), (vt_path, "visual tokenizer")):
            if not part.is_dir():  # a part missing from a copied folder, not a hub id to look up
                raise UserError(f"{path} is missing its {what} folder {part}; re-copy or re-save the model")
        model = cls.from_components(
            path / LM_DIR,
            vt_path,
            reading=config.reading,
            template=config.template,
            compressor=config.addons.compressor,
            token_reduction=config.addons.token_reduction,
            **lm_kwargs,
        )
        model.visual_tokenizer_source = str(vt_path)
        model.read_hook.load(path)
        if model.code_shape != tuple(config.code_shape):
            raise UserError(
                f"{config_file}: code_shape {config.code_shape} but the visual tokenizer's is {model.code_shape}"
            )
        if model.token_ids != config.token_ids:
            raise UserError(
                f"{config_file}: special token ids {config.token_ids.to_dict()} but the saved text tokenizer gives "
                f"{model.token_ids.to_dict()}"
            )
        return model
