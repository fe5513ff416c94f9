"""pool_masks: area pooling of image-space instance masks onto the condition-token grid."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

import timi_core as tc


def _label_masks(seed, K, H, W):
    labels = np.random.default_rng(seed).integers(0, K + 1, size=(H, W))
    for k in range(1, K + 1):  # every instance present at least once
        labels.flat[k - 1] = k
    return np.stack([labels == k for k in range(1, K + 1)])


@given(K=st.integers(1, 4), f=st.integers(1, 4), gh=st.integers(1, 5), gw=st.integers(1, 5), seed=st.integers(0, 999))
def test_divisible_grid_equals_block_mean(backend, K, f, gh, gw, seed):
    from skimage.measure import block_reduce

    assume(gh * gw >= K)
    masks = _label_masks(seed, K, gh * f, gw * (f + 1))
    expected = np.stack([block_reduce(m.astype(float), (f, f + 1), np.mean).reshape(-1) for m in masks])
    pooled = tc.pool_masks(backend.asarray(masks), (gh, gw), prefix_tokens=1)
    assert pooled.shape == (K, 1 + gh * gw)
    out = backend.to_numpy(pooled)
    np.testing.assert_array_equal(out[:, 0], 0.0)  # CLS token weight 0
    np.testing.assert_allclose(out[:, 1:], expected, rtol=1e-6, atol=1e-7)


@given(K=st.integers(1, 3), H=st.integers(3, 40), W=st.integers(3, 40), gh=st.integers(1, 7), gw=st.integers(1, 7),
       seed=st.integers(0, 999))
def test_area_is_conserved_for_any_sizes(K, H, W, gh, gw, seed):
    assume(gh * gw >= K)
    masks = _label_masks(seed, K, H, W)
    pooled = tc.pool_masks(masks, (gh, gw))
    cell_area = (H / gh) * (W / gw)
    np.testing.assert_allclose(pooled.sum(axis=1) * cell_area, masks.reshape(K, -1).sum(axis=1), rtol=1e-5)
    assert (pooled.sum(axis=0) <= 1 + 1e-6).all()  # disjoint instances share a token's area


@given(H=st.integers(8, 60), W=st.integers(8, 60), gh=st.integers(1, 8), gw=st.integers(1, 8), seed=st.integers(0, 999))
def test_matches_opencv_inter_area_downscaling(H, W, gh, gw, seed):
    cv2 = pytest.importorskip("cv2")
    masks = _label_masks(seed, 1, H, W)
    expected = cv2.resize(masks[0].astype(np.float64), (gw, gh), interpolation=cv2.INTER_AREA)
    np.testing.assert_allclose(tc.pool_masks(masks, (gh, gw))[0], expected.reshape(-1), rtol=1e-5, atol=1e-6)


def test_errors_name_the_problem(backend):
    masks = np.zeros((3, 8, 8), bool)
    masks[0, :2] = True
    masks[1, 2:5] = True
    masks[2, 4:] = True  # overlaps instance 1 on row 4
    with pytest.raises(ValueError, match=r"overlap: \[\(1, 2\)\]"):
        tc.pool_masks(backend.asarray(masks), (4, 4))
    masks[2] = False
    with pytest.raises(ValueError, match=r"\[2\] are empty"):
        tc.pool_masks(backend.asarray(masks), (4, 4))
    with pytest.raises(ValueError, match="K = 0"):
        tc.pool_masks(backend.asarray(np.zeros((0, 8, 8), bool)), (4, 4))
    with pytest.raises(ValueError, match="cannot be resolved"):
        tc.pool_masks(backend.asarray(masks[:2]), (1, 1))


def test_uint8_255_masks_equal_bool_masks():
    masks = _label_masks(1, 2, 12, 12)
    np.testing.assert_array_equal(tc.pool_masks(masks.astype(np.uint8) * 255, (3, 3)), tc.pool_masks(masks, (3, 3)))


def test_stack_token_masks_pads_with_empty_instances(backend):
    """Images with fewer instances get all-zero masks (0 in Eq.4 and its gradient); values, dtype and
    backend are kept."""
    a = np.random.default_rng(0).random((3, 5)).astype(np.float32)
    b = np.random.default_rng(1).random((1, 5)).astype(np.float32)
    out = tc.stack_token_masks([backend.asarray(a), backend.asarray(b)])
    assert out.shape == (2, 3, 5)
    got = backend.to_numpy(out)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got[0], a)
    np.testing.assert_array_equal(got[1, :1], b)
    np.testing.assert_array_equal(got[1, 1:], 0.0)
    with pytest.raises(ValueError, match="expected"):
        tc.stack_token_masks([backend.asarray(a), backend.asarray(np.zeros((2, 4), np.float32))])
    with pytest.raises(ValueError, match="at least one"):
        tc.stack_token_masks([])
