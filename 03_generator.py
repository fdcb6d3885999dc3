"""
03 - The GigaGAN generator (Kang et al. 2023, Sec. 3.2, Fig. 4, Eq. 1-2 and 5).

THIS FILE IS BEING WRITTEN. The text encoder T and the config skeleton below are final
API (the discriminator reuses TextEncoder); mapping, synthesis and truncation follow.

    prompt -> frozen CLIP (00) -> tokens (B, L, D), mask, eot
           -> text encoder T          -> t_local (B, L, C), t_global (B, C)
    z, t_global -> mapping M          -> w (B, S)
    w, t_local  -> synthesis          -> image pyramid [x_R, ..., x_4], finest first

Run: python 03_generator.py   (tiny generator on random text; seconds on a CPU)

Shape legend (shared by every numbered file):
    B batch, C channels, H W height width, N kernels in a bank, S style (w) width,
    L text tokens, D text width (CLIP), E embedding width, K kernel size.
"""
import importlib
from dataclasses import dataclass

import torch
import torch.nn as nn

_kernels = importlib.import_module("01_kernel_selection")
EqualLinear = _kernels.EqualLinear

_attention = importlib.import_module("02_attention")
TransformerBlock = _attention.TransformerBlock


# -----------------------------------------------------------------------------
# Configuration


@dataclass
class GeneratorConfig:
    resolution: int = 32                 # output side of the finest pyramid level (R)
    # text encoder T (Sec. 3.2: "learned attention layers T" on CLIP tokens; sizes are ours)
    text_width: int = 128                # C of t_local / t_global (T's output width)
    text_depth: int = 1                  # TransformerBlocks in T (0 = projection only)
    text_heads: int = 2                  # attention heads in T


# -----------------------------------------------------------------------------
# Text encoder T (Sec. 3.2, Fig. 4): t_local and t_global from CLIP token features


class TextEncoder(nn.Module):
    """Learned attention layers T on top of frozen CLIP token features.

    t_global = T's output at the end-of-text (EOT) position: CLIP pools the sentence there.
    t_local  = every token but EOT (paper: "all but the EOT token"), with the padding mask.
    Used by G (t_global -> mapping, t_local -> cross-attention) and by D (04) for t_D.
    """

    def __init__(
        self,
        text_dim,    # D, width of the CLIP token features
        width,       # C, width of t_local and t_global
        depth,       # number of TransformerBlocks (0: just the linear projection)
        heads,       # attention heads per block
    ):
        super().__init__()
        self.text_dim, self.width = text_dim, width
        self.proj = EqualLinear(text_dim, width)              # D -> C, no nonlinearity
        self.blocks = nn.ModuleList([TransformerBlock(width, heads) for _ in range(depth)])

    def forward(self, tokens, mask, eot):
        """tokens (B, L, D), mask (B, L) bool True = real token, eot (B,) long
        -> t_local (B, L, C), local_mask (B, L) bool, t_global (B, C)."""
        B, L, D = tokens.shape
        assert D == self.text_dim, f"text width {D} != text_dim {self.text_dim}"
        assert mask.shape == (B, L) and mask.dtype == torch.bool, mask.shape
        assert eot.shape == (B,), eot.shape
        x = self.proj(tokens)                                  # (B, L, C)
        for block in self.blocks:
            x = block(x, mask)                                 # (B, L, C), padding never attended
        batch = torch.arange(B, device=x.device)               # (B,)
        t_global = x[batch, eot]                               # (B, C), gather at EOT, no loop
        positions = torch.arange(L, device=x.device)           # (L,)
        local_mask = mask & (positions[None, :] != eot[:, None])  # (B, L), EOT removed
        return x, local_mask, t_global


def demo():
    torch.manual_seed(0)
    B, L, D = 3, 77, 128
    tokens = torch.randn(B, L, D)                              # random "CLIP" tokens
    eot = torch.tensor([5, 10, 76])                            # (B,)
    mask = torch.arange(L)[None, :] <= eot[:, None]            # (B, L) True at 0..eot
    T = TextEncoder(D, width=64, depth=1, heads=2)
    t_local, local_mask, t_global = T(tokens, mask, eot)
    print("t_local", tuple(t_local.shape), "t_global", tuple(t_global.shape))
    assert torch.equal(t_global, t_local[torch.arange(B), eot])
    assert local_mask.sum(1).tolist() == eot.tolist()          # 0..eot-1 kept, eot dropped


if __name__ == "__main__":
    demo()
