"""Eager reference attention: materialises the probabilities. For tests and tiny shapes only.

Conventions (shared with :mod:`steer.kernels.lse`, transformers' attention-function layout):

* ``query`` [B, Hq, Lq, D]; ``key`` / ``value`` [B, Hkv, Lk, D] with ``Hq % Hkv == 0`` (GQA is handled
  here, the caller never repeats K/V);
* ``mask``: bool, broadcastable to [B, Hq, Lq, Lk], True = attend; ``None`` = every key is allowed
  (causal-ness is resolved by the caller);
* rows with no allowed key give a finite zero output (never NaN) and lse = -inf;
* outputs come back in the input dtype; probabilities, masses, lse and coefficients are fp32.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["eager_attention", "explicit_score_reference", "explicit_scores", "group_reweight_reference"]

Coefficients = Callable[[Tensor], Tensor]


def _check_shapes(query: Tensor, key: Tensor, value: Tensor) -> tuple[int, int, int, int, int]:
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        raise ValueError(
            "query/key/value must be 4-D [B, H, L, D]; got "
            f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}"
        )
    b, hq, lq, _ = query.shape
    hkv, lk = key.shape[1], key.shape[2]
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({hkv})")
    if value.shape[:3] != key.shape[:3]:
        raise ValueError(f"key {tuple(key.shape)} and value {tuple(value.shape)} disagree")
    return b, hq, hkv, lq, lk


def _repeat_kv(x: Tensor, n_rep: int) -> Tensor:
    if n_rep == 1:
        return x
    b, h, length, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, length, d).reshape(b, h * n_rep, length, d)


def _as_4d_mask(mask: Tensor, b: int, hq: int, lq: int, lk: int) -> Tensor:
    """Bool mask viewed as 4-D with each dim either 1 or full size (Lk always full size)."""
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor (True = attend), got {mask.dtype}")
    if mask.dim() > 4:
        raise ValueError(f"mask has {mask.dim()} dims, expected at most 4")
    m = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
    for have, full, name in zip(m.shape, (b, hq, lq, lk), ("B", "H", "Lq", "Lk")):
        if have not in (1, full):
            raise ValueError(f"mask shape {tuple(mask.shape)} does not broadcast to [B, Hq, Lq, Lk] ({name})")
    return m.expand(m.shape[0], m.shape[1], m.shape[2], lk)


def _pad_labels(labels: Tensor, b: int, lk: int) -> Tensor:
    """Labels as a LongTensor [B, Lk]; shorter label rows are padded with 0 (background)."""
    if labels.dim() == 1:
        labels = labels[None]
    if labels.dim() != 2 or labels.shape[0] not in (1, b):
        raise ValueError(f"labels must be [B, Lk] (B={b}), got {tuple(labels.shape)}")
    if labels.shape[1] > lk:
        raise ValueError(f"labels cover {labels.shape[1]} keys but there are only {lk}")
    labels = labels.long()
    if labels.shape[1] < lk:
        labels = torch.nn.functional.pad(labels, (0, lk - labels.shape[1]), value=0)
    return labels.expand(b, lk)


def _num_groups(labels: Tensor, num_groups: int | None) -> int:
    if labels.numel() and int(labels.min()) < 0:
        raise ValueError("labels must be >= 0 (0 = background)")
    top = int(labels.max()) if labels.numel() else 0
    if num_groups is None:
        return top
    if top > num_groups:
        raise ValueError(f"labels use group {top} but num_groups={num_groups}")
    return num_groups


def _rows_mask(rows: Tensor | None, b: int, lq: int) -> Tensor | None:
    if rows is None:
        return None
    if rows.dtype != torch.bool:
        raise TypeError(f"rows must be a bool tensor [B, Lq], got {rows.dtype}")
    if rows.dim() == 1:
        rows = rows[None]
    if rows.dim() != 2 or rows.shape[0] not in (1, b) or rows.shape[1] != lq:
        raise ValueError(f"rows must be [B, Lq] = [{b}, {lq}], got {tuple(rows.shape)}")
    return rows.expand(b, lq)


def _coefficients(coefficients: Coefficients, masses: Tensor) -> Tensor:
    """Evaluate the coefficient function; fp32, broadcast to the masses' shape.

    Where a group has zero mass the coefficient is irrelevant (its term is ``c_g * 0``); it is replaced by 1
    so that an unguarded ``Ω / m_g`` (inf or NaN) cannot leak into the output.
    """
    c = torch.as_tensor(coefficients(masses), device=masses.device)
    c = torch.broadcast_to(c.to(torch.float32), masses.shape)
    return torch.where(masses > 0, c, torch.ones((), dtype=torch.float32, device=masses.device))


def eager_attention(
    query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None, scale: float
) -> tuple[Tensor, Tensor]:
    """Plain softmax attention with the probabilities materialised.

    ``p = softmax(scale · q kᵀ + log mask)`` in fp32, ``out = p v``. Rows with no allowed key get ``p = 0``
    and ``out = 0``.

    Returns ``(out [B, Hq, Lq, D] in the input dtype, probs [B, Hq, Lq, Lk] fp32)``.
    """
    b, hq, hkv, lq, lk = _check_shapes(query, key, value)
    n_rep = hq // hkv
    k = _repeat_kv(key, n_rep).float()
    v = _repeat_kv(value, n_rep).float()
    scores = torch.matmul(query.float(), k.transpose(-1, -2)) * scale
    if mask is not None:
        m = _as_4d_mask(mask, b, hq, lq, lk)
        scores = scores.masked_fill(~m, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    probs = torch.nan_to_num(probs, nan=0.0)  # fully masked rows: softmax of all -inf is NaN
    out = torch.matmul(probs, v).to(query.dtype)
    return out, probs


def group_reweight_reference(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    mask: Tensor | None,
    scale: float,
    labels: Tensor,
    coefficients: Coefficients,
    rows: Tensor | None = None,
    renormalize: bool = False,
    base_out: Tensor | None = None,
    num_groups: int | None = None,
    return_probs: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Reweight post-softmax attention by key group, on the materialised probabilities.

    ``labels`` [B, Lk] (shorter rows padded with 0) puts key j in group ``g(j)`` ∈ {0..G}; 0 is the background.
    Per (b, h, q) the group masses are ``m_g = Σ_{j∈g} p_qj`` (fp32), the coefficients
    ``c = coefficients(m)`` (broadcastable to [B, Hq, Lq, G+1], c_g ≥ 0), and the edited probabilities
    ``p'_qj = c_{g(j)} p_qj``, divided by ``Σ_j p'_qj`` when ``renormalize`` (0 stays 0). The output is
    ``o' = p' v = Σ_g c_g m_g out_g``. Rows with ``rows[b, q] == False`` keep the unedited output — taken from
    ``base_out`` when given, otherwise from :func:`eager_attention`.

    ``num_groups`` fixes G (default: ``labels.max()``) so that the masses handed to ``coefficients`` always
    have G+1 columns, even when the highest group is empty. ``return_probs=True`` returns
    ``(out, p')`` with ``p'`` [B, Hq, Lq, Lk] fp32 (unedited rows hold the original probabilities).
    """
    b, hq, _, lq, lk = _check_shapes(query, key, value)
    lab = _pad_labels(labels.to(query.device), b, lk)
    n_groups = _num_groups(lab, num_groups)
    sel = _rows_mask(rows, b, lq)

    out_all, probs = eager_attention(query, key, value, mask, scale)
    onehot = torch.nn.functional.one_hot(lab, n_groups + 1).to(torch.float32)  # [B, Lk, G+1]
    masses = torch.matmul(probs, onehot[:, None])  # [B, Hq, Lq, G+1]
    c = _coefficients(coefficients, masses)
    # per-key coefficient c_{g(j)}: [B, Hq, Lq, Lk]
    c_key = torch.gather(c, -1, lab[:, None, None, :].expand(b, hq, lq, lk))
    new = probs * c_key
    if renormalize:
        total = new.sum(-1, keepdim=True)
        new = new / torch.where(total > 0, total, torch.ones_like(total))
    v = _repeat_kv(value, hq // value.shape[1]).float()
    out = torch.matmul(new, v).to(query.dtype)
    if sel is not None:
        base = out_all if base_out is None else base_out.to(query.dtype)
        out = torch.where(sel[:, None, :, None], out, base)
        new = torch.where(sel[:, None, :, None], new, probs)
    return (out, new) if return_probs else out


def _selection(flags: Tensor) -> tuple[Tensor, Tensor]:
    """bool [B, N] -> (index [B, n] of the True columns, left-aligned and padded with 0; valid [B, n])."""
    counts = flags.sum(dim=1)
    n = max(int(counts.max()) if flags.numel() else 0, 1)
    order = torch.argsort((~flags).to(torch.int8), dim=1, stable=True)[:, :n]
    valid = torch.arange(n, device=flags.device)[None, :] < counts[:, None]
    return torch.where(valid, order, torch.zeros_like(order)), valid


def _gather_keys(x: Tensor, index: Tensor, heads: int) -> Tensor:
    """x [B, Hkv, Lk, D] gathered along Lk with index [B, K], then repeated to ``heads`` heads -> [B, H, K, D]."""
    b, hkv, _, d = x.shape
    picked = torch.gather(x, 2, index[:, None, :, None].expand(b, hkv, index.shape[1], d))
    return _repeat_kv(picked, heads // hkv)


def explicit_scores(
    query: Tensor,
    key: Tensor,
    mask: Tensor | None,
    scale: float,
    row_index: Tensor,
    row_valid: Tensor,
    key_index: Tensor,
    key_valid: Tensor,
    fn: Callable[[Tensor], Tensor],
) -> tuple[Tensor, Tensor]:
    """The edited scores ``a' = fn(a)`` of the selected rows and keys, [B, H, R, K] fp32 (``-inf`` where not
    allowed), and the allowed flags. ``a = scale · q kᵀ`` of the rows ``row_index`` and keys ``key_index``."""
    b, hq = query.shape[:2]
    q = torch.gather(query, 2, row_index[:, None, :, None].expand(b, hq, row_index.shape[1], query.shape[-1]))
    k = _gather_keys(key, key_index, hq)
    a = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    allowed = row_valid[:, None, :, None] & key_valid[:, None, None, :]
    if mask is not None:
        m = _as_4d_mask(mask.to(query.device), b, hq, query.shape[2], key.shape[2])
        m = m.expand(b, m.shape[1], m.shape[2], m.shape[3])
        m = torch.gather(m, 2, row_index[:, None, :, None].expand(b, m.shape[1], row_index.shape[1], m.shape[3]))
        m = torch.gather(m, 3, key_index[:, None, None, :].expand(b, m.shape[1], m.shape[2], key_index.shape[1]))
        allowed = allowed & m
    allowed = allowed.expand(a.shape)
    edited = fn(torch.where(allowed, a, torch.zeros_like(a))).float()
    if edited.shape != a.shape:
        raise ValueError(f"a score function returned shape {tuple(edited.shape)} for scores {tuple(a.shape)}")
    return torch.where(allowed, edited, torch.full_like(edited, float("-inf"))), allowed


def explicit_score_reference(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    mask: Tensor | None,
    scale: float,
    rows: Tensor,
    keys: Tensor,
    fn: Callable[[Tensor], Tensor],
) -> Tensor:
    """Reference of `steer.kernels.lse.explicit_score_attention`: the whole score matrix materialised (fp32),
    ``fn`` applied to the [B, H, R, K] block of the selected rows and keys (as the fused form hands it),
    written back, softmax, ·V. Returns [B, H, Lq, D] in the input dtype."""
    b, hq, hkv, lq, lk = _check_shapes(query, key, value)
    k = _repeat_kv(key, hq // hkv).float()
    v = _repeat_kv(value, hq // hkv).float()
    scores = torch.matmul(query.float(), k.transpose(-1, -2)) * scale
    if mask is not None:
        scores = scores.masked_fill(~_as_4d_mask(mask.to(query.device), b, hq, lq, lk), float("-inf"))
    keys = keys.bool()[:, :lk]
    if keys.shape[1] < lk:
        keys = torch.cat([keys, keys.new_zeros(b, lk - keys.shape[1])], dim=1)
    row_index, row_valid = _selection(rows.bool())
    key_index, key_valid = _selection(keys)
    edited, allowed = explicit_scores(query, key, mask, scale, row_index, row_valid, key_index, key_valid, fn)
    for bi in range(b):
        for r in range(row_index.shape[1]):
            if not bool(row_valid[bi, r]):
                continue
            row = int(row_index[bi, r])
            cols = key_index[bi][key_valid[bi]]
            scores[bi, :, row, cols] = edited[bi, :, r, : cols.numel()]
    probs = torch.nan_to_num(torch.softmax(scores, dim=-1), nan=0.0)
    return torch.matmul(probs, v).to(query.dtype)
