"""Pooling image-space instance masks onto the image-condition tokens (the ``M`` of Eq.2)."""

from __future__ import annotations

import numpy as np

from ._backend import array_namespace, device

__all__ = ["pool_masks", "area_pooling_matrix", "stack_token_masks"]


def area_pooling_matrix(n_pixels: int, n_cells: int) -> np.ndarray:
    """(n_cells, n_pixels) matrix whose row ``i`` averages the pixels under cell ``i``.

    Cell ``i`` spans ``[i * n_pixels / n_cells, (i + 1) * n_pixels / n_cells)``; a pixel ``[y, y+1)``
    counts by the length it shares with the cell, divided by the cell's length (area pooling, exact
    for any sizes, like OpenCV's ``INTER_AREA``). Rows sum to 1.
    """
    edges = np.arange(n_cells + 1, dtype=np.float64) * (n_pixels / n_cells)
    lo, hi = edges[:-1, None], edges[1:, None]
    y = np.arange(n_pixels, dtype=np.float64)[None, :]
    overlap = np.clip(np.minimum(y + 1, hi) - np.maximum(y, lo), 0.0, None)
    return overlap / (hi - lo)


def pool_masks(masks, grid, prefix_tokens=0):
    """Pool instance masks (K, H, W) by area onto a (gh, gw) token grid -> (K, prefix + gh*gw).

    ``masks`` must already be in the frame of the image the condition encoder sees (after its
    crop/resize). Boolean or integer masks count pixels ``> 0``; float masks are soft masks in
    [0, 1]. Token ``prefix + i*gw + j`` (row-major) receives the fraction of patch (i, j) covered by
    the instance; the ``prefix_tokens`` leading tokens (e.g. DINOv2's CLS) get weight 0.

    Raises ``ValueError`` for K = 0, an empty mask, overlapping masks (naming the instances), or more
    instances than tokens. Validation reads values, so call it outside ``jax.jit``.
    """
    xp = array_namespace(masks)
    if masks.ndim != 3:
        raise ValueError(f"pool_masks: masks must have shape (K, H, W), got {masks.shape}.")
    K, H, W = masks.shape
    gh, gw = (int(grid[0]), int(grid[1]))
    if gh <= 0 or gw <= 0 or H <= 0 or W <= 0:
        raise ValueError(f"pool_masks: grid {grid} and mask size {(H, W)} must be positive.")
    if K == 0:
        raise ValueError("pool_masks: got K = 0 instance masks; pass at least one mask.")
    if K > gh * gw:
        raise ValueError(f"pool_masks: {K} instances cannot be resolved by a {gh}x{gw} token grid.")
    if prefix_tokens < 0:
        raise ValueError(f"pool_masks: prefix_tokens={prefix_tokens} must be >= 0.")

    if xp.isdtype(masks.dtype, "real floating"):
        if bool(xp.any(masks < 0)) or bool(xp.any(masks > 1)):
            raise ValueError("pool_masks: float masks must lie in [0, 1]; pass bool or 0/1 masks.")
        m = masks
    else:
        m = xp.astype(masks > 0, xp.float32) if masks.dtype != xp.bool else xp.astype(masks, xp.float32)

    areas = xp.sum(m, axis=(1, 2))
    empty = [k for k in range(K) if float(areas[k]) == 0.0]
    if empty:
        raise ValueError(f"pool_masks: instance mask(s) {empty} are empty; remove them or fix the masks.")
    if bool(xp.any(xp.sum(xp.astype(m > 0, xp.float32), axis=0) > 1)):
        flat = xp.reshape(xp.astype(m > 0, xp.float32), (K, H * W))
        both = xp.matmul(flat, xp.matrix_transpose(flat))
        pairs = [(i, j) for i in range(K) for j in range(i + 1, K) if float(both[i, j]) > 0]
        raise ValueError(
            f"pool_masks: instance masks overlap: {pairs} (instance index pairs); "
            "make the masks disjoint (e.g. give each pixel to one instance)."
        )

    dev = device(m)
    rows = xp.asarray(area_pooling_matrix(H, gh), dtype=m.dtype, device=dev)   # (gh, H)
    cols = xp.asarray(area_pooling_matrix(W, gw).T, dtype=m.dtype, device=dev)  # (W, gw)
    pooled = xp.matmul(xp.matmul(rows, m), cols)                               # (K, gh, gw)
    pooled = xp.reshape(pooled, (K, gh * gw))
    if prefix_tokens:
        pooled = xp.concat([xp.zeros((K, prefix_tokens), dtype=m.dtype, device=dev), pooled], axis=1)
    return pooled


def stack_token_masks(token_masks):
    """Stack per-image condition-token masks (K_b, M) into one (B, K_max, M) batch.

    Images with fewer instances are padded with all-zero masks, which add exactly 0 to Eq.4
    (their weights W are 0) and 0 to its gradient. All inputs must share one backend and M.
    """
    token_masks = list(token_masks)
    if not token_masks:
        raise ValueError("stack_token_masks needs at least one image's masks.")
    xp = array_namespace(*token_masks)
    k_max = max(int(t.shape[0]) for t in token_masks)
    num_tokens = int(token_masks[0].shape[1])
    padded = []
    for t in token_masks:
        if t.ndim != 2 or int(t.shape[1]) != num_tokens:
            raise ValueError(f"token masks of shape {tuple(t.shape)}: expected (K, {num_tokens}).")
        pad = xp.zeros((k_max - int(t.shape[0]), num_tokens), dtype=t.dtype, device=device(t))
        padded.append(xp.concat([t, pad], axis=0))
    return xp.stack(padded)
