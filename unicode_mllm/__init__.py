"""unicode-mllm: a unified visual-text codebook tokenizer and generative multimodal LLM (UniCode).

Importing the package registers its two model folders with transformers' Auto classes (`hf_auto.py`), so that
`transformers.AutoModel.from_pretrained(folder)` loads a saved UniCodeMLLM or visual tokenizer. The registration
waits for transformers itself: done now when transformers is already imported, else right after it is (an
import hook), so that `import unicode_mllm` alone (the CLI's `--help`) stays as light as before.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys

__version__ = "0.1.0"


class _RegisterAfterTransformers(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds `transformers` once: loads it with its own loader, then imports `unicode_mllm.hf_auto`."""

    def find_spec(self, fullname, path, target=None):  # type: ignore[no-untyped-def]
        if fullname != "transformers":
            return None
        _remove_hook()
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        self._loader = spec.loader
        spec.loader = self
        return spec

    def create_module(self, spec):  # type: ignore[no-untyped-def]
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:  # type: ignore[no-untyped-def]
        module.__spec__.loader = self._loader  # transformers' lazy module reads its own spec later
        self._loader.exec_module(module)
        _register()


def _register() -> None:
    importlib.import_module("unicode_mllm.hf_auto")


def _remove_hook() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _RegisterAfterTransformers)]


if "transformers" in sys.modules:
    _register()
elif not any(isinstance(f, _RegisterAfterTransformers) for f in sys.meta_path):
    sys.meta_path.insert(0, _RegisterAfterTransformers())
