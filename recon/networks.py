"""Score network: a small DDPM/NCSN++-style U-Net with noise-level embedding.

Fully convolutional, so a network trained on patches runs on whole images
(patch-based priors, Hu et al., NeurIPS 2024).  Two optional coordinate
channels tell the network where a patch sits in the full image; at inference
they span the whole image.  The EDM preconditioning (Karras et al., NeurIPS
2022) lives in ``recon.prior.EDMDenoiser``; this module is the raw network
F(x, c_noise).
"""
from __future__ import annotations

import math

import torch
from torch import nn
import torch.nn.functional as F


def _groups(ch: int) -> int:
    for g in (8, 4, 2, 1):
        if ch % g == 0:
            return g
    return 1


class FourierEmbedding(nn.Module):
    """Sinusoidal embedding of the scalar noise condition (as in DDPM/NCSN++)."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        half = self.dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=c.device, dtype=c.dtype) / half)
        args = 1000.0 * c[:, None] * freqs[None] / 4.0
        return torch.cat([args.cos(), args.sin()], dim=1)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, emb_dim: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(cin), cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * cout)
        self.norm2 = nn.GroupNorm(_groups(cout), cout)
        self.drop = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(emb)[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.drop(F.silu(h)))
        return (self.skip(x) + h) / math.sqrt(2.0)


class Attention(nn.Module):
    def __init__(self, ch: int, heads: int = 1):
        super().__init__()
        self.norm = nn.GroupNorm(_groups(ch), ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = nn.Conv2d(ch, ch, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)
        self.heads = heads

    def forward(self, x):
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3 * self.heads, c // self.heads, h * w).transpose(2, 3).chunk(3, dim=1)
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(2, 3).reshape(b, c, h, w)
        return (x + self.proj(out)) / math.sqrt(2.0)


class UNet(nn.Module):
    """U-Net F(x, c_noise) sized by a few arguments.

    Args:
        channels: image channels (1 for CT / magnitude MRI).
        base: channels at full resolution.
        mults: channel multiplier per resolution level.
        n_res: residual blocks per level.
        attn_levels: level indices (0 = full resolution) with self-attention.
        coords: append two coordinate channels (patch position in the image).
    """

    def __init__(self, channels: int = 1, base: int = 32, mults=(1, 2, 4), n_res: int = 1,
                 attn_levels=(), coords: bool = True, emb_dim: int | None = None, dropout: float = 0.0):
        super().__init__()
        self.config = dict(channels=channels, base=base, mults=list(mults), n_res=n_res,
                           attn_levels=list(attn_levels), coords=coords, emb_dim=emb_dim, dropout=dropout)
        emb_dim = emb_dim or 4 * base
        self.coords = coords
        self.channels = channels
        self.embed = nn.Sequential(FourierEmbedding(base), nn.Linear(base, emb_dim), nn.SiLU(),
                                   nn.Linear(emb_dim, emb_dim))
        self.inp = nn.Conv2d(channels + (2 if coords else 0), base, 3, padding=1)
        self.down = nn.ModuleList()
        chs = [base]
        ch = base
        for lvl, m in enumerate(mults):
            for _ in range(n_res):
                blk = nn.ModuleList([ResBlock(ch, base * m, emb_dim, dropout)])
                ch = base * m
                if lvl in attn_levels:
                    blk.append(Attention(ch))
                self.down.append(blk)
                chs.append(ch)
            if lvl != len(mults) - 1:
                self.down.append(nn.ModuleList([nn.Conv2d(ch, ch, 3, stride=2, padding=1)]))
                chs.append(ch)
        self.mid = nn.ModuleList([ResBlock(ch, ch, emb_dim, dropout), Attention(ch), ResBlock(ch, ch, emb_dim, dropout)])
        self.up = nn.ModuleList()
        for lvl, m in reversed(list(enumerate(mults))):
            for _ in range(n_res + 1):
                blk = nn.ModuleList([ResBlock(ch + chs.pop(), base * m, emb_dim, dropout)])
                ch = base * m
                if lvl in attn_levels:
                    blk.append(Attention(ch))
                self.up.append(blk)
            if lvl != 0:
                self.up.append(nn.ModuleList([nn.Upsample(scale_factor=2, mode="nearest"),
                                              nn.Conv2d(ch, ch, 3, padding=1)]))
        self.out = nn.Sequential(nn.GroupNorm(_groups(ch), ch), nn.SiLU(), nn.Conv2d(ch, channels, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)
        self.factor = 2 ** (len(mults) - 1)

    @staticmethod
    def coordinate_grid(b: int, h: int, w: int, offset=None, full=None, dtype=None, device=None):
        """Coordinates in [-1, 1] of each pixel in the full image.

        ``offset`` (B, 2) is each patch's top-left corner and ``full`` (H, W)
        the full image size; by default the input is the full image.
        """
        full = full or (h, w)
        ys = torch.arange(h, dtype=dtype, device=device)
        xs = torch.arange(w, dtype=dtype, device=device)
        if offset is None:
            offset = torch.zeros(b, 2, dtype=dtype, device=device)
        yy = (ys[None, :] + offset[:, :1]) / max(full[0] - 1, 1) * 2 - 1
        xx = (xs[None, :] + offset[:, 1:]) / max(full[1] - 1, 1) * 2 - 1
        return torch.stack([yy[:, :, None].expand(b, h, w), xx[:, None, :].expand(b, h, w)], dim=1)

    def forward(self, x, c_noise, coords=None):
        b, _, h, w = x.shape
        if h % self.factor or w % self.factor:
            raise ValueError(f"image size {h}x{w} must be divisible by {self.factor} for this network")
        if self.coords:
            if coords is None:
                coords = self.coordinate_grid(b, h, w, dtype=x.dtype, device=x.device)
            x = torch.cat([x, coords], dim=1)
        emb = self.embed(c_noise.reshape(-1).expand(b) if c_noise.numel() == 1 else c_noise.reshape(-1))
        h_ = self.inp(x)
        skips = [h_]
        for blk in self.down:
            for layer in blk:
                h_ = layer(h_, emb) if isinstance(layer, ResBlock) else layer(h_)
            skips.append(h_)
        for layer in self.mid:
            h_ = layer(h_, emb) if isinstance(layer, ResBlock) else layer(h_)
        for blk in self.up:
            if isinstance(blk[0], ResBlock):
                h_ = torch.cat([h_, skips.pop()], dim=1)
            for layer in blk:
                h_ = layer(h_, emb) if isinstance(layer, ResBlock) else layer(h_)
        return self.out(h_)
