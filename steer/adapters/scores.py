"""Visual-token scores, recomputed from a vision layer's attention input (no ``output_attentions``).

* :func:`cls_attention` — the [CLS] row of a CLIP attention layer (LLaVA-1.5, LLaVA-NeXT);
* :func:`received_attention` — the mean attention each token receives in a Qwen vision block (no [CLS]).

Both call the layer's own projection modules (so quantised weights, adapters such as LoRA and offloading hooks
act as in the model's forward; nothing reads ``.weight``), upcast to fp32 after the projection, and never build
more than a query chunk of the N x N map.
"""

from __future__ import annotations

import sys
from typing import Any, cast

import torch
from torch import Tensor, nn


def cls_attention(x: Tensor, attn: nn.Module) -> Tensor:
    """The [CLS] row of a CLIP attention layer, recomputed from its input ``x`` [B, 1+N, D]; returns [B, N].

    ``s_j = mean_h softmax(q0_h K_h^T * d^-1/2)[1 + j]`` in fp32 (column 0, CLS -> CLS, dropped, not
    renormalised).
    """
    batch, length, _ = x.shape
    heads = int(cast(Any, attn).num_heads)
    head_dim = int(getattr(attn, "head_dim", x.shape[-1] // heads))
    scale = float(getattr(attn, "scale", head_dim**-0.5))
    q_proj, k_proj = cast(nn.Module, attn.q_proj), cast(nn.Module, attn.k_proj)
    q0 = q_proj(x[:, :1]).float().view(batch, 1, heads, head_dim).transpose(1, 2)
    k = k_proj(x).float().view(batch, length, heads, head_dim).transpose(1, 2)
    probs = torch.softmax((q0 @ k.transpose(-1, -2)) * scale, dim=-1)  # [B, H, 1, 1+N]
    return probs[:, :, 0, 1:].mean(dim=1)


def scoring_problem(attn: nn.Module, kind: str) -> str | None:
    """Why a vision attention module cannot be scored (None: it can): the projections the score needs must be
    modules (a plain Linear, a quantised or adapted one)."""
    names = ("q_proj", "k_proj") if kind == "cls" else ("qkv",)
    missing = [n for n in names if not isinstance(getattr(attn, n, None), nn.Module)]
    if missing:
        return f"{type(attn).__name__} has no {' / '.join(missing)} projection module to score visual tokens with"
    if not hasattr(attn, "num_heads"):
        return f"{type(attn).__name__} does not say its number of heads (num_heads)"
    return None


def received_attention(
    x: Tensor,
    attn: nn.Module,
    cu_seqlens: Tensor,
    position_embeddings: tuple[Tensor, Tensor],
    chunk: int = 1024,
) -> Tensor:
    """Mean attention each token receives in a Qwen vision block: ``g_j = mean_h mean_q softmax_k(q k^T d^-1/2)_qj``
    per image chunk ``[cu_i, cu_{i+1})``; ``x`` [S, D] is the block's ``norm1`` output; returns [S] (fp32).

    q and k are recomputed from ``attn.qkv`` with the block's vision RoPE; queries are processed ``chunk``
    rows at a time, so the n x n map never exists.
    """
    seq = x.shape[0]
    heads = int(cast(Any, attn).num_heads)
    proj = cast(nn.Module, attn.qkv)
    qkv = proj(x).float().reshape(seq, 3, heads, -1).permute(1, 0, 2, 3)
    q, k = qkv[0], qkv[1]
    rope = sys.modules[type(attn).__module__].apply_rotary_pos_emb_vision
    cos, sin = position_embeddings
    q, k = rope(q, k, cos.float(), sin.float())
    q, k = q.float(), k.float()
    scale = float(getattr(attn, "scaling", q.shape[-1] ** -0.5))
    out = torch.zeros(seq, dtype=torch.float32, device=x.device)
    bounds = [int(b) for b in cu_seqlens.tolist()]
    for start, end in zip(bounds[:-1], bounds[1:]):
        n = end - start
        if n <= 0:
            continue
        qc = q[start:end].transpose(0, 1)  # [H, n, d]
        kc = k[start:end].transpose(0, 1)
        total = torch.zeros(n, dtype=torch.float32, device=x.device)
        for row in range(0, n, chunk):
            probs = torch.softmax((qc[:, row : row + chunk] @ kc.transpose(-1, -2)) * scale, dim=-1)
            total += probs.sum(dim=(0, 1))
        out[start:end] = total / (heads * n)
    return out


__all__ = ["cls_attention", "received_attention", "scoring_problem"]
