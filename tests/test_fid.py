"""FID, KID and IS (evaluation/fid.py) against values computed here with numpy/scipy, the Inception weights rule
(local file or torch hub cache, never a download), and the CLI: `eval t2i` on COCO captions, a from-coco folder
and an img2dataset folder, FID beside the shapes score, and `eval tokenizer`'s rFID."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from types import SimpleNamespace

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image
from torch import nn

from unicode_mllm.cli import main
from unicode_mllm.errors import UserError
from unicode_mllm.evaluation.fid import (
    INCEPTION_WEIGHTS_FILES,
    DistributionMetrics,
    FeatureExtractor,
    load_feature_extractor,
)

# transformers deprecations (e.g. the KV-cache argument `past_key_values` -> `cache`, removed in 5.40) must
# fail here, not surface in users' terminals.
pytestmark = pytest.mark.filterwarnings("error::FutureWarning")

SIZE = 48  # every test image is SIZE x SIZE


def run(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def no_inception_cache(tmp_path, monkeypatch):
    """An empty torch hub cache and home: the Inception weights are nowhere, and any download attempt fails."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))

    def no_download(*args, **kwargs):
        raise AssertionError(f"a download was attempted: {args}")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    import torch_fidelity.feature_extractor_inceptionv3 as tf_inception

    monkeypatch.setattr(tf_inception, "load_state_dict_from_url", no_download)
    return tmp_path / "torch_home" / "hub" / "checkpoints"


# ----------------------------------------------------------------------------------------- image sets


def photo_crops(count: int, seed: int, noise: float) -> list[Image.Image]:
    """`count` SIZE x SIZE crops of scikit-image's colour photos at seeded positions, with Gaussian noise."""
    from skimage import data

    photos = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket()]  # (h, w, 3) uint8 each
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        photo = photos[i % len(photos)]
        y = int(rng.integers(0, photo.shape[0] - SIZE))
        x = int(rng.integers(0, photo.shape[1] - SIZE))
        crop = photo[y : y + SIZE, x : x + SIZE].astype(np.float64) + rng.normal(0.0, noise, (SIZE, SIZE, 3))
        out.append(Image.fromarray(np.clip(crop, 0, 255).round().astype(np.uint8)))
    return out


def as_uint8(images: list[Image.Image]) -> torch.Tensor:
    return torch.from_numpy(np.stack([np.asarray(i) for i in images])).permute(0, 3, 1, 2)  # (n, 3, H, W)


class SmallNet(nn.Module):
    """The test's own feature network, in float64 so that batching cannot move the golden values:
    uint8 (n, 3, H, W) -> (features (n, 6), logits (n, 5))."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(5)
        self.conv = nn.Conv2d(3, 6, 5, stride=4, dtype=torch.float64)
        self.head = nn.Linear(6, 5, dtype=torch.float64)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.5)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.tanh(self.conv(x.double() / 255.0)).mean(dim=(2, 3))  # (n, 6)
        return h, self.head(h)  # (n, 6), (n, 5)


@pytest.fixture(scope="module")
def sets():
    real, fake = photo_crops(16, seed=0, noise=4.0), photo_crops(16, seed=1, noise=30.0)
    net = SmallNet().eval()
    with torch.no_grad():
        real_f, _ = net(as_uint8(real))
        fake_f, fake_logits = net(as_uint8(fake))
    return real, fake, net, real_f.numpy(), fake_f.numpy(), fake_logits.numpy()


def measured(real, fake, net, **compute):
    metrics = DistributionMetrics(FeatureExtractor(net, "small-test-net"), batch_size=5)  # 5: several chunks
    metrics.add(real[:7], real=True)
    metrics.add(as_uint8(real[7:]), real=True)  # a uint8 tensor is accepted as well as PIL images
    metrics.add(fake, real=False)
    return metrics.compute(**compute)


def reference_fid(f1: np.ndarray, f2: np.ndarray) -> float:
    """|mu1 - mu2|^2 + Tr(S1 + S2 - 2 sqrtm(S1 S2)) (Heusel et al. 2017), S the unbiased covariances."""
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def reference_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 with k(a, b) = (a.b / d + 1)^3 (Bińkowski et al. 2018): diagonals of Kxx, Kyy left out."""
    d, m = x.shape[1], len(x)
    kxx, kyy, kxy = ((x @ x.T) / d + 1) ** 3, ((y @ y.T) / d + 1) ** 3, ((x @ y.T) / d + 1) ** 3
    same = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
    return float(same - 2 * kxy.sum() / (m * m))


def reference_is(logits: np.ndarray) -> float:
    """exp(E_x KL(p(y|x) || p(y))) over one split (Salimans et al. 2016)."""
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    return float(np.exp((p * (np.log(p) - np.log(p.mean(0, keepdims=True)))).sum(1).mean()))


# ----------------------------------------------------------------------------------------- golden values


def test_fid_kid_is_match_independent_formulas(sets):
    real, fake, net, real_f, fake_f, fake_logits = sets
    # KID on subsets of all 16 images: every subset is the whole set, so the mean is the full-set MMD^2.
    scores = measured(real, fake, net, kid_subsets=3, kid_subset_size=1000, is_splits=1)
    assert scores.num_real == scores.num_fake == 16 and scores.image_size == (SIZE, SIZE)
    assert scores.fid == pytest.approx(reference_fid(fake_f, real_f), rel=1e-6)
    assert scores.fid > 1e-3  # the noisier set is measurably different
    assert scores.kid_subset_size == 16 and scores.kid_subsets == 3
    assert scores.kid_mean == pytest.approx(reference_mmd2(fake_f, real_f), rel=1e-6, abs=1e-12)
    assert scores.kid_std == pytest.approx(0.0, abs=1e-12)
    assert scores.inception_score == pytest.approx(reference_is(fake_logits), rel=1e-9)
    assert scores.is_splits == 1 and scores.inception_score_std == 0.0
    assert scores.features["name"] == "small-test-net" and scores.features["standard"] is False
    assert scores.features["dim"] == 6 and "torch-fidelity" in scores.features["library"]
    assert "not FID" in scores.label and any("not FID/KID/IS" in n for n in scores.notes)


def test_kid_subsets_and_is_splits_follow_the_library_definition(sets):
    """torch-fidelity's KID: `subsets` draws of `subset_size` rows without replacement from each set (generated
    first) by np.random.RandomState(seed), mean and population std of the MMD^2s; IS: the generated logits
    permuted by RandomState(seed), cut into `splits` chunks i*N//splits, mean and std of per-chunk scores."""
    real, fake, net, real_f, fake_f, fake_logits = sets
    scores = measured(real, fake, net, kid_subsets=7, kid_subset_size=6, is_splits=4, seed=11)
    rng = np.random.RandomState(11)
    mmds = []
    for _ in range(7):
        f1 = fake_f[rng.choice(16, 6, replace=False)]
        f2 = real_f[rng.choice(16, 6, replace=False)]
        mmds.append(reference_mmd2(f1, f2))
    assert scores.kid_subset_size == 6
    assert scores.kid_mean == pytest.approx(np.mean(mmds), rel=1e-6)
    assert scores.kid_std == pytest.approx(np.std(mmds), rel=1e-6)
    shuffled = fake_logits[np.random.RandomState(11).permutation(16)]
    per_split = [reference_is(shuffled[i * 16 // 4 : (i + 1) * 16 // 4]) for i in range(4)]
    assert scores.inception_score == pytest.approx(np.mean(per_split), rel=1e-9)
    assert scores.inception_score_std == pytest.approx(np.std(per_split), rel=1e-6)


def test_identical_sets_have_zero_fid_and_sizes_must_match(sets):
    real, _, net, *_ = sets
    metrics = DistributionMetrics(FeatureExtractor(net, "small-test-net"))
    metrics.add(real, real=True)
    metrics.add(real, real=False)
    scores = metrics.compute()
    assert abs(scores.fid) < 1e-8
    with pytest.raises(ValueError, match="centre-crop the real images"):
        metrics.add([Image.new("RGB", (SIZE + 8, SIZE))], real=False)
    few = DistributionMetrics(FeatureExtractor(net, "small-test-net"))
    few.add(real[:1], real=True)
    few.add(real[:5], real=False)
    with pytest.raises(UserError, match="at least 2 real and 2 generated"):
        few.compute()


def test_float_images_are_rounded_like_saved_pngs(sets):
    real, _, net, *_ = sets
    x = as_uint8(real[:4])
    as_float = x.float() / 127.5 - 1.0  # the project's (n, 3, H, W) in [-1, 1]
    a, b = DistributionMetrics(FeatureExtractor(net, "n")), DistributionMetrics(FeatureExtractor(net, "n"))
    a.add(x, real=True)
    b.add(as_float, real=True)
    assert torch.equal(torch.cat(a._features[True]), torch.cat(b._features[True]))


# ----------------------------------------------------------------------------------------- Inception weights


def test_missing_inception_weights_is_a_one_line_error_naming_file_places_and_fix(no_inception_cache):
    with pytest.raises(UserError) as info:
        load_feature_extractor("inception")
    message = str(info.value)
    assert "\n" not in message and INCEPTION_WEIGHTS_FILES[0] in message
    assert str(no_inception_cache) in message and "--inception-weights" in message
    assert "nothing is downloaded" in message
    with pytest.raises(UserError, match="not found"):
        load_feature_extractor("inception", no_inception_cache / "nowhere.pth")
    with pytest.raises(UserError, match="unknown"):
        load_feature_extractor("vgg")


def test_a_wrong_weights_file_is_refused(no_inception_cache, tmp_path):
    bad = tmp_path / "bad.pth"
    torch.save({"conv.weight": torch.zeros(3)}, bad)
    with pytest.raises(UserError, match="is not the FID Inception weights"):
        load_feature_extractor("inception", bad)
    partial = no_inception_cache / INCEPTION_WEIGHTS_FILES[1]  # found in the cache, under torch-fidelity's name
    partial.parent.mkdir(parents=True)
    torch.save({"fc.weight": torch.zeros(1008, 2048), "Mixed_7c.branch_pool.conv.weight": torch.zeros(1)}, partial)
    with pytest.raises(UserError, match="does not fit the FID Inception network"):
        load_feature_extractor("inception")


def random_inception_weights(path, monkeypatch) -> None:
    """A complete state dict of torch-fidelity's Inception with random values, saved at `path` (no download:
    the constructor's own load is skipped while the random module is built)."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    with monkeypatch.context() as patch, torch.random.fork_rng(devices=[]):
        patch.setattr(torch, "load", lambda *args, **kwargs: {})
        patch.setattr(FeatureExtractorInceptionV3, "load_state_dict", lambda self, state, *a, **k: None)
        torch.manual_seed(0)
        net = FeatureExtractorInceptionV3("random", ["2048"], feature_extractor_weights_path="unused")
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), path)


def test_the_inception_path_runs_from_a_cached_file_without_download(no_inception_cache, monkeypatch):
    """The users' path end to end (torch-fidelity's network, 299 px resize, pool features and logits), with a
    random-valued weights file in the torch hub cache standing in for the real one."""
    random_inception_weights(no_inception_cache / INCEPTION_WEIGHTS_FILES[0], monkeypatch)
    extractor = load_feature_extractor("inception")
    assert extractor.weights == no_inception_cache / INCEPTION_WEIGHTS_FILES[0] and extractor.standard
    images = photo_crops(3, seed=2, noise=0.0)
    with torch.no_grad():
        pool, logits = extractor.module(as_uint8(images))
    assert pool.shape == (3, 2048) and logits.shape == (3, 1008)
    metrics = DistributionMetrics(extractor)
    metrics.add(images, real=True)
    metrics.add(photo_crops(3, seed=3, noise=10.0), real=False)
    scores = metrics.compute()
    assert np.isfinite(scores.fid) and scores.features["weights"].endswith(INCEPTION_WEIGHTS_FILES[0])
    assert scores.label == "" and scores.kid_subset_size == 3 and scores.is_splits == 3
    assert any("biased upward" in n for n in scores.notes)  # 3 images for 2048-d features


# ----------------------------------------------------------------------------------------- CLI fixtures

COCO_IMAGES = [  # (id, file name, size (w, h)); 632 has no caption, 724's file is missing
    (139, "000000000139.jpg", (64, 40)),
    (285, "000000000285.jpg", (40, 60)),
    (632, "000000000632.jpg", (50, 50)),
    (724, "000000000724.jpg", None),
    (776, "000000000776.jpg", (32, 32)),
    (785, "000000000785.jpg", (70, 45)),
    (802, "000000000802.jpg", (45, 45)),
]
COCO_ANNOTATIONS = [  # file order is annotation order: image 139's first caption is "A woman in a kitchen."
    (10, 285, "A big brown bear."),
    (3, 139, "  A woman in a kitchen. "),
    (1, 139, "A kitchen with a stove."),
    (7, 724, "A stop sign."),
    (4, 785, "A skier on a slope."),
    (8, 776, "Teddy bears on a shelf."),
    (9, 802, "A white fridge."),
]
FIRST_FOUR = ["A woman in a kitchen.", "A big brown bear.", "Teddy bears on a shelf.", "A skier on a slope."]


@pytest.fixture
def coco(tmp_path):
    """The official layout: annotations/captions_val2017.json and val2017/*.jpg (sizes vary)."""
    images = tmp_path / "val2017"
    images.mkdir()
    crops = iter(photo_crops(len(COCO_IMAGES), seed=4, noise=0.0))
    for _, name, size in COCO_IMAGES:
        crop = next(crops)
        if size is not None:
            crop.resize(size).save(images / name, quality=95)
    captions = tmp_path / "annotations" / "captions_val2017.json"
    captions.parent.mkdir()
    captions.write_text(
        json.dumps(
            {
                "info": {"description": "tiny COCO"},
                "images": [{"id": i, "file_name": n, "width": 1, "height": 1} for i, n, _ in COCO_IMAGES],
                "annotations": [{"id": a, "image_id": i, "caption": c} for a, i, c in COCO_ANNOTATIONS],
            }
        )
    )
    return captions, images


@pytest.fixture
def fake_generate(monkeypatch):
    """generation.generate_images replaced by a recorder that draws a flat 32 px image per prompt."""
    from unicode_mllm import generation

    calls = []

    def fake(model, prompts, *, num_images_per_prompt=1, temperature=1.0, top_k=None, top_p=None, cfg_scale=1.0,
             seed=None, batch_size=8, depth_temperatures=None):  # fmt: skip
        calls.append({"prompts": list(prompts), "seed": seed, "top_k": top_k, "cfg_scale": cfg_scale})
        return SimpleNamespace(images=[Image.new("RGB", (32, 32), (len(p) * 7 % 256, 90, 160)) for p in prompts])

    monkeypatch.setattr(generation, "generate_images", fake)
    return calls


T2I_SAMPLING = ["--batch-size", "2", "--seed", "5", "--top-k", "7", "--cfg-scale", "1.5", "--temperature", "0.9"]


def test_eval_t2i_on_coco_captions_writes_json_and_markdown_next_to_the_model(
    coco, fake_generate, tiny_mllm_dir, tmp_path, capsys
):
    captions, images = coco
    model = tmp_path / "model"
    shutil.copytree(tiny_mllm_dir, model)
    args = ["eval", "t2i", "--model", str(model), "--captions", str(captions), "--images", str(images)]
    code, out, err = run(capsys, *args, "--count", "4", *T2I_SAMPLING, "--feature-extractor", "random-for-tests")
    assert code == 0, err
    assert [p for c in fake_generate for p in c["prompts"]] == FIRST_FOUR
    assert [c["seed"] for c in fake_generate] == [5, 6] and fake_generate[0]["cfg_scale"] == 1.5
    json_path = model / "eval" / "t2i-captions_val2017-n4.json"
    report = json.loads(json_path.read_text())
    assert [r["real"] for r in report["per_image"]] == [
        "000000000139.jpg",
        "000000000285.jpg",
        "000000000776.jpg",
        "000000000785.jpg",
    ]
    assert report["skipped"]["by_reason"] == {"no caption": 1, "missing image": 1}
    assert report["num_images"] == 4 and report["num_real"] == report["num_fake"] == 4
    assert report["image_size"] == [32, 32] and np.isfinite(report["fid"]) and report["fid"] >= 0
    assert report["kid"]["subset_size"] == 4 and report["inception_score"]["splits"] == 4
    assert report["features"]["name"] == "random-for-tests" and report["features"]["standard"] is False
    settings = report["settings"]
    assert settings["temperature"] == 0.9 and settings["top_k"] == 7 and settings["cfg_scale"] == 1.5
    assert settings["seed"] == 5 and settings["num_images"] == 4 and settings["resolution"] == 32
    assert settings["feature_extractor"] == "random-for-tests" and settings["inception_weights"] is None
    assert settings["data"]["captions"] == str(captions.resolve())
    assert settings["data"]["images"] == str(images.resolve())
    table = json_path.with_suffix(".md").read_text()
    assert "| FID |" in table and "| KID |" in table and "| IS |" in table and "random-for-tests" in table
    assert "| cfg_scale | 1.5 |" in table and "| seed | 5 |" in table
    assert "[random-for-tests features: not FID] FID" in out and "4 vs 4 images at 32x32" in out
    assert f"report: {json_path}" in out


def test_eval_t2i_reads_the_same_pairs_from_a_from_coco_folder(coco, fake_generate, tiny_mllm_dir, tmp_path, capsys):
    from unicode_mllm.data.coco_vqa import convert_coco_captions

    captions, images = coco
    shards = tmp_path / "coco_shards"
    convert_coco_captions(captions, images, shards, "val", progress=False)
    out = tmp_path / "r" / "from_coco.json"
    args = ["eval", "t2i", "--model", str(tiny_mllm_dir), "--data", str(shards), "--count", "4", *T2I_SAMPLING]
    code, _, err = run(capsys, *args, "--feature-extractor", "random-for-tests", "--out", str(out))
    assert code == 0, err
    assert [p for c in fake_generate for p in c["prompts"]] == FIRST_FOUR
    report = json.loads(out.read_text())
    assert report["source"]["kind"] == "shards" and report["source"]["split"] == "val"
    assert [r["caption"] for r in report["per_image"]] == FIRST_FOUR and out.with_suffix(".md").is_file()


def write_img2dataset(folder, items) -> None:
    """img2dataset's webdataset layout: 00000.tar with KEY.jpg, KEY.txt (the caption) and KEY.json."""
    folder.mkdir()
    with tarfile.open(folder / "00000.tar", "w") as tar:
        for index, (image, caption) in enumerate(items):
            key = f"{index:09d}"
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG")
            members = {
                f"{key}.jpg": buffer.getvalue(),
                f"{key}.txt": caption.encode(),
                f"{key}.json": json.dumps({"key": key, "status": "success", "caption": None}).encode(),
            }
            for name, payload in members.items():
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))


def test_eval_t2i_reads_an_img2dataset_folder(fake_generate, tiny_mllm_dir, tmp_path, capsys):
    crops = photo_crops(3, seed=6, noise=0.0)
    texts = ["a photo of an astronaut", "a cup of coffee", "a cat"]
    folder = tmp_path / "cc"
    write_img2dataset(folder, [(c.resize((60, 40)), t) for c, t in zip(crops, texts, strict=True)])
    out = tmp_path / "cc.json"
    args = ["eval", "t2i", "--model", str(tiny_mllm_dir), "--data", str(folder), "--count", "10"]
    code, stdout, err = run(capsys, *args, "--feature-extractor", "random-for-tests", "--out", str(out))
    assert code == 0, err
    report = json.loads(out.read_text())
    assert [r["caption"] for r in report["per_image"]] == texts and report["requested"] == 10
    assert report["source"]["split"] == "train" and "3 captions (asked for 10)" in stdout


def test_eval_t2i_on_captions_without_weights_fails_before_loading_the_model(
    coco, no_inception_cache, tmp_path, capsys, monkeypatch
):
    import unicode_mllm.cli.evaluation as cli_evaluation

    monkeypatch.setattr(
        cli_evaluation, "_load_mllm", lambda *a, **k: pytest.fail("the model was loaded before the check")
    )
    captions, images = coco
    args = ["eval", "t2i", "--model", str(tmp_path), "--captions", str(captions), "--images", str(images)]
    code, _, err = run(capsys, *args, "--out", str(tmp_path / "r.json"))
    assert code == 2 and err.count("\n") == 1 and INCEPTION_WEIGHTS_FILES[0] in err and "--inception-weights" in err
    code, _, err = run(capsys, *args, "--inception-weights", str(tmp_path / "missing.pth"))
    assert code == 2 and "missing.pth not found" in err
    code, _, err = run(capsys, "eval", "t2i", "--model", str(tmp_path), "--captions", str(captions))
    assert code == 2 and "go together" in err
    code, _, err = run(capsys, *args, "--start", "3")
    assert code == 2 and "captions are always the first --count images" in err


def test_eval_t2i_real_tiny_model_on_coco(coco, tiny_mllm_dir, tmp_path, capsys):
    """The real generation.generate_images (random weights: the numbers are not the point, the wiring is)."""
    captions, images = coco
    out = tmp_path / "real.json"
    args = ["eval", "t2i", "--model", str(tiny_mllm_dir), "--captions", str(captions), "--images", str(images)]
    code, _, err = run(capsys, *args, "--count", "2", "--batch-size", "2", "--feature-extractor", "random-for-tests",
                       "--out", str(out), "--grid", str(tmp_path / "grid.png"), "--device", "cpu")  # fmt: skip
    assert code == 0, err
    report = json.loads(out.read_text())
    assert report["num_fake"] == 2 and np.isfinite(report["fid"]) and (tmp_path / "grid.png").is_file()


def test_eval_t2i_shapes_keeps_its_score_and_adds_fid_only_when_measurable(
    no_inception_cache, tiny_mllm_dir, tiny_shapes_dir, tmp_path, capsys, monkeypatch
):
    from unicode_mllm import generation
    from unicode_mllm.data.shapes import parse_instruction, render_scene

    def draw(model, prompts, **kwargs):
        return SimpleNamespace(images=[render_scene(parse_instruction(p), 32) for p in prompts])

    monkeypatch.setattr(generation, "generate_images", draw)
    base = ["eval", "t2i", "--model", str(tiny_mllm_dir), "--data", str(tiny_shapes_dir), "--count", "3"]
    code, stdout, err = run(capsys, *base, "--out", str(tmp_path / "plain.json"))
    assert code == 0, err
    plain = json.loads((tmp_path / "plain.json").read_text())
    assert plain["groups"]["heldout"]["overall"] == 1.0 and plain["fid"]["measured"] is False
    assert INCEPTION_WEIGHTS_FILES[0] in plain["fid"]["note"] and "FID not measured" in stdout
    code, stdout, err = run(capsys, *base, "--feature-extractor", "random-for-tests", "--out", str(tmp_path / "f.json"))
    assert code == 0, err
    report = json.loads((tmp_path / "f.json").read_text())
    assert report["groups"] == plain["groups"]
    scores = report["fid"]["scores"]
    assert report["fid"]["measured"] and scores["num_real"] == scores["num_fake"] == 6
    assert np.isfinite(scores["fid"]) and scores["image_size"] == [32, 32]
    assert "against the world's images" in stdout


# ----------------------------------------------------------------------------------------- eval tokenizer


def test_eval_tokenizer_reports_rfid_or_why_not(no_inception_cache, tiny_visual_tokenizer_dir, tiny_shapes_dir,
                                                 tmp_path, capsys):  # fmt: skip
    base = ["eval", "tokenizer", "--tokenizer", str(tiny_visual_tokenizer_dir), "--data", str(tiny_shapes_dir)]
    base += ["--split", "heldout", "--lpips-trunk", "none", "--limit", "6"]
    code, stdout, err = run(capsys, *base, "--out", str(tmp_path / "plain.json"))
    assert code == 0, err
    plain = json.loads((tmp_path / "plain.json").read_text())
    assert plain["rfid"]["measured"] is False and plain["rfid"]["value"] is None
    assert "rFID not measured:" in stdout and INCEPTION_WEIGHTS_FILES[0] in plain["rfid"]["note"]

    out = tmp_path / "rfid.json"
    code, stdout, err = run(capsys, *base, "--feature-extractor", "random-for-tests", "--out", str(out))
    assert code == 0, err
    report = json.loads(out.read_text())
    rfid = report["rfid"]
    assert rfid["measured"] and np.isfinite(rfid["value"]) and rfid["value"] >= 0
    assert rfid["scores"]["num_real"] == rfid["scores"]["num_fake"] == 6
    assert rfid["scores"]["features"]["name"] == "random-for-tests" and "RANDOM network: not FID" in rfid["note"]
    assert "[random-for-tests features: not FID] rFID" in stdout
    assert report["psnr"] == plain["psnr"]  # rFID adds a number, changes none

    code, _, err = run(capsys, *base, "--inception-weights", str(tmp_path / "missing.pth"))
    assert code == 2 and err.count("\n") == 1 and "missing.pth not found" in err
