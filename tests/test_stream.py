"""The streaming loader: order, splitting, shuffling, and counted (never silent) skips."""

from __future__ import annotations

import json
import tarfile
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader

from unicode_mllm.data import stream as stream_module
from unicode_mllm.data.image_io import encode_png, pil_to_tensor
from unicode_mllm.data.shards import write_manifest, write_split
from unicode_mllm.data.stream import SkipDelta, SkipReport, StreamingDataset, collate
from unicode_mllm.errors import UserError
from unicode_mllm.shard_manifest import ShardInfo, SplitSummary


def _image(i: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(i).integers(0, 256, (8, 8, 3), dtype=np.uint8))


def _dataset(root, n: int = 20, maxcount: int = 4):
    records = [{"key": f"k{i:03d}", "image": _image(i), "meta": {"i": i}} for i in range(n)]
    summary = write_split(records, root, "train", maxcount=maxcount, progress=False)
    write_manifest(root, [summary], {"test": True})
    return root


def _raw_shard(root, name: str, samples: list[dict]) -> ShardInfo:
    """A shard written without the checks of write_split, to hold deliberately broken samples."""
    with wds.TarWriter(str(root / name), encoder=False) as sink:
        for sample in samples:
            sink.write(sample)
    return ShardInfo(name, len(samples))


def _keys(items) -> list[str]:
    return [s["key"] for s in items if not s.get("__tally_only__")]


def _read_all(dataset) -> tuple[list[str], SkipReport]:
    report = SkipReport()
    return [s["key"] for s in report.track(dataset)], report


def test_unshuffled_reads_manifest_order_with_exact_pixels(tmp_path):
    ds = StreamingDataset(_dataset(tmp_path), "train", shuffle=False, image_format="tensor")
    samples = list(SkipReport().track(ds))
    assert [s["key"] for s in samples] == [f"k{i:03d}" for i in range(20)]
    assert [s["meta"]["i"] for s in samples] == list(range(20))
    assert samples[0]["shard"] == "train-000000.tar" and samples[-1]["shard"] == "train-000004.tar"
    for i, s in enumerate(samples):
        assert torch.equal(s["image"], pil_to_tensor(_image(i)))


def test_ranks_and_workers_cover_every_sample_once(tmp_path, monkeypatch):
    root = _dataset(tmp_path, n=30, maxcount=3)  # 10 shards over 2 ranks x 2 workers
    seen: list[str] = []
    for rank in range(2):
        for worker in range(2):
            info = SimpleNamespace(id=worker, num_workers=2)
            monkeypatch.setattr(stream_module, "get_worker_info", lambda info=info: info)
            ds = StreamingDataset(root, "train", shuffle=True, seed=3, rank=rank, world_size=2)
            ds.set_epoch(1)
            keys = _keys(ds)
            assert keys, f"rank {rank} worker {worker} got no samples"
            seen += keys
    assert sorted(seen) == [f"k{i:03d}" for i in range(30)]


def test_shuffle_is_deterministic_per_epoch(tmp_path):
    root = _dataset(tmp_path, n=24, maxcount=4)

    def order(seed: int, epoch: int) -> list[str]:
        ds = StreamingDataset(root, "train", seed=seed, shuffle_buffer=8)
        ds.set_epoch(epoch)
        return _keys(ds)

    first = order(0, 0)
    assert first == order(0, 0)
    assert sorted(first) == [f"k{i:03d}" for i in range(24)]
    assert first != sorted(first)
    assert order(0, 1) != first
    assert order(1, 0) != first


def test_bad_samples_are_counted_by_reason(tmp_path):
    good = encode_png(_image(0))
    meta = json.dumps({"has_image": True}).encode()
    samples = [
        {"__key__": "a0", "png": good, "json": meta},
        {"__key__": "a1", "png": good[:60], "json": meta},  # truncated image
        {"__key__": "a2", "png": good, "json": b"{not json"},
        {"__key__": "a3", "json": meta},  # image member missing
        {"__key__": "a4", "png": good},  # json member missing
        {"__key__": "a5", "json": json.dumps({"has_image": False, "q": "text"}).encode()},  # text-only
    ]
    shard = _raw_shard(tmp_path, "train-000000.tar", samples)
    write_manifest(tmp_path, [SplitSummary("train", 6, (shard,))], {})
    keys, report = _read_all(StreamingDataset(tmp_path, "train", shuffle=False))
    assert keys == ["a0", "a5"]
    assert dict(report.skipped) == {"corrupt image": 1, "bad json": 1, "missing image": 1, "missing json": 1}
    assert report.summary() == (
        "skipped 4 of 6 samples (66.67%): 1 corrupt image, 1 bad json, 1 missing image, 1 missing json"
    )
    with pytest.raises(UserError, match=r"train-000000\.tar:a1\.png: corrupt or truncated image.*strict=False"):
        list(StreamingDataset(tmp_path, "train", shuffle=False, strict=True))


def test_wrong_size_is_a_counted_skip(tmp_path):
    big = encode_png(Image.new("RGB", (16, 16)))
    samples = [
        {"__key__": "b0", "png": big, "json": b"{}"},
        {"__key__": "b1", "png": encode_png(_image(1)), "json": b"{}"},
    ]
    write_manifest(tmp_path, [SplitSummary("train", 2, (_raw_shard(tmp_path, "train-000000.tar", samples),))], {})
    keys, report = _read_all(StreamingDataset(tmp_path, "train", shuffle=False, expected_size=8))
    assert keys == ["b1"] and dict(report.skipped) == {"wrong image size": 1}


@pytest.mark.parametrize("cut", ["mid_data", "mid_header", "member_boundary", "missing_file"])
def test_broken_shard_is_counted_and_other_shards_come_through(tmp_path, cut):
    root = _dataset(tmp_path, n=12, maxcount=4)
    broken = root / "train-000001.tar"
    data = broken.read_bytes()
    if cut == "mid_data":  # inside the second image's bytes: tarfile raises, the handler counts it
        with tarfile.open(broken) as tar:
            second_png = [m for m in tar.getmembers() if m.name.endswith(".png")][1]
        broken.write_bytes(data[: second_png.offset_data + 10])
    elif cut == "mid_header":  # inside a member header: tarfile stops early without an error
        broken.write_bytes(data[: len(data) // 2 + 100])
    elif cut == "member_boundary":
        broken.write_bytes(data[:2048])  # tarfile reads this as a clean (short) archive
    else:
        broken.unlink()
    keys, report = _read_all(StreamingDataset(root, "train", shuffle=False))
    expected_good = [f"k{i:03d}" for i in (*range(4), *range(8, 12))]
    assert [k for k in keys if k in expected_good] == expected_good
    assert report.broken_shards == ["train-000001.tar"]
    assert report.num_total == 12  # the manifest's per-shard count accounts for every lost sample
    assert report.delivered + report.num_skipped == 12
    assert report.skipped["lost in broken shard"] >= 1
    assert report.summary().endswith("; 1 broken shard (train-000001.tar)")


def test_max_skip_fraction_raises(tmp_path):
    root = _dataset(tmp_path, n=8, maxcount=4)
    (root / "train-000001.tar").write_bytes(b"\0" * 100)
    with pytest.raises(UserError, match=r"skipped 4 of 8 samples \(50.00%\).*max_skip_fraction=0.25") as err:
        list(SkipReport(max_skip_fraction=0.25).track(StreamingDataset(root, "train", shuffle=False)))
    assert "\n" not in str(err.value)
    report = SkipReport(max_skip_fraction=0.5)
    assert len(list(report.track(StreamingDataset(root, "train", shuffle=False)))) == 4


def test_dataloader_workers_carry_skips_back(tmp_path):
    root = _dataset(tmp_path, n=16, maxcount=4)
    (root / "train-000003.tar").write_bytes((root / "train-000003.tar").read_bytes()[:3000])
    ds = StreamingDataset(root, "train", image_format="tensor", seed=1)
    loader = DataLoader(ds, batch_size=3, num_workers=2, collate_fn=collate)
    report = SkipReport()
    batches = list(report.track(loader))
    keys = [k for b in batches for k in b["key"]]
    assert all(b["image"].shape == (len(b["key"]), 3, 8, 8) for b in batches)
    assert set(keys) >= {f"k{i:03d}" for i in range(12)} and len(keys) == len(set(keys))
    assert report.broken_shards == ["train-000003.tar"]
    assert report.delivered == len(keys) and report.num_total == 16


def test_collate_merges_skips_and_drops_tallies():
    x = torch.zeros(3, 4, 4)
    samples = [
        {"key": "a", "image": x, "meta": {}, "shard": "s", "__skips__": SkipDelta({"bad json": 1})},
        {"key": "b", "image": x, "meta": {}, "shard": "s", "__skips__": None},
        {"__tally_only__": True, "__skips__": SkipDelta({"bad json": 2}, ["t.tar"])},
    ]
    batch = collate(samples)
    assert batch["key"] == ["a", "b"] and batch["image"].shape == (2, 3, 4, 4)
    assert batch["__skips__"].samples == {"bad json": 3} and batch["__skips__"].broken_shards == ["t.tar"]
    with pytest.raises(ValueError, match="different shapes"):
        collate([samples[0], {**samples[1], "image": torch.zeros(3, 2, 2)}])


def test_bad_arguments(tmp_path):
    root = _dataset(tmp_path, n=4)
    with pytest.raises(ValueError, match="give both rank and world_size"):
        StreamingDataset(root, "train", rank=1)
    with pytest.raises(ValueError, match=r"rank must be in \[0, world_size\)"):
        StreamingDataset(root, "train", rank=2, world_size=2)
    with pytest.raises(ValueError, match="needs mode='RGB'"):
        StreamingDataset(root, "train", image_format="tensor", mode="L")
    with pytest.raises(UserError, match=r"no split 'val'; available splits: \['train'\]"):
        StreamingDataset(root, "val")
