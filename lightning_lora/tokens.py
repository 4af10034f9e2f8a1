"""Train chosen rows of an embedding (e.g. new tokens) and nothing else of it: PEFT's ``trainable_token_indices``.

``TrainableTokens`` wraps an ``nn.Embedding`` (or an ``nn.Linear`` output head) and holds the trained rows as one
parameter ``trainable_tokens_delta`` of shape (len(indices), dim), initialised to the rows it replaces. The forward
computes what the base would with those rows *replaced* (not added to), so re-initialising the rest of the table,
e.g. after ``resize_token_embeddings``, cannot change what the trained rows mean. PEFT stores the same tensor as
``<path>.token_adapter.trainable_tokens_delta``.

Tied embeddings: when the output head shares its weight with the input embedding, the head gets a
``TrainableTokens`` that follows the embedding's rows (``source``); it owns no parameter and saves nothing, as in
PEFT, so the new tokens are both read and predicted with the trained rows.

Cost: a plain ``nn.Embedding`` looks the rows up and swaps the trained ones in (no copy of the table); other
embedding classes (scaled ones, ``max_norm``, ...) run their own forward on a copy of the weight with the rows
replaced, as PEFT does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lightning_lora._matching import embeddings_of, matches_suffix, path_under


@dataclass(frozen=True)
class TokenPlan:
    """One wrapped module: the rows it trains, and the path of the module whose rows it follows (tied heads)."""

    indices: tuple[int, ...]
    rows: int
    """Rows of the wrapped weight (vocabulary size)."""
    dim: int
    tied_to: str | None = None


def _is_token_base(module: nn.Module) -> bool:
    return type(module) is nn.Linear or isinstance(module, nn.Embedding)


def _input_embedding_path(model: nn.Module) -> str | None:
    embedding = embeddings_of(model, "get_input_embeddings")
    for name, module in model.named_modules():
        if embedding is not None and module is embedding and name:
            return name
    hits = [name for name, module in model.named_modules() if matches_suffix(name, "embed_tokens")]
    return hits[0] if len(hits) == 1 else None


def plan_tokens(model: nn.Module, indices: list[int] | dict[str, list[int]] | None, forbidden: dict[str, str]) -> dict[str, TokenPlan]:
    """Module path -> ``TokenPlan`` for ``LoRAConfig.trainable_token_indices`` on ``model`` (validated, nothing changed).

    A list targets the input embedding (``get_input_embeddings()``, else the one ``embed_tokens``); a dict names
    modules by path suffix. Heads whose weight *is* a targeted embedding's weight follow its rows, unless the dict
    names them with rows of their own. ``forbidden`` maps paths no token module may be in (LoRA layers,
    modules_to_save) to what they are.
    """
    if indices is None:
        return {}
    modules = dict(model.named_modules())
    embeddings = sorted(name for name, module in modules.items() if name and isinstance(module, nn.Embedding))
    if isinstance(indices, dict):
        targets: dict[str, list[int]] = {}
        for key, ids in indices.items():
            hits = [name for name, module in modules.items() if name and matches_suffix(name, key)]
            if not hits:
                raise ValueError(
                    f"`trainable_token_indices` names {key!r}, which matches no module of {type(model).__name__}. "
                    f"Its embeddings are {embeddings}; name one by its path suffix, e.g. 'embed_tokens'."
                )
            targets.update(dict.fromkeys(hits, ids))
    else:
        path = _input_embedding_path(model)
        if path is None:
            raise ValueError(
                f"`trainable_token_indices` is a list, but {type(model).__name__} has no single input embedding to apply it to "
                f"(embeddings: {embeddings}). Pass a dict instead, e.g. {{'embed_tokens': {indices!r}}}."
            )
        targets = {path: indices}
    plans: dict[str, TokenPlan] = {}
    for path, ids in targets.items():
        module = modules[path]
        if not _is_token_base(module):
            raise ValueError(
                f"`trainable_token_indices` targets {path!r}, a {type(module).__name__}: only nn.Embedding and "
                "unquantized nn.Linear output heads can train single rows."
            )
        for other, what in forbidden.items():
            if path_under(path, other) or path_under(other, path):
                raise ValueError(
                    f"`trainable_token_indices` targets {path!r}, which is also in {what} {other!r}: train it in full "
                    "(modules_to_save) or by rows (trainable_token_indices), not both."
                )
        rows, dim = module.weight.shape
        too_big = [i for i in ids if i >= rows]
        if too_big:
            raise ValueError(
                f"`trainable_token_indices` for {path!r} holds {too_big[:3]}, but it has {rows} rows: resize the embeddings "
                "first (model.resize_token_embeddings) so that the new tokens have rows."
            )
        plans[path] = TokenPlan(tuple(ids), rows, dim)
    for path, plan in list(plans.items()):
        if plan.tied_to is not None or not isinstance(modules[path], nn.Embedding):
            continue
        weight = modules[path].weight
        for name, module in modules.items():
            if module is modules[path] or getattr(module, "weight", None) is not weight:
                continue
            if name in plans and plans[name].indices != plan.indices:
                continue  # named with rows of its own: trained on its own (PEFT does the same)
            if type(module) is not nn.Linear:
                raise ValueError(f"{name!r} shares its weight with the embedding {path!r} but is a {type(module).__name__}; only nn.Linear heads can follow trained rows.")
            for other, what in forbidden.items():
                if path_under(name, other):
                    raise ValueError(f"The head {name!r} shares its weight with {path!r} and is also in {what} {other!r}: that cannot work with tied rows.")
            plans[name] = TokenPlan(plan.indices, plan.rows, plan.dim, tied_to=path)
    return plans


class TrainableTokens(nn.Module):
    """An embedding (or output head) whose rows ``token_indices`` are replaced by trained values.

    Example::

        embedding = TrainableTokens(nn.Embedding(128, 64), [5, 7])
        assert embedding.trainable_tokens_delta.shape == (2, 64)   # starts as rows 5 and 7: outputs unchanged
    """

    def __init__(self, base_layer: nn.Module, token_indices: list[int] | tuple[int, ...], source: TrainableTokens | None = None) -> None:
        super().__init__()
        if not _is_token_base(base_layer):
            raise TypeError(f"TrainableTokens wraps nn.Embedding or nn.Linear, got {type(base_layer).__name__}.")
        self.base_layer = base_layer
        weight = base_layer.weight
        index = torch.tensor(list(token_indices), dtype=torch.long, device=weight.device)
        self.register_buffer("token_indices", index, persistent=False)
        # slot[token] = its row in the delta, or -1: one lookup per token in the forward.
        slots = torch.full((weight.shape[0],), -1, dtype=torch.long, device=weight.device)
        slots[index] = torch.arange(len(index), device=weight.device)
        self.register_buffer("slots", slots, persistent=False)
        self._source = [source] if source is not None else []  # a list: the followed module is not our submodule
        if source is None:
            self.trainable_tokens_delta = nn.Parameter(weight.detach()[index].float().clone())
        # A plain embedding looks rows up and swaps the trained ones in; anything that changes the lookup or its
        # gradient (max_norm, scale_grad_by_freq, sparse, a trained padding row, a subclass) runs on a replaced weight.
        padding = None if getattr(base_layer, "padding_idx", None) is None else int(base_layer.padding_idx) % weight.shape[0]
        self._lookup = (
            type(base_layer) is nn.Embedding
            and base_layer.max_norm is None
            and not base_layer.scale_grad_by_freq
            and not base_layer.sparse
            and padding not in set(token_indices)
        )
        self._original_rows: torch.Tensor | None = None
        self.merged = False
        self.enabled = True

    @property
    def source(self) -> TrainableTokens | None:
        """The ``TrainableTokens`` whose rows this one follows (a tied head), or None."""
        return self._source[0] if self._source else None

    @property
    def delta(self) -> torch.Tensor:
        return self.source.trainable_tokens_delta if self.source is not None else self.trainable_tokens_delta

    @property
    def weight(self) -> torch.Tensor:
        """The base weight (as it is, without the trained rows), for code that reads ``module.weight.dtype`` and the like."""
        return self.base_layer.weight

    def _active(self) -> bool:
        leader = self.source or self
        return leader.enabled and not leader.merged

    def replaced_weight(self) -> torch.Tensor:
        """The base weight with the trained rows in place (differentiable in the delta)."""
        weight = self.base_layer.weight
        return weight.index_copy(0, self.token_indices, self.delta.to(weight.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        if not self._active():
            return base(x)
        if isinstance(base, nn.Linear):
            # Output head: the trained rows give these logits; the other logits are the base's.
            out = base(x)
            bias = None if base.bias is None else base.bias[self.token_indices]
            columns = F.linear(x, self.delta.to(base.weight.dtype), bias)
            return out.index_copy(out.dim() - 1, self.token_indices, columns.to(out.dtype))
        if self._lookup:
            out = base(x)  # (..., dim)
            slot = self.slots[x]
            rows = self.delta.to(out.dtype)[slot.clamp_min(0)]
            return torch.where((slot >= 0).unsqueeze(-1), rows, out)
        return torch.func.functional_call(base, {"weight": self.replaced_weight()}, (x,))

    @torch.no_grad()
    def merge(self) -> None:
        """Write the trained rows into the base weight (a tied head follows its source and does nothing)."""
        if self.merged or self.source is not None:
            return
        weight = self.base_layer.weight
        self._original_rows = weight[self.token_indices].clone()
        weight.index_copy_(0, self.token_indices, self.delta.to(weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged or self.source is not None:
            return
        self.base_layer.weight.index_copy_(0, self.token_indices, self._original_rows)
        self._original_rows = None
        self.merged = False

    def merged_state(self) -> dict[str, torch.Tensor]:
        """The wrapped module's state dict with the trained rows in place, keyed as in the original model."""
        state = {key: value.detach() for key, value in self.base_layer.state_dict().items()}
        leader = self.source or self
        if not leader.merged:
            state["weight"] = self.replaced_weight().detach()
        return state

    def extra_repr(self) -> str:
        tied = f", follows rows of {type(self.source.base_layer).__name__}" if self.source is not None else ""
        return f"tokens={len(self.token_indices)}{tied}"


def token_layers(model: nn.Module) -> dict[str, TrainableTokens]:
    """Every ``TrainableTokens`` of ``model`` by its module path (tied heads included)."""
    return {name: module for name, module in model.named_modules() if isinstance(module, TrainableTokens)}
