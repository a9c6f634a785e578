"""FLOPs of scoring a set of windows, counted from the model's shapes (the useful work only).

- body, per processed token: 2 x the parameters of the transformer body without the token
  embedding (each weight is one multiply-add per token);
- attention, per layer and per query position i of a window: 4 x (query heads x head_dim) x the
  keys it sees, min(i + 1, window of that layer) (QK^T and the weighted sum of V, causal;
  Gemma-3's sliding layers see at most ``sliding_window`` keys);
- head, per scored token: 2 x hidden x vocabulary.

No tool needs more than this; what a tool computes beyond it (logits of unscored positions,
masked-out scores) is its own overhead and shows as a lower fraction of the peak.
"""

from __future__ import annotations


def causal_pairs(length: int, window: int | None) -> int:
    """sum over i < length of min(i + 1, window): the (query, key) pairs of one causal window."""
    if not window or window >= length:
        return length * (length + 1) // 2
    return window * (window + 1) // 2 + (length - window) * window


def model_shapes(model) -> dict:
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    body = sum(p.numel() for p in model.base_model.parameters()) - model.get_input_embeddings().weight.numel()
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    types = getattr(cfg, "layer_types", None) or ["full_attention"] * cfg.num_hidden_layers
    windows = [getattr(cfg, "sliding_window", None) if t == "sliding_attention" else None for t in types]
    head = model.get_output_embeddings().weight
    return {"body_params": int(body), "attn_width": heads * head_dim, "layer_windows": windows,
            "hidden": int(head.shape[1]), "vocab": int(head.shape[0])}


def task_flops(shapes: dict, window_lengths: list[int], scored: int) -> float:
    tokens = sum(window_lengths)
    attn = sum(4 * shapes["attn_width"] * causal_pairs(t, w) for t in window_lengths for w in shapes["layer_windows"])
    return 2.0 * shapes["body_params"] * tokens + attn + 2.0 * shapes["hidden"] * shapes["vocab"] * scored
