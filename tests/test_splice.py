"""The vectorised image-embedding splice: placement, padding sides, positions, count checks, no side effects."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from unicode_mllm.constants import IGNORE_INDEX, IMAGE_PLACEHOLDER_ID
from unicode_mllm.splice import image_counts, position_ids_from_attention_mask, splice_image_embeddings

P = IMAGE_PLACEHOLDER_ID
S = 3  # slots per image
PAD = 0


def rows() -> list[list[int]]:
    """Row 0 reads two images, row 1 one image, row 2 none; lengths differ."""
    return [
        [5, 6, P, P, P, 7, P, P, P, 8],
        [9, P, P, P, 10, 11],
        [12, 13, 14],
    ]


def pad(batch: list[list[int]], side: str) -> tuple[torch.Tensor, torch.Tensor]:
    t = max(len(r) for r in batch)
    ids = torch.full((len(batch), t), PAD)
    mask = torch.zeros((len(batch), t), dtype=torch.long)
    for i, r in enumerate(batch):
        cols = slice(0, len(r)) if side == "right" else slice(t - len(r), t)
        ids[i, cols] = torch.tensor(r)
        mask[i, cols] = 1
    return ids, mask


@pytest.mark.parametrize("side", ["right", "left"])
def test_image_embeddings_land_exactly_on_the_placeholders(side):
    torch.manual_seed(0)
    table = nn.Embedding(20, 8)
    images = torch.randn(3, S, 8)  # row 0's two images, then row 1's
    ids, mask = pad(rows(), side)
    ids_before, mask_before = ids.clone(), mask.clone()
    out = splice_image_embeddings(ids, images, table, mask, pad_token_id=PAD, images_per_sample=[2, 1, 0])
    assert out.inputs_embeds.shape == (3, ids.shape[1], 8)
    slots = (ids == P).nonzero().tolist()  # row-major: row 0 image 0, row 0 image 1, row 1 image 0
    expected_images = images.reshape(-1, 8)
    for k, (r, c) in enumerate(slots):
        assert torch.equal(out.inputs_embeds[r, c], expected_images[k])
    text = ids != P
    assert torch.equal(out.inputs_embeds[text], table(ids[text]))
    # Positions count real tokens only: the same for the left- and right-padded layouts.
    for r, row in enumerate(rows()):
        real = out.attention_mask[r] == 1
        assert out.position_ids[r][real].tolist() == list(range(len(row)))
    # The caller's tensors are untouched.
    assert torch.equal(ids, ids_before) and torch.equal(mask, mask_before)


def test_gradients_reach_the_image_embeddings_and_the_table():
    table = nn.Embedding(20, 8)
    images = torch.randn(3, S, 8, requires_grad=True)
    ids, mask = pad(rows(), "right")
    out = splice_image_embeddings(ids, images, table, mask)
    out.inputs_embeds.sum().backward()
    assert torch.equal(images.grad, torch.ones_like(images))
    assert float(table.weight.grad[5].abs().sum()) > 0 and float(table.weight.grad[19].abs().sum()) == 0


def test_unequal_image_counts_raise_with_the_numbers():
    table = nn.Embedding(20, 8)
    ids, mask = pad(rows(), "right")
    with pytest.raises(ValueError, match=r"9 image placeholders in the batch but 2 images \(3 slots each\)"):
        splice_image_embeddings(ids, torch.randn(2, S, 8), table, mask)
    with pytest.raises(ValueError, match=r"9 image placeholders in the batch but 0 images \(no image embeddings\)"):
        splice_image_embeddings(ids, None, table, mask)
    with pytest.raises(ValueError, match=r"rows read \[2, 1, 0\] images by their placeholders but images_per_sample"):
        splice_image_embeddings(ids, torch.randn(3, S, 8), table, mask, images_per_sample=[1, 2, 0])
    # Same total, wrong span size: 9 slots as 1 image of 9.
    with pytest.raises(ValueError, match=r"run of 3 image placeholders at position 2, not a multiple of the 9"):
        splice_image_embeddings(ids, torch.randn(1, 9, 8), table, mask)


def test_bad_ids_and_misplaced_placeholders_raise():
    table = nn.Embedding(20, 8)
    ids, mask = pad(rows(), "right")
    labels_like = ids.masked_fill(ids == 13, IGNORE_INDEX)
    with pytest.raises(ValueError, match=r"negative ids \[-100\] that are not the image placeholder"):
        splice_image_embeddings(labels_like, torch.randn(3, S, 8), table, mask)
    broken_mask = mask.clone()
    broken_mask[0, 2] = 0
    with pytest.raises(ValueError, match="image placeholder sits on a padding slot"):
        splice_image_embeddings(ids, torch.randn(3, S, 8), table, broken_mask)
    with pytest.raises(ValueError, match="image embeddings are 4 wide but the LM's are 8"):
        splice_image_embeddings(ids, torch.randn(3, S, 4), table, mask)


def test_counts_and_positions_helpers():
    ids, _ = pad(rows(), "left")
    assert image_counts(ids, S).tolist() == [2, 1, 0]
    with pytest.raises(ValueError, match="row 0 has 6 image placeholders, not a multiple of the 4 slots"):
        image_counts(ids, 4)
    assert position_ids_from_attention_mask(torch.tensor([[0, 0, 1, 1, 1]])).tolist() == [[1, 1, 0, 1, 2]]
