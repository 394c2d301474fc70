"""The tiny byte-level decoder LM every policy trains in ``quality.py`` (nanoGPT-shaped, CPU-sized).

Bytes in (vocabulary 256), next-byte cross-entropy out, so a loss in nats per position converts to bits per
byte by dividing by ``ln 2`` whatever the domain's compressibility (docs/benchmarks.md: report bits per byte).
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ByteLM", "LMConfig", "per_sequence_loss"]


@dataclasses.dataclass(frozen=True)
class LMConfig:
    """Shape of the model. The defaults (~0.64 M parameters) run ~170 ms per batch-32 step on 2 CPU cores."""

    num_layers: int = 3
    width: int = 128
    num_heads: int = 4
    context: int = 128


class _Block(nn.Module):
    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.ln1 = nn.LayerNorm(cfg.width)
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width)
        self.proj = nn.Linear(cfg.width, cfg.width)
        self.ln2 = nn.LayerNorm(cfg.width)
        self.mlp = nn.Sequential(nn.Linear(cfg.width, 4 * cfg.width), nn.GELU(), nn.Linear(4 * cfg.width, cfg.width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.num_heads, c // self.num_heads).unbind(2)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, c))
        return x + self.mlp(self.ln2(x))


class ByteLM(nn.Module):
    """A pre-norm GPT over bytes: token + learned position embeddings, ``num_layers`` blocks, tied head."""

    def __init__(self, cfg: LMConfig = LMConfig()) -> None:
        super().__init__()
        if cfg.width % cfg.num_heads:
            raise ValueError(f"`width` ({cfg.width}) must be a multiple of `num_heads` ({cfg.num_heads})")
        self.cfg = cfg
        self.tok = nn.Embedding(256, cfg.width)
        self.pos = nn.Embedding(cfg.context, cfg.width)
        self.blocks = nn.ModuleList(_Block(cfg) for _ in range(cfg.num_layers))
        self.ln = nn.LayerNorm(cfg.width)
        self.apply(self._init)
        for name, p in self.named_parameters():
            if name.endswith("proj.weight") or name.endswith("mlp.2.weight"):
                # GPT-2's scaled init of residual projections keeps the residual stream's scale depth-free.
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * cfg.num_layers))

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear | nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``LongTensor[B, T]`` of bytes, ``T <= context``; returns logits ``[B, T, 256]``."""
        t = x.shape[1]
        h = self.tok(x) + self.pos(torch.arange(t, device=x.device))
        for block in self.blocks:
            h = block(h)
        return self.ln(h) @ self.tok.weight.T

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def per_sequence_loss(model: nn.Module, windows: torch.Tensor) -> torch.Tensor:
    """Mean next-byte cross-entropy (nats) of each window ``[B, T+1]``; returns ``[B]``."""
    inputs, targets = windows[:, :-1], windows[:, 1:]
    logits = model(inputs)
    loss = F.cross_entropy(logits.reshape(-1, 256), targets.reshape(-1), reduction="none")
    return loss.view(targets.shape).mean(dim=1)
