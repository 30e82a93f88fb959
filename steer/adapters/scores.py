"""Visual-token scores, recomputed from a vision layer's attention input (no ``output_attentions``).

* :func:`cls_attention` — the [CLS] row of a CLIP-style attention layer (LLaVA-1.5, LLaVA-NeXT; InternViT,
  whose q/k norms it applies);
* :func:`received_attention` — the mean attention each token receives in a Qwen vision block (no [CLS]);
* :func:`received_attention_dense` — the same for a SigLIP-style layer ([B, N, D] input, q/k projections:
  LLaVA-OneVision, Gemma 3, SmolVLM), the fallback of towers without [CLS];
* :func:`pool_scores` — patch scores averaged over the s x s patches each language-model token merges
  (Gemma 3's average pooling, InternVL's and SmolVLM's pixel shuffle), raster order.

All call the layer's own projection modules (so quantised weights, adapters such as LoRA and offloading hooks
act as in the model's forward; nothing reads ``.weight``), upcast to fp32 after the projection, and never build
more than a query chunk of the N x N map.
"""

from __future__ import annotations

import sys
from typing import Any, cast

import torch
import torch.nn.functional as F
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
    q0 = _project(attn, "q", x[:, :1]).view(batch, 1, heads, head_dim).transpose(1, 2)
    k = _project(attn, "k", x).view(batch, length, heads, head_dim).transpose(1, 2)
    probs = torch.softmax((q0 @ k.transpose(-1, -2)) * scale, dim=-1)  # [B, H, 1, 1+N]
    return probs[:, :, 0, 1:].mean(dim=1)


def scoring_problem(attn: nn.Module, kind: str) -> str | None:
    """Why a vision attention module cannot be scored (None: it can): the projections the score needs must be
    modules (a plain Linear, a quantised or adapted one)."""
    names = ("qkv",) if kind != "cls" and hasattr(attn, "qkv") else ("q_proj", "k_proj")
    missing = [n for n in names if not isinstance(getattr(attn, n, None), nn.Module)]
    if missing:
        return f"{type(attn).__name__} has no {' / '.join(missing)} projection module to score visual tokens with"
    if not hasattr(attn, "num_heads"):
        return f"{type(attn).__name__} does not say its number of heads (num_heads)"
    return None


def _project(attn: nn.Module, which: str, x: Tensor) -> Tensor:
    """``{q,k}_proj(x)`` upcast to fp32, then the module's ``{q,k}_norm`` over the whole projection when it has one
    (InternViT's qk-norm; an ``nn.Identity`` elsewhere)."""
    proj = cast(nn.Module, getattr(attn, f"{which}_proj"))
    out = proj(x).float()  # the module's own forward: quantised, adapted or offloaded weights act as in the model
    norm = getattr(attn, f"{which}_norm", None)
    if isinstance(norm, nn.Module) and not isinstance(norm, nn.Identity):
        out = norm(out.to(_dtype_of(norm))).float()
    return out


def _dtype_of(module: nn.Module) -> torch.dtype:
    return next((p.dtype for p in module.parameters()), torch.float32)


def received_attention_dense(x: Tensor, attn: nn.Module, key_mask: Tensor | None = None, chunk: int = 1024) -> Tensor:
    """Mean attention each token receives in a SigLIP-style attention layer (no [CLS]), recomputed from its
    input ``x`` [B, N, D]: ``g_j = mean_h mean_q softmax_k(q k^T d^-1/2)_qj`` in fp32, [B, N].

    ``key_mask`` bool [B, N] (False = padding patch) hides keys and drops those queries from the mean.
    Queries are processed ``chunk`` rows at a time, so the N x N map never exists.
    """
    batch, length, _ = x.shape
    heads = int(cast(Any, attn).num_heads)
    head_dim = int(getattr(attn, "head_dim", x.shape[-1] // heads))
    scale = float(getattr(attn, "scale", getattr(attn, "scaling", head_dim**-0.5)))
    q = _project(attn, "q", x).view(batch, length, heads, head_dim).transpose(1, 2)
    k = _project(attn, "k", x).view(batch, length, heads, head_dim).transpose(1, 2)
    bias = None
    weight = torch.ones(batch, length, dtype=torch.float32, device=x.device)
    if key_mask is not None:
        keys = key_mask.to(x.device).bool()
        bias = torch.zeros(batch, 1, 1, length, device=x.device).masked_fill(~keys[:, None, None, :], float("-inf"))
        weight = keys.float()
    total = torch.zeros(batch, length, dtype=torch.float32, device=x.device)
    for row in range(0, length, chunk):
        scores = (q[:, :, row : row + chunk] @ k.transpose(-1, -2)) * scale
        if bias is not None:
            scores = scores + bias
        probs = torch.softmax(scores, dim=-1)  # [B, H, c, N]
        total += (probs * weight[:, None, row : row + chunk, None]).sum(dim=(1, 2))
    return total / (heads * weight.sum(dim=1, keepdim=True).clamp(min=1))


def pool_scores(scores: Tensor, side: int, size: int) -> Tensor:
    """Patch scores [B, side * side] (raster order) averaged over ``size x size`` blocks: [B, (side/size)^2],
    the raster order of the merged tokens (token (i, j) covers patch rows size*i.., columns size*j..)."""
    batch = scores.shape[0]
    grid = scores.reshape(batch, 1, side, side)
    return F.avg_pool2d(grid, kernel_size=size, stride=size).reshape(batch, -1)


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


__all__ = ["cls_attention", "pool_scores", "received_attention", "received_attention_dense", "scoring_problem"]
