"""The HF-style VisualTokenizer: save/load round trips, id maps, aggregation, input checks, CLI tools."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from unicode_mllm.cli import main
from unicode_mllm.errors import UserError
from unicode_mllm.quantizer_settings import QuantizerSettings
from unicode_mllm.visual_tokenizer import LanguageCodebook
from unicode_mllm.visual_tokenizer.modeling import VisualTokenizer

ARCH = dict(image_size=32, ch=8, ch_mult=(1, 2, 2), z_channels=8, num_res_blocks=1)


def language_codebook() -> LanguageCodebook:
    torch.manual_seed(0)
    return LanguageCodebook.from_embedding_matrix(torch.randn(60, 16), list(range(5, 60)))


@pytest.mark.parametrize(
    ("stacking", "depth", "code_shape"), [("rq", 3, (8, 8, 3)), ("hq", None, (4, 4, 5)), ("vq", None, (8, 8, 1))]
)
def test_save_pretrained_round_trip_gives_identical_codes(tmp_path, stacking, depth, code_shape):
    cb = language_codebook()
    model = VisualTokenizer.from_language_codebook(cb, stacking=stacking, depth=depth, **ARCH)
    model.train()
    for _ in range(2):  # move the EMA state away from the install
        model(torch.rand(4, 3, 32, 32) * 2 - 1)
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    codes = model.encode(x)
    assert tuple(codes.shape) == (3, *code_shape) and model.code_shape == code_shape
    model.save_pretrained(tmp_path)
    loaded = VisualTokenizer.from_pretrained(tmp_path)
    assert torch.equal(loaded.encode(x), codes)
    assert torch.equal(loaded.quantizer.codebook, model.quantizer.codebook)
    assert torch.allclose(loaded.decode(codes), model.decode(codes))
    layers = loaded.quantizer.rvq.layers
    assert all(layer._codebook is layers[0]._codebook for layer in layers)  # still one shared codebook
    assert loaded.config.code_to_token_id == list(range(5, 60))


def test_token_id_maps_and_aggregation():
    cb = language_codebook()
    model = VisualTokenizer.from_language_codebook(cb, stacking="rq", depth=2, **ARCH)
    codes = model.encode(torch.rand(2, 3, 32, 32) * 2 - 1)
    ids = model.codes_to_token_ids(codes)
    assert int(ids.min()) >= 5 and torch.equal(model.token_ids_to_codes(ids), codes)
    assert model.is_code_token_id(torch.tensor([0, 4, 5, 59, 60])).tolist() == [False, False, True, True, False]
    with pytest.raises(UserError, match="not visual codes"):
        model.token_ids_to_codes(torch.tensor([3]))
    table = torch.randn(60, 16)
    agg = model.aggregate_embeddings(ids, table)  # (b, h*w, c)
    assert agg.shape == (2, 64, 16)
    assert torch.allclose(agg[1, 9], table[ids[1, 1, 1, 0]] + table[ids[1, 1, 1, 1]])  # raster position 9 = (1, 1)


def test_config_json_keeps_the_quantizer_settings_in_one_nested_entry(tmp_path):
    quantizer = QuantizerSettings(
        mode="dual", decay=0.9, backend="native", search_dim=4, search_dtype="fp32", native_code_chunk_size=7
    )
    model = VisualTokenizer.from_language_codebook(
        language_codebook(), stacking="rq", depth=2, quantizer=quantizer, **ARCH
    )
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["quantizer"] == quantizer.to_dict()
    assert not {"codebook_mode", "decay", "backend", "search_dim"} & set(saved)  # nothing flat besides it
    loaded = VisualTokenizer.from_pretrained(tmp_path)
    assert loaded.config.quantizer == quantizer
    # search_dtype and native_code_chunk_size reach the quantizer from a saved config (they could not before).
    assert loaded.quantizer.rvq.search_dtype == "fp32" and loaded.quantizer.rvq.code_chunk_size == 7
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.equal(loaded.encode(x), model.encode(x))


def test_config_json_of_the_earlier_flat_layout_still_loads(tmp_path):
    model = VisualTokenizer.from_language_codebook(
        language_codebook(), stacking="rq", depth=2, quantizer=QuantizerSettings(backend="native", decay=0.9), **ARCH
    )
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    nested = config.pop("quantizer")
    flat = {"codebook_mode": nested["mode"], "decay": nested["decay"], "eps": nested["eps"], "backend": "native"}
    flat |= {k: nested[k] for k in ("commitment_weight", "norm_matching", "feature_norm_decay", "search_dim")}
    (tmp_path / "config.json").write_text(json.dumps({**config, **flat}, indent=2))  # the layout saved before
    loaded = VisualTokenizer.from_pretrained(tmp_path)
    assert loaded.config.quantizer == QuantizerSettings(backend="native", decay=0.9)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.equal(loaded.encode(x), model.encode(x))
    loaded.save_pretrained(tmp_path / "again")  # re-saving writes the nested layout
    assert json.loads((tmp_path / "again" / "config.json").read_text())["quantizer"]["decay"] == 0.9


@pytest.mark.parametrize(
    ("quantizer", "message"),
    [
        ({"decay": "high"}, "key 'decay' must be float"),
        ({"backend": "faiss"}, "key 'backend' must be one of 'library', 'native'"),
        ({"search_dim": 4}, "needs quantizer.backend='native'"),
        ({"detph": 2}, "unknown keys"),
    ],
)
def test_bad_quantizer_entries_name_config_json_and_the_key(tmp_path, quantizer, message):
    VisualTokenizer.from_language_codebook(language_codebook(), stacking="vq", depth=None, **ARCH).save_pretrained(
        tmp_path
    )
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantizer"].update(quantizer)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=f"config.json: .*{message}"):
        VisualTokenizer.from_pretrained(tmp_path)


def test_wrong_image_size_is_a_clear_error():
    model = VisualTokenizer.from_language_codebook(language_codebook(), stacking="vq", depth=None, **ARCH)
    with pytest.raises(UserError, match=r"images must be \(b, 3, 32, 32\) in \[-1, 1\], got \(1, 3, 16, 16\)"):
        model.encode(torch.zeros(1, 3, 16, 16))
    # any_size: the convolutional encoder codes another size on a proportionally sized grid.
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    big = torch.nn.functional.interpolate(x, size=64)
    assert model.encode(big, any_size=True).shape[1:3] == (2 * model.code_shape[0], 2 * model.code_shape[1])
    assert torch.equal(model.encode(x, any_size=True), model.encode(x))
    with pytest.raises(UserError, match=r"images must be \(b, 3, H, W\)"):
        model.encode(torch.zeros(1, 1, 64, 64), any_size=True)


def test_reconstruct_and_tokenize_commands(tmp_path, capsys, tiny_shapes_dir):
    model = VisualTokenizer.from_language_codebook(language_codebook(), stacking="rq", depth=2, **ARCH)
    model.save_pretrained(tmp_path / "tok")
    Image.new("RGB", (50, 40), (200, 30, 30)).save(tmp_path / "red.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    code = main(
        [
            "reconstruct",
            str(tmp_path / "red.png"),
            "--model",
            str(tmp_path / "tok"),
            "-o",
            str(tmp_path / "rec"),
            "--lpips-trunk",
            "none",
            "--device",
            "auto",  # resolved to cuda, mps or cpu (it once reached torch as the string 'auto')
        ]
    )
    out, err = capsys.readouterr()
    assert code == 0 and "PSNR" in out and (tmp_path / "rec" / "red_recon.png").is_file()
    code = main(["reconstruct", str(tmp_path / "red.png"), "--model", str(tmp_path / "tok"), "--device", "tpu"])
    _, err = capsys.readouterr()
    assert code == 2 and "device 'tpu' is unknown" in err and err.count("\n") == 1
    code = main(["reconstruct", str(tmp_path / "broken.png"), "--model", str(tmp_path / "tok")])
    _, err = capsys.readouterr()
    assert code == 2 and "broken.png" in err and err.count("\n") == 1

    code = main(
        [
            "tokenize",
            "--model",
            str(tmp_path / "tok"),
            "--shards",
            str(tiny_shapes_dir),
            "--out",
            str(tmp_path / "codes"),
            "--split",
            "val",
        ]
    )
    out, err = capsys.readouterr()
    assert code == 0, err
    from unicode_mllm.data.shards import iter_split_records

    records = list(iter_split_records(tmp_path / "codes", "val"))
    assert len(records) == 16
    meta = json.loads(records[0]["json"])
    assert meta["code_shape"] == [8, 8, 2] and len(meta["visual_token_ids"]) == 8 * 8 * 2
    assert all(5 <= t < 60 for t in meta["visual_token_ids"])
