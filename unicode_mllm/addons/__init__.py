"""Add-ons of image reading (seed systems), behind the model's one reading hook.

- `compression/`: visual-token compressors between the h*w summed code embeddings and the LM;
- `highres/`: high-resolution view generators (several encoder views of one image, compressed per grid);
- `token_reduction/`: inference-time visual-token reduction of text answers;
- `read_hook.py`: `ReadHook`, what `UniCodeMLLM` builds from the `compressor` and `token_reduction` entries of
  its config and calls when it reads an image; the add-ons' checks and their part of a saved folder live there.

The layer sits below `model/`: it imports only bottom-layer modules (`config`, `constants`, `errors`,
`kv_cache_args`, `registry`, `splice`), never the model. Import from the subpackages; nothing is re-exported
here.
"""
