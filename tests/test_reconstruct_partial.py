"""`unicode-mllm reconstruct` on a batch with unreadable files: every readable one is done and reported."""

from __future__ import annotations

import numpy as np
from PIL import Image

from unicode_mllm.cli import main
from unicode_mllm.data.image_policy import center_crop
from unicode_mllm.visual_tokenizer.reconstruct import fit_square


def _photo(path, w: int, h: int, seed: int) -> None:
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)


def test_ten_files_one_truncated_reports_nine_and_names_the_tenth(capsys, tiny_visual_tokenizer_dir, tmp_path):
    paths = []
    for i in range(10):
        path = tmp_path / f"p{i}.jpg" if i != 6 else tmp_path / "x.jpg"
        _photo(path, 40 + 7 * i, 36 + 3 * i, i)  # all sizes differ from the tokenizer's 32x32
        paths.append(path)
    bad = paths[6]
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])  # a truncated JPEG, in the middle of the list
    out = tmp_path / "rec"
    args = ["reconstruct", "--model", str(tiny_visual_tokenizer_dir), "-o", str(out), "--lpips-trunk", "none"]
    code = main([*args, "--device", "cpu", *map(str, paths)])
    stdout, err = capsys.readouterr()

    assert code == 2
    lines = stdout.splitlines()
    assert len(lines) == 9 and all("PSNR" in line and " dB" in line for line in lines)
    assert [line.split(":")[0] for line in lines] == [str(p) for p in paths if p != bad]  # every one after x.jpg too
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{p.stem}_recon.png" for p in paths if p != bad)
    assert err.count("\n") == 1 and err.startswith("error: reconstructed 9 of 10 files; could not read 1: ")
    assert f"{bad} (corrupt image)" in err


def test_all_readable_exits_zero_and_two_unreadable_are_both_named(capsys, tiny_visual_tokenizer_dir, tmp_path):
    good = tmp_path / "good.png"
    _photo(good, 50, 40, 0)
    (tmp_path / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (tmp_path / "b.jpg").write_bytes(b"not an image at all")
    args = [
        "reconstruct",
        "--model",
        str(tiny_visual_tokenizer_dir),
        "-o",
        str(tmp_path / "r"),
        "--lpips-trunk",
        "none",
    ]
    assert main([*args, str(good)]) == 0
    capsys.readouterr()
    code = main([*args, str(tmp_path / "a.png"), str(good), str(tmp_path / "b.jpg")])
    stdout, err = capsys.readouterr()
    assert code == 2 and stdout.count("PSNR") == 1
    assert "reconstructed 1 of 3 files; could not read 2: " in err
    assert f"{tmp_path / 'a.png'} (corrupt image), {tmp_path / 'b.jpg'} (corrupt image)" in err


def test_fit_square_is_the_pipeline_centre_crop():
    image = Image.fromarray(np.random.default_rng(3).integers(0, 256, (45, 70, 3), dtype=np.uint8))
    assert np.array_equal(np.asarray(fit_square(image, 32)), np.asarray(center_crop(image, 32)))
    # Shorter side resized first, then the centre cut (the old fit_square cut first, then resized).
    assert fit_square(image, 32).size == (32, 32)
    at_size = image.crop((0, 0, 32, 32))
    assert fit_square(at_size, 32) is at_size
