"""Pigeon's adapter MLP (docs/algorithm.md §3.1-3.2): reference-image features → one LLM input embedding ``E``.

``E = Dropout(tanh(W2 · Dropout(W1 r + b1) + b2))`` with r the mean over the 256 rows of the highres
detokenizer's ``prompt_embeds`` (2048-d) and ``E`` 4096-d, written at the ``<emb>`` position of the prompt.
There is no non-linearity between the two Linear layers, only dropout (MMG:136-152); the same Dropout module is
applied twice.
"""
from __future__ import annotations

import torch.nn as nn
from torch import Tensor

__all__ = ["PigeonAdapter"]


class PigeonAdapter(nn.Module):
    """Linear(in→hid), Dropout, Linear(hid→out), tanh, Dropout — state-dict keys ``encoder.*``, ``decoder.*``.

    Defaults are the released model's sizes 2048 → 512 → 4096 (LP:153-158). ``drop_prob`` defaults to 0.2, the
    value the run scripts pass (RS:20-22; the class default upstream is 0.1, unused).
    """

    def __init__(self, in_dim: int = 2048, hid_dim: int = 512, out_dim: int = 4096, drop_prob: float = 0.2):
        super().__init__()
        for name, v in (("in_dim", in_dim), ("hid_dim", hid_dim), ("out_dim", out_dim)):
            if int(v) != v or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if not (0.0 <= float(drop_prob) < 1.0):
            raise ValueError(f"drop_prob must lie in [0, 1), got {drop_prob!r}")
        self.in_dim, self.hid_dim, self.out_dim = int(in_dim), int(hid_dim), int(out_dim)
        self.encoder = nn.Linear(self.in_dim, self.hid_dim)
        self.drop = nn.Dropout(float(drop_prob))
        self.decoder = nn.Linear(self.hid_dim, self.out_dim)
        self.activation = nn.Tanh()

    def forward(self, x: Tensor) -> Tensor:
        """``x`` [..., in_dim] (cast to the adapter's dtype) → [..., out_dim] in [−1, 1]."""
        if x.shape[-1:] != (self.in_dim,):
            raise ValueError(f"adapter input must end in dimension {self.in_dim}, got shape {tuple(x.shape)}")
        x = x.to(self.encoder.weight.dtype)
        return self.drop(self.activation(self.decoder(self.drop(self.encoder(x)))))
