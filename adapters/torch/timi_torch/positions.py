"""Where the latent tokens are in space, for Eq.5 over token positions (``TIMIConfig.smoothing``).

hy3dgen's latents are an unordered set of tokens with no position of their own. Its ShapeVAE
decodes occupancy at a point by cross-attention from the point to the tokens (``geo_decoder``), so
each token has a place: where the points that read it are. :class:`DecoderAttentionPositions`
reads it from a clean latent ``x1``: decode a coarse grid of points, take the decoder's attention
``a(q, v)`` (averaged over heads) and give each token the mean of the grid points weighted by
``a(q, v)`` times the decoded occupancy of ``q`` (points inside the shape, where the tokens sit).
It works for any hy3dgen ShapeVAE, and uses the decoder's processor hook, restoring the processor
it found. On the testbed, whose latents also carry exact positions, it is checked against them
(``docs/results.md``): the positions are pulled towards the shape's centre, but which tokens are
neighbours is kept, and that is what Eq.5 with ``sigma`` in nearest-neighbour units uses.
"""

from __future__ import annotations

import torch

__all__ = ["DecoderAttentionPositions"]


class DecoderAttentionPositions:
    """``token_positions(x1) -> (B, L, 3)`` from the VAE decoder's cross-attention (module doc).

    ``vae``: hy3dgen's ``ShapeVAE`` (``x1`` is in the DiT's scaled units; it is divided by
    ``vae.scale_factor`` as hy3dgen's pipeline does before decoding). ``resolution``: points per
    axis of the grid over ``[-box, box]^3``; ``chunk``: grid points per decoder call.
    """

    def __init__(self, vae, resolution: int = 16, box: float = 1.01, chunk: int = 1024):
        self.vae, self.resolution, self.box, self.chunk = vae, int(resolution), float(box), int(chunk)

    def grid(self, device) -> torch.Tensor:
        g = torch.linspace(-self.box, self.box, self.resolution, device=device)
        return torch.stack(torch.meshgrid(g, g, g, indexing="ij"), dim=-1).reshape(-1, 3)

    @torch.no_grad()
    def __call__(self, x1: torch.Tensor) -> torch.Tensor:
        vae = self.vae
        dtype = next(vae.parameters()).dtype
        attention = vae.geo_decoder.cross_attn_decoder.attn.attention
        original = attention.attn_processor
        weights: list = []

        def processor(attn, q, k, v):  # records a(q, v), averaged over heads; the output is hy3dgen's
            a = torch.softmax((q.float() @ k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5, dim=-1)
            weights.append(a.mean(1))
            return original(attn, q, k, v)

        latents = vae(x1.to(dtype) / vae.scale_factor)
        points = self.grid(latents.device)
        num = torch.zeros(x1.shape[0], x1.shape[1], 3, device=latents.device)
        den = torch.zeros(x1.shape[0], x1.shape[1], 1, device=latents.device)
        attention.attn_processor = processor
        try:
            for s in range(0, len(points), self.chunk):
                q = points[s:s + self.chunk]
                logits = vae.geo_decoder(queries=q[None].expand(x1.shape[0], -1, -1).to(dtype), latents=latents)
                a = weights.pop() * torch.sigmoid(logits.float())           # (B, Q, L) * (B, Q, 1)
                num += a.transpose(1, 2) @ q
                den += a.sum(1)[..., None]
        finally:
            attention.attn_processor = original
        return num / den.clamp_min(1e-12)
