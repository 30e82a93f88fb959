"""Site names: where an edit acts, as a string an adapter resolves per architecture (pyvene's idea).

A method names a site; the family adapter knows which module (or which tensor inside steer's attention
function) it is; the backend installs the edit there. A method never sees an ``nn.Module``.

Per-layer sites (``layer.*``, ``vision.layer.*``) take the layer indices from the edit's ``layers``.
"""

from __future__ import annotations

#: site -> what it holds. Shapes: B batch rows, T positions of the call, D hidden, H query heads, d head dim,
#: V vocabulary; T' = the positions ``lm_head`` projects (``logits_to_keep``).
SITES: dict[str, str] = {
    # language model
    "lm.inputs": "the language model's forward inputs: embeddings, 2-D mask, position ids (1-D [B, T] or M-RoPE [3, B, T])",
    "layer.in": "the residual stream entering decoder layer l, [B, T, D]",
    "layer.out": "the residual stream leaving decoder layer l, [B, T, D]",
    "layer.mlp.out": "decoder layer l's MLP output, before it is added to the residual stream, [B, T, D]",
    "layer.attn.scores": "decoder layer l's attention scores and probabilities (inside steer's attention function)",
    "layer.attn.probs": "decoder layer l's post-softmax attention probabilities of the call's query rows, [B, H, Lq, Lk] (read only)",
    "layer.attn.probs.edited": "the same after the layer's mask edits and key-group reweighting: the probabilities its output is made of (read only)",
    "layer.attn.head_out": "decoder layer l's attention output per head, the input of its output projection, [B, T, H, d]",
    "layer.logits": "lm_head applied to layer l's output (logit lens), [B, T', V]",
    "layer.logits.normed": "lm_head applied to the final norm of layer l's output, [B, T', V]",
    "logits": "the final logits, [B, T', V]",
    "generate": "the decoding loop of ``model.generate`` (a method's own beam search)",
    # vision side
    "vision.layer.attn": "vision layer l's attention (visual-token scores: [CLS] row or mean received attention)",
    "vision.out": "the image features the language model receives (one run of tokens per image)",
    # diffusers pipelines
    "unet.attn2": "a UNet cross-attention layer's processor (prompt-token attention)",
    "latents": "the denoising loop's latent, before each step's UNet call",
}

LAYER_SITES = tuple(name for name in SITES if name.startswith("layer."))


def check_site(site: str) -> str:
    """Return ``site`` if it is known, else raise ``ValueError`` listing the known sites."""
    if site not in SITES:
        raise ValueError(f"unknown site {site!r}; known sites: {', '.join(SITES)}")
    return site


__all__ = ["LAYER_SITES", "SITES", "check_site"]
