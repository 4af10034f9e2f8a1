"""Document-masked attention for packed batches (``lightning_lora.data.packing``): each example attends only to itself.

How transformers (5.x) takes packed rows, and why this module exists:

- With ``position_ids`` that restart and no ``attention_mask``, ``create_causal_mask`` detects the packing and
  builds a per-document mask for the model's attention backend. For ``sdpa`` and ``eager`` that mask is a dense
  ``(rows, 1, t, t)`` tensor: quadratic memory, not acceptable at 2k+ tokens. ``flash_attention_2`` would use
  ``cu_seq_lens_q/k`` (varlen) but needs the flash-attn package; ``flex_attention`` gets a sparse BlockMask.
- FlexAttention has no backward on CPU (torch 2.13 raises "FlexAttention does not support backward on CPU",
  eager or compiled; measured), so it cannot train there, and on the GPU it needs a BlockMask per batch and a
  Triton compile.
- torch's own ``torch.nn.attention.varlen.varlen_attn`` (torch >= 2.10) runs the FlashAttention-2 kernel that
  ships inside torch on ``cu_seq_lens``: exact per-document lengths, no mask tensor, no compile, no extra
  package, and FA2 is faster than FlexAttention on the same mask (PyTorch's FlexAttention post: ~90% of FA2
  forward, ~85% backward). It needs CUDA and fp16/bf16.

So a packed batch runs through ``packed_attention_forward``, registered in transformers' ``AttentionInterface``
(``enable_packed_attention`` points the model's config at it, ``restore_attention`` undoes that):
``varlen_attn`` on CUDA in fp16/bf16 (or float32 under fp16/bf16 autocast) without attention dropout, else one ``scaled_dot_product_attention`` call
per document (exact, memory ~ the sum of squared document lengths; the CPU path). A model whose
``attn_implementation`` is ``flex_attention`` keeps it (the BlockMask comes from the restarting position ids;
CUDA only, for training). Models that cannot pack correctly are refused with an error, never run with
examples seeing each other.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

PACKED_ATTENTION = "lightning_lora_packed"
# Attention kinds of ``config.layer_types`` that document masks cover; anything else (linear attention, state
# space or convolution layers) mixes tokens outside attention, across examples.
_ATTENTION_LAYERS = {"full_attention", "sliding_attention"}
_HALF = (torch.float16, torch.bfloat16)

try:  # torch >= 2.10
    from torch.nn.attention.varlen import varlen_attn as _varlen_attn

    _VARLEN_PARAMS = set(inspect.signature(_varlen_attn).parameters)
except ImportError:  # pragma: no cover - older torch: the per-document path only
    _varlen_attn, _VARLEN_PARAMS = None, set()


def check_packable(model: nn.Module, training: bool = True) -> None:
    """Raise ``ValueError`` if ``model`` cannot run packed batches with each example attending only to itself."""
    name = type(model).__name__
    config = getattr(model, "config", None)
    if config is None or not getattr(model, "_supports_attention_backend", False):
        raise ValueError(
            f"packing needs a transformers model whose attention goes through transformers' AttentionInterface "
            f"(`_supports_attention_backend`); {name} does not, so its examples would see each other. "
            "Turn packing off for this model (packing=False on the data module)."
        )
    if getattr(config, "sub_configs", None):
        raise ValueError(
            f"packing supports text-only causal LMs; {name} has sub-models {sorted(config.sub_configs)}. "
            "Turn packing off (packing=False on the data module)."
        )
    counted = next((m for m in model.modules() if hasattr(type(m), "create_position_ids_from_input_ids")), None)
    if counted is not None:
        # RoBERTa and its kin (XLM-R, CamemBERT, Data2VecText, X-MOD): unpacked, positions are counted from
        # padding_idx + 1 and skip pad tokens; packed rows give 0, 1, ... per example, other position embeddings.
        raise ValueError(
            f"packing gives every example position ids 0, 1, 2, ..., but {name}'s {type(counted).__name__} counts "
            "positions from padding_idx + 1, so packed examples would get other position embeddings than unpacked. "
            "Turn packing off for this model (packing=False on the data module)."
        )
    other = sorted(set(getattr(config, "layer_types", None) or ()) - _ATTENTION_LAYERS)
    if other:
        raise ValueError(
            f"packing needs every token-mixing layer to be attention, but {name} has layer_types {other}, which "
            "mix tokens across packed examples. Turn packing off (packing=False on the data module)."
        )
    if config._attn_implementation == "flex_attention" and training and _parameter_device(model).type == "cpu":
        raise ValueError(
            "attn_implementation='flex_attention' cannot train packed batches on CPU: FlexAttention has no backward "
            "there. Use attn_implementation='sdpa' (packed batches then run one attention call per example)."
        )


def enable_packed_attention(model: nn.Module, training: bool = True) -> None:
    """Route ``model``'s attention through ``packed_attention_forward`` until ``restore_attention(model)``.

    The switch stays on through backward on purpose: gradient checkpointing recomputes each layer there, and
    the recompute must attend per document too. While it is on, calls without ``cu_seq_lens`` are refused.
    ``flex_attention`` models keep their backend (transformers builds a BlockMask from the position ids).
    Idempotent; raises ``ValueError`` (and changes nothing) for models that cannot pack.
    """
    check_packable(model, training)
    config = model.config
    if config._attn_implementation in ("flex_attention", PACKED_ATTENTION):
        return
    _register()
    model._lightning_lora_attention = config._attn_implementation  # what restore_attention puts back
    config._attn_implementation = PACKED_ATTENTION


def restore_attention(model: nn.Module) -> None:
    """Undo ``enable_packed_attention``: the model's own ``attn_implementation`` again (no-op if not switched)."""
    original = model.__dict__.pop("_lightning_lora_attention", None)
    if original is not None:
        model.config._attn_implementation = original


@contextmanager
def packed_attention(model: nn.Module, training: bool = True) -> Iterator[None]:
    """``enable_packed_attention`` for the block, ``restore_attention`` after; keep the backward inside it.

    Call the model with the packed batch's ``position_ids``, ``cu_seq_lens_q/k`` and ``max_length_q/k`` and no
    ``attention_mask``.

    Example::

        with packed_attention(model):
            logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                           cu_seq_lens_q=batch["cu_seq_lens"], cu_seq_lens_k=batch["cu_seq_lens"],
                           max_length_q=batch["max_length"], max_length_k=batch["max_length"]).logits
            loss_of(logits, batch["labels"]).backward()
    """
    enable_packed_attention(model, training)
    try:
        yield
    finally:
        restore_attention(model)


def packed_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    cu_seq_lens_q: torch.Tensor | None = None,
    cu_seq_lens_k: torch.Tensor | None = None,
    max_length_q: int | None = None,
    max_length_k: int | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention function over packed rows; returns ``(output (rows, t, heads, head_dim), None)``.

    ``query`` is ``(rows, heads, t, head_dim)``, ``key``/``value`` ``(rows, kv_heads, t, head_dim)``;
    ``cu_seq_lens_q`` cuts the flattened ``rows * t`` tokens into documents.
    """
    _check_call(module, query, attention_mask, cu_seq_lens_q, cu_seq_lens_k, max_length_q, kwargs)
    rows, heads, length, dim = query.shape
    kv_heads = key.shape[1]
    q = query.transpose(1, 2).reshape(rows * length, heads, dim)  # (tokens, heads, head_dim)
    k = key.transpose(1, 2).reshape(rows * length, kv_heads, dim)
    v = value.transpose(1, 2).reshape(rows * length, kv_heads, dim)
    half = _varlen_dtype(q) if _varlen_attn is not None and dropout == 0.0 else None
    if half is not None:
        out = _varlen(q.to(half), k.to(half), v.to(half), cu_seq_lens_q, max_length_q, scaling)
    else:
        out = _per_document(q, k, v, cu_seq_lens_q, scaling, dropout)
    return out.view(rows, length, heads, dim), None


def _check_call(
    module: nn.Module,
    query: torch.Tensor,
    attention_mask: Any,
    cu_q: Any,
    cu_k: Any,
    max_length: Any,
    kwargs: dict[str, Any],
) -> None:
    where = f"{type(module).__name__} under packing"
    if cu_q is None or max_length is None:
        raise ValueError(
            f"{where} got no cu_seq_lens_q / max_length_q, but the model's attention is switched to packed attention "
            "(by CausalLMModule on a packed batch, or enable_packed_attention). Pass the packed batch's cu_seq_lens "
            "and max_length, or call lightning_lora.tasks.packed_attention.restore_attention(model) (CausalLMModule "
            "does on its next unpacked batch and at the end of fit) before unpacked calls. If the call did pass them "
            f"(CausalLMModule does), {type(module).__name__} does not hand the model's keyword arguments to its "
            "attention, so it cannot pack: turn packing off (packing=False on the data module)."
        )
    if cu_k is not None and cu_k is not cu_q and not torch.equal(cu_k, cu_q):
        raise ValueError(f"{where}: cu_seq_lens_k differs from cu_seq_lens_q; packed self-attention needs one layout.")
    if attention_mask is not None:
        raise ValueError(
            f"{where} received an attention mask of shape {tuple(attention_mask.shape)}; packed batches must not "
            "carry attention_mask (documents are separated by cu_seq_lens). If the batch had none, the model built "
            "this mask itself and cannot pack: turn packing off (packing=False on the data module)."
        )
    if not getattr(module, "is_causal", True):
        raise ValueError(f"{where}: the layer is not causal (is_causal=False); packing is for causal LMs only.")
    window = kwargs.get("sliding_window")
    if window is not None and window < query.shape[2]:
        raise ValueError(
            f"{where}: sliding_window={window} is shorter than the packed rows ({query.shape[2]} tokens) and packed "
            "attention has no window; use rows of at most that many tokens or turn packing off."
        )
    for name in ("softcap", "s_aux", "position_bias"):
        if kwargs.get(name) is not None:
            raise ValueError(f"{where}: the model's attention uses {name}, which packed attention does not implement; turn packing off.")


def _varlen_dtype(q: torch.Tensor) -> torch.dtype | None:
    """The half dtype the varlen kernel can run ``q`` in: its own, or autocast's on CUDA; None: the per-document path.

    A float32 model under bf16 autocast (Lightning's "bf16-mixed") has float32 queries after rotary embeddings
    (cos / sin come in the residual stream's dtype); SDPA would compute them in bf16 under autocast, and so does
    this (the kernel itself is not an autocast op).
    """
    if not q.is_cuda:
        return None
    if q.dtype in _HALF:
        return q.dtype
    if q.dtype == torch.float32 and torch.is_autocast_enabled("cuda") and torch.get_autocast_dtype("cuda") in _HALF:
        return torch.get_autocast_dtype("cuda")
    return None


def _varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, max_length: int, scale: float | None) -> torch.Tensor:
    # max_length is the batch's longest segment (padding is cut into pieces no longer), so no FA2 block past any
    # segment end is launched for nothing. torch 2.10 spells causal as is_causal, later versions as window_size;
    # grouped-query heads need enable_gqa (torch >= 2.12) or repeated key/value heads.
    causal = {"window_size": (-1, 0)} if "window_size" in _VARLEN_PARAMS else {"is_causal": True}
    if k.shape[1] != q.shape[1]:
        if "enable_gqa" in _VARLEN_PARAMS:
            causal["enable_gqa"] = True
        else:
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
            v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    return _varlen_attn(q, k, v, cu, cu, max_length, max_length, scale=scale, **causal)


@torch.compiler.disable  # Python ints from cu_seq_lens: compiled, every new batch layout would recompile
def _per_document(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, scale: float | None, dropout: float) -> torch.Tensor:
    # One causal SDPA call per document: exact, and memory grows with each document's own length squared.
    # split (not slicing) so backward concatenates the documents' gradients once instead of adding each
    # into a zero tensor of the whole batch; 4-D inputs, which torch's fused CPU kernel needs (3-D runs the math path).
    gqa = k.shape[1] != q.shape[1]
    lengths = cu.diff().tolist()
    outs = [
        F.scaled_dot_product_attention(
            q_doc.transpose(0, 1)[None], k_doc.transpose(0, 1)[None], v_doc.transpose(0, 1)[None],
            dropout_p=dropout, is_causal=True, scale=scale, enable_gqa=gqa,
        )[0].transpose(0, 1)  # (length, heads, head_dim)
        for q_doc, k_doc, v_doc in zip(q.split(lengths), k.split(lengths), v.split(lengths))
    ]
    return torch.cat(outs, dim=0)


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(PACKED_ATTENTION, packed_attention_forward)  # a dict entry: idempotent


def _parameter_device(model: nn.Module) -> torch.device:
    return next(iter(model.parameters()), torch.empty(0)).device
