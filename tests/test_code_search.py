"""The codebook search's options: `search_dtype` (fp32 | bf16 | auto) and chunking over codebook rows.

bf16 rounds the inputs of the x.e matmul, so a code can change only where two codes are nearly equally
near; on a sample where every row's nearest code wins by a wide margin the codes equal fp32's exactly.
"""

from __future__ import annotations

import pytest
import torch

from unicode_mllm.errors import ConfigError
from unicode_mllm.visual_tokenizer import QuantizerSettings
from unicode_mllm.visual_tokenizer.native_quantizer import (
    NativeResidualQuantizer,
    nearest_codes,
    resolve_search_dtype,
    search_agreement,
)


def wide_margin_sample(v: int = 300, c: int = 64, m: int = 500, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A unit-norm (v, c) codebook and (m, c) points each 0.05 from one code: the nearest code wins by far."""
    g = torch.Generator().manual_seed(seed)
    codebook = torch.nn.functional.normalize(torch.randn(v, c, generator=g), dim=-1)
    picks = torch.randint(0, v, (m,), generator=g)
    x = codebook[picks] + 0.05 * torch.nn.functional.normalize(torch.randn(m, c, generator=g), dim=-1)
    return x, codebook


def test_bf16_codes_equal_fp32_codes_where_the_margin_is_large():
    x, codebook = wide_margin_sample()
    exact = nearest_codes(x, codebook)
    low = nearest_codes(x, codebook, search_dtype="bf16", chunk_size=64)
    assert torch.equal(low, exact)
    assert search_agreement(x, codebook, search_dtype="bf16") == 1.0


def test_agreement_is_a_rate_in_zero_one_and_fp32_agrees_with_itself():
    g = torch.Generator().manual_seed(3)
    codebook, x = torch.randn(2000, 256, generator=g), torch.randn(700, 256, generator=g)  # many near-ties
    rate = search_agreement(x, codebook, search_dtype="bf16", sample=300)
    assert 0.0 <= rate <= 1.0
    assert search_agreement(x, codebook, search_dtype="fp32", sample=None) == 1.0
    assert search_agreement(x[:0], codebook) == 1.0


def test_chunking_over_codes_gives_the_codes_of_whole_rows_ties_included():
    g = torch.Generator().manual_seed(4)
    codebook = torch.randn(97, 16, generator=g)
    codebook[60] = codebook[5]  # an exact tie across blocks: the first index must win
    x = torch.cat([torch.randn(40, 16, generator=g), codebook[5:6]])
    whole = nearest_codes(x, codebook, chunk_size=7)
    for block in (1, 10, 33, 97, 500):
        assert torch.equal(nearest_codes(x, codebook, chunk_size=7, code_chunk_size=block), whole), block
    assert int(whole[-1]) == 5


def test_auto_is_fp32_on_the_cpu_and_bf16_on_cuda():
    assert resolve_search_dtype("auto", "cpu") == "fp32"
    assert resolve_search_dtype("auto", torch.device("cuda", 0)) == "bf16"
    assert resolve_search_dtype("bf16", "cpu") == "bf16"
    with pytest.raises(ValueError, match="search_dtype must be one of"):
        resolve_search_dtype("fp16", "cpu")
    with pytest.raises(ValueError, match="search_dtype must be one of"):
        nearest_codes(torch.randn(2, 4), torch.randn(3, 4), search_dtype="int8")
    with pytest.raises(ValueError, match="code_chunk_size must be >= 1"):
        nearest_codes(torch.randn(2, 4), torch.randn(3, 4), code_chunk_size=0)


def test_settings_declare_and_validate_the_search_options():
    assert QuantizerSettings().search_dtype == "auto"
    QuantizerSettings(backend="native", search_dtype="bf16", native_code_chunk_size=4096).validate()
    with pytest.raises(ConfigError, match="quantizer.search_dtype 'half' is unknown"):
        QuantizerSettings(search_dtype="half").validate()
    with pytest.raises(ConfigError, match="search_dtype='bf16' needs quantizer.backend='native'"):
        QuantizerSettings(backend="library", search_dtype="bf16").validate()
    with pytest.raises(ConfigError, match="native_code_chunk_size must be >= 1"):
        QuantizerSettings(backend="native", native_code_chunk_size=0).validate()
    with pytest.raises(ConfigError, match="search_dtype must be one of"):
        NativeResidualQuantizer(dim=8, codebook_size=16, depth=2, decay=0.99, search_dtype="fp8")


@pytest.mark.parametrize("search_dim", [None, 4])
def test_quantizer_codes_with_bf16_search_and_code_blocks_equal_fp32_on_a_wide_margin(search_dim):
    torch.manual_seed(0)
    kwargs = dict(dim=32, codebook_size=64, depth=1, decay=0.99, search_dim=search_dim)
    exact = NativeResidualQuantizer(**kwargs).eval()
    other = NativeResidualQuantizer(**kwargs, search_dtype="bf16", code_chunk_size=10).eval()
    other.load_state_dict(exact.state_dict())
    codebook = torch.nn.functional.normalize(torch.randn(64, 32), dim=-1) * 4.0
    for q in (exact, other):
        q.embed.copy_(codebook[None])
        q.set_search_basis(codebook)
    x = codebook[torch.randint(0, 64, (2, 50))] + 0.01 * torch.randn(2, 50, 32)
    with torch.no_grad():
        assert torch.equal(exact(x)[1], other(x)[1])


def test_code_search_benchmark_reports_one_row(capsys):
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_code_search.py"
    spec = importlib.util.spec_from_file_location("bench_code_search", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--size", "300x32", "--tokens", "64", "--repeats", "1", "--agreement-sample", "64"]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["fp32_ms"] > 0 and row["bf16_ms"] > 0 and 0.0 <= row["agreement_random"] <= 1.0
