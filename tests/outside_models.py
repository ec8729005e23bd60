"""Small models whose forward reads state outside the parameters, for the tests of
buffers, module settings and random state (tests/test_watch_outside_state.py).

* ``Gpt``: nanoGPT's shape: token and position embeddings, LayerNorm, a causal-mask
  buffer ``bias`` (registered, as nanoGPT does without flash attention), attention and
  residual dropout, GELU (``approximate`` is a setting), a tied head.
* ``Norm``: BatchNorm1d between linear layers: running statistics change in every
  training forward, and not in evaluation passes.
* ``Rotary``: a rotary table cached in forward: a non-persistent buffer re-registered and
  ``seq_len_cached`` grown when a longer sequence comes (a cache, not a setting).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

VOCAB, BLOCK, WIDTH = 32, 16, 16


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(WIDTH, 3 * WIDTH)
        self.proj = nn.Linear(WIDTH, WIDTH)
        self.attn_dropout = nn.Dropout(0.1)
        self.resid_dropout = nn.Dropout(0.1)
        mask = torch.tril(torch.ones(BLOCK, BLOCK)).view(1, 1, BLOCK, BLOCK)
        self.register_buffer("bias", mask)
        self.n_head = 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(WIDTH, dim=2)
        h = self.n_head
        q, k, v = (z.view(b, t, h, c // h).transpose(1, 2) for z in (q, k, v))
        att = (q @ k.transpose(-2, -1)) / math.sqrt(c // h)
        att = att.masked_fill(self.bias[:, :, :t, :t] == 0, float("-inf"))
        att = self.attn_dropout(F.softmax(att, dim=-1))
        y = (att @ v).transpose(1, 2).contiguous().view(b, t, c)
        return self.resid_dropout(self.proj(y))


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(WIDTH), nn.LayerNorm(WIDTH)
        self.attn = Attention()
        self.mlp = nn.Sequential(
            nn.Linear(WIDTH, 4 * WIDTH), nn.GELU(), nn.Linear(4 * WIDTH, WIDTH), nn.Dropout(0.1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Gpt(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(VOCAB, WIDTH), nn.Embedding(BLOCK, WIDTH)
        self.drop = nn.Dropout(0.1)
        self.h = nn.ModuleList([Block(), Block()])
        self.ln_f = nn.LayerNorm(WIDTH)
        self.lm_head = nn.Linear(WIDTH, VOCAB, bias=False)
        self.lm_head.weight = self.wte.weight  # tied, as nanoGPT

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.shape[1])
        x = self.drop(self.wte(idx) + self.wpe(pos))
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))


class Norm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.bn, self.fc2 = nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Linear(16, VOCAB)
        self.act = nn.ReLU()

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = F.one_hot(idx, VOCAB).float()[..., :8].mean(1)
        return self.fc2(self.act(self.bn(self.fc1(x)))).unsqueeze(1).expand(-1, idx.shape[1], -1)


class RotaryCache(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("inv_freq", 1.0 / (10000 ** (torch.arange(0, dim, 2) / dim)))
        self.seq_len_cached = 0

    def forward(self, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        if t > self.seq_len_cached:  # grown inside forward: a cache
            self.seq_len_cached = t
            freqs = torch.outer(torch.arange(t).float(), self.inv_freq)
            self.register_buffer("cos_cached", freqs.cos(), persistent=False)
            self.register_buffer("sin_cached", freqs.sin(), persistent=False)
        return self.cos_cached[:t], self.sin_cached[:t]


class Rotary(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.wte = nn.Embedding(VOCAB, WIDTH)
        self.rotary = RotaryCache(WIDTH)
        self.drop = nn.Dropout(0.1)
        self.head = nn.Linear(WIDTH, VOCAB)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx)
        cos, sin = self.rotary(idx.shape[1])
        x1, x2 = x[..., ::2], x[..., 1::2]
        x = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
        return self.head(self.drop(x))


MODELS = {"gpt": Gpt, "norm": Norm, "rotary": Rotary}


def batch(rng: Any, kind: str, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens and targets; the rotary model gets longer sequences as training goes on."""
    t = BLOCK if kind != "rotary" else min(BLOCK, 4 + step // 3)
    g = torch.Generator().manual_seed(rng.randrange(2**31))
    idx = torch.randint(0, VOCAB, (4, t + 1), generator=g)
    return idx[:, :-1], idx[:, 1:]
