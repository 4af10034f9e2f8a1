"""Causal-LM cross-entropy without the full logits: the head and the loss run a chunk of tokens at a time.

A transformers causal LM given ``labels`` forms (batch, seq, vocab) logits, then a float32 copy and the
log-softmax, and keeps them for backward: for a 128,256-word vocabulary about 1.5 MiB per token, more than
the rest of a checkpointed 8B QLoRA step (at 32k tokens, 48 GiB of a 65 GiB peak). Here only the scored
positions go through the head, ``chunk_size`` tokens at a time, each chunk under activation checkpointing so
its logits are freed at once and recomputed in backward: the extra memory is one chunk's logits, the extra
work one more pass of the head (about 2% of an 8B model's FLOPs). The loss is the same sum over scored
tokens divided the same way as transformers' ``ForCausalLMLoss`` (mean, or the sum over
``num_items_in_batch``), up to float summation order.

``enable_chunked_loss(model, 4096)`` gives any transformers causal LM this loss for every call with
``labels`` while gradients are on (training); without labels, or under ``torch.no_grad()`` (validation,
generation), the model's own forward runs and returns its logits. With the chunked loss the output's
``logits`` is None: the point is never to form them. ``CausalLMModule(chunked_ce=...)`` and
``LoRACallback(chunked_ce=...)`` / ``LoRAMixin.chunked_ce`` use it.

Example::

    model = AutoModelForCausalLM.from_config(config)
    enable_chunked_loss(model, chunk_size=4096)
    loss = model(input_ids=ids, labels=ids).loss    # logits never formed
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = ["chunked_loss_size", "chunked_nll", "disable_chunked_loss", "enable_chunked_loss", "find_causal_lm"]

IGNORE_INDEX = -100
# Config fields of models whose logits are not plain ``lm_head(hidden)``: a chunked loss would skip that step.
# A soft cap, tanh(logits / cap) * cap, is applied whenever it is set (Gemma 2-4, RecurrentGemma, xLSTM), 1.0 included;
# a scale or multiplier (Cohere, Granite, MiniCPM3, HyperCLOVA X, Falcon-H1) only when it is not 1; Inkling cuts the
# logits to ``unpadded_vocab_size`` columns; Chameleon sets the logits of its image tokens (the "IMGIMG..." names of
# ``vocabulary_map``) to the dtype's minimum, so its softmax runs over the text tokens only. (Checked against
# transformers 5.24: what each modeling file does to the logits after the head call. Encoder-decoders, whose loss is
# another one, are refused apart.)
LOGIT_SOFTCAPS = ("final_logit_softcapping", "logits_soft_cap", "output_logit_soft_cap")
LOGIT_SCALES = ("logit_scale", "logits_scaling", "output_multiplier_scale", "lm_head_multiplier")
LOGIT_MASKS = ("vocabulary_map",)
LOGIT_TRANSFORMS = (*LOGIT_SOFTCAPS, *LOGIT_SCALES, "unpadded_vocab_size", *LOGIT_MASKS)


def check_chunk_size(chunk_size: Any, name: str = "chunk_size", allow_off: bool = False) -> int:
    """``chunk_size`` as a positive int (or 0 with ``allow_off``), or a ValueError naming ``name``."""
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < (0 if allow_off else 1):
        what = "an integer >= 0 (tokens per chunk; 0 = off)" if allow_off else "a positive integer (tokens per chunk)"
        raise ValueError(f"`{name}` must be {what}, got {chunk_size!r}. 1024 to 8192 is typical.")
    return chunk_size


def check_plain_head(model: nn.Module, name: str = "chunked_ce") -> nn.Module:
    """The output embedding (the vocabulary head) of ``model``, if its logits are ``head(hidden)``; else a ValueError."""
    config = getattr(model, "config", None)
    # A multimodal model keeps these fields in its text config (e.g. Gemma 4's config.text_config).
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else None
    for where, fields in ((config, "config"), (text_config, "text config")):
        for field in LOGIT_TRANSFORMS:
            setting = _logit_transform(where, field)
            if setting is not None:
                raise ValueError(
                    f"`{name}` needs logits = lm_head(hidden), but this model's {fields} sets {setting}, which "
                    f"transforms the logits and would be skipped; use {name}=0 for {type(model).__name__}."
                )
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, nn.Module):
        raise ValueError(f"`{name}` needs the model's vocabulary head, but {type(model).__name__}.get_output_embeddings() returned {head!r}.")
    return head


def _logit_transform(config: Any, field: str) -> str | None:
    """``field=value`` as the error shows it if ``config``'s ``field`` makes the model transform its logits, else None."""
    value = getattr(config, field, None)
    if value is None or (field in LOGIT_SCALES and value == 1):
        return None
    if field == "unpadded_vocab_size" and value == getattr(config, "vocab_size", None):
        return None
    if field in LOGIT_MASKS:
        masked = sorted(id_ for token, id_ in value.items() if str(token).startswith("IMGIMG")) if isinstance(value, dict) else []
        # A real vocabulary map holds thousands of entries: name the masked ids, not the map.
        return f"{field} with {len(masked)} image tokens (ids {masked[0]} to {masked[-1]}, their logits masked)" if masked else None
    return f"{field}={value!r}"


def _chunk_nll(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")


def chunked_nll(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """Summed NLL (float32) of ``targets`` (tokens,) under ``head(hidden)`` for hidden (tokens, hidden), by chunks.

    Every target must be scored (no ignore index): select the scored positions first. With gradients on, each
    chunk runs under non-reentrant checkpointing, so only one chunk's logits exist at a time. No targets: a zero
    that still depends on ``head`` and ``hidden`` (as transformers' loss does), so backward runs and gives zero
    gradients instead of raising, and a DDP rank with nothing to score still reduces gradients like the others.
    """
    nll = hidden.new_zeros((), dtype=torch.float32)
    grad = torch.is_grad_enabled()
    for start in range(0, max(targets.numel(), 1), chunk_size):  # at least one (possibly empty) chunk
        piece = (head, hidden[start : start + chunk_size], targets[start : start + chunk_size])
        nll = nll + (checkpoint(_chunk_nll, *piece, use_reentrant=False) if grad else _chunk_nll(*piece))
    return nll


def find_causal_lm(module: nn.Module) -> nn.Module:
    """``module`` itself or its outermost submodule that is a transformers causal LM (a vocabulary head and a backbone)."""
    for candidate in module.modules():
        base = getattr(candidate, "base_model", None)
        if isinstance(base, nn.Module) and base is not candidate and hasattr(candidate, "get_output_embeddings"):
            if isinstance(candidate.get_output_embeddings(), nn.Module):
                return candidate
    raise ValueError(
        f"`chunked_ce` needs a transformers causal LM (a model with get_output_embeddings() and a base_model), "
        f"but none is inside {type(module).__name__}. Use chunked_ce=0 for this model."
    )


def enable_chunked_loss(model: nn.Module, chunk_size: int = 4096) -> nn.Module:
    """Give the transformers causal LM in ``model`` the chunked loss (see the module docstring); returns that causal LM.

    Calling it again changes the chunk size. Undo with ``disable_chunked_loss``.
    """
    chunk_size = check_chunk_size(chunk_size)
    lm = find_causal_lm(model)
    if getattr(lm.config, "is_encoder_decoder", False):
        # Its loss scores the decoder's labels unshifted (BART adds final_logits_bias to the logits, too).
        raise ValueError(
            f"`chunked_ce` is the loss of a causal LM (position t scores token t + 1), but {type(lm).__name__} is an "
            "encoder-decoder (config.is_encoder_decoder=True), whose loss is another one: use chunked_ce=0 for it."
        )
    check_plain_head(lm)
    if getattr(lm.config, "output_router_logits", False):
        raise ValueError(
            f"`chunked_ce` computes the cross-entropy only, but {type(lm).__name__}'s config sets output_router_logits=True, "
            "whose router auxiliary loss transformers adds to the loss: set config.output_router_logits=False or chunked_ce=0."
        )
    current = lm.__dict__.get("forward")
    original = current.original if isinstance(current, _ChunkedForward) else lm.forward
    if "labels" not in inspect.signature(original).parameters:
        raise ValueError(f"`chunked_ce` replaces the loss of a forward that takes `labels`, but {type(lm).__name__}.forward does not.")
    lm.forward = _ChunkedForward(lm, original, chunk_size)  # an instance attribute: nn.Module.__call__ and its hooks stay
    return lm


def chunked_loss_size(model: nn.Module) -> int:
    """The chunk size of the chunked loss on the causal LM in ``model``; 0 if it has none."""
    for candidate in model.modules():
        current = candidate.__dict__.get("forward")
        if isinstance(current, _ChunkedForward):
            return current.chunk_size
    return 0


def disable_chunked_loss(model: nn.Module) -> None:
    """Give the causal LM in ``model`` back its own forward (a no-op if it has no chunked loss)."""
    for candidate in model.modules():
        current = candidate.__dict__.get("forward")
        if isinstance(current, _ChunkedForward):
            if current.original == getattr(type(candidate), "forward").__get__(candidate):
                del candidate.__dict__["forward"]
            else:
                candidate.__dict__["forward"] = current.original  # someone else's forward was there before ours


class _ChunkedForward:
    """The causal LM's forward with the chunked loss when it gets labels with gradients on; its own forward otherwise."""

    def __init__(self, lm: nn.Module, original: Any, chunk_size: int) -> None:
        self.lm, self.original, self.chunk_size = lm, original, chunk_size

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        signature = inspect.signature(self.original)
        arguments = dict(signature.bind(*args, **kwargs).arguments)
        var_keyword = next((n for n, p in signature.parameters.items() if p.kind is p.VAR_KEYWORD), None)
        arguments.update(arguments.pop(var_keyword, {}) if var_keyword else {})
        labels = arguments.pop("labels", None)
        if labels is None or not torch.is_grad_enabled():
            return self.original(*args, **kwargs)
        return _loss_forward(self.lm, labels, arguments, self.chunk_size)


def _loss_forward(lm: nn.Module, labels: torch.Tensor, arguments: dict[str, Any], chunk_size: int) -> Any:
    return_dict = arguments.pop("return_dict", None)
    num_items = arguments.pop("num_items_in_batch", None)
    shift_labels = arguments.pop("shift_labels", None)
    ignore_index = arguments.pop("ignore_index", IGNORE_INDEX)
    for name in ("logits_to_keep", "num_logits_to_keep"):
        arguments.pop(name, None)
    outputs = lm.base_model(**arguments)
    hidden = outputs[0]  # (batch, seq, hidden): a ModelOutput or a tuple
    if shift_labels is None:
        # Position t's target is token t + 1 (transformers' ForCausalLMLoss); the last position has none.
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    shift_labels = shift_labels.to(hidden.device)
    scored = shift_labels != ignore_index
    nll = chunked_nll(lm.get_output_embeddings(), hidden[scored], shift_labels[scored], chunk_size)
    denominator = scored.sum() if num_items is None else num_items
    loss = nll / (denominator.to(nll.device) if isinstance(denominator, torch.Tensor) else denominator)
    from transformers.modeling_outputs import CausalLMOutputWithPast

    # The backbone's other outputs (cache, hidden states, attentions) under the names this transformers version uses.
    given = outputs if isinstance(outputs, dict) else {}
    names = [f.name for f in dataclasses.fields(CausalLMOutputWithPast) if f.name not in ("loss", "logits")]
    extras = {name: given[name] for name in names if given.get(name) is not None}
    result = CausalLMOutputWithPast(loss=loss, logits=None, **extras)
    use_dict = return_dict if return_dict is not None else getattr(lm.config, "return_dict", True)
    return result if use_dict else result.to_tuple()
