"""Build a LoRA / QLoRA model of which every FSDP rank holds only its own shard.

``loading.build_quantized_model`` gives every rank the whole packed model (35.7 GiB of host memory
per rank for a 70B shape, whatever the world size). Here the model is built on the meta device,
LoRA is injected there, and each part (a decoder block; last, everything else) is made real by one
rank, its *owner* (part ``i``: rank ``i % world``). The owner materializes the part on its device,
fills it (that part's checkpoint tensors only, or the model's init under the part's seed) and
quantizes it; the other ranks allocate the same packed layout empty (bitsandbytes run on meta
tensors gives its shapes) and receive the values by broadcast. FSDP then keeps each rank's shard:

- FSDP2 (``shard='fsdp2'``, or Lightning's ``ModelParallelStrategy``): each block is
  ``fully_shard``-ed as soon as it is real, then the root.
- FSDP1 (``shard='fsdp1'``, or Lightning's ``FSDPStrategy``): the model goes to FSDP still on meta.
  FSDP calls its ``param_init_fn`` on the modules of each unit just before it flattens and shards
  that unit; ours builds the part those modules belong to.

So a rank holds its shard, one full-precision part while it quantizes a part it owns, and one packed
part in flight. Each rank reads only the checkpoint tensors of the parts it owns. The quantization
state of every layer (absmax, codebooks: about 1/32 of the packed bytes with double quant) stays
whole on every rank: FSDP does not shard it, and bitsandbytes reads it from the module in forward.

LoRA A of each layer is drawn on the CPU from a generator seeded by ``(seed, layer path)`` and B is
zero, so every rank, every world size and the unsharded build (``shard=None``) give the same
adapter, and the same packed bytes as ``build_quantized_model`` with the same seed.

Example (Lightning; ``FSDPStrategy`` or ``ModelParallelStrategy``)::

    class LM(L.LightningModule):
        def configure_model(self):
            if self.model is None:
                self.model = build_lora_model(LlamaConfig(...), LORA, QUANT, strategy=self.trainer.strategy)
"""

from __future__ import annotations

import copy
import contextlib
import math
import os
import weakref
import zlib
from collections.abc import Callable, Iterator
from typing import Any, Literal

import torch
from torch import nn

from lightning_lora import dora, quantization
from lightning_lora._matching import output_head_names
from lightning_lora._parts import (
    CheckpointReader,
    Part,
    Slot,
    decoder_blocks,
    join,
    materialize,
    meta_model,
    plan_parts,
    quantize_part,
    random_init,
    resolve_config,
    resolve_device,
    under,
    will_quantize,
)
from lightning_lora.config import LoRAConfig, QuantizationConfig, init_changes_base
from lightning_lora.inject import inject_lora, lora_state
from lightning_lora.layers import LoRALinear

Shard = Literal["fsdp1", "fsdp2"]
_BUILD_ATTR = "_lightning_lora_pending_build"


def build_lora_model(
    config_or_path: Any,
    lora_config: LoRAConfig,
    quantization_config: QuantizationConfig | None = None,
    *,
    strategy: Any = None,
    shard: Shard | None = None,
    mesh: Any = None,
    device: torch.device | str | None = None,
    checkpoint: str | os.PathLike | None = None,
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
    model_class: Any = None,
    reshard_after_forward: bool = True,
    mp_policy: Any = None,
) -> nn.Module:
    """A transformers model with LoRA injected and its backbone quantized, each rank holding only its FSDP shard.

    Call it on every rank (it runs collectives), e.g. in ``LightningModule.configure_model``. The
    model comes back carrying its LoRA state, so ``LoRACallback`` / ``LoRAMixin`` inject nothing
    more; they check that their LoRA config is this one (``LoRACallback(from_backbone=True)`` takes
    it from the model instead).

    Args:
        config_or_path: A transformers ``PretrainedConfig``, or a directory with ``config.json`` (and
            the checkpoint's ``*.safetensors`` unless ``checkpoint`` names them elsewhere).
        lora_config: The adapter to inject.
        quantization_config: How to quantize the backbone (nf4 / fp4; int8 only unsharded), or None for
            a full-precision backbone.
        strategy: The Lightning strategy (``self.trainer.strategy``): ``FSDPStrategy`` means
            ``shard='fsdp1'``, ``ModelParallelStrategy`` ``shard='fsdp2'`` on its data-parallel mesh,
            anything else an unsharded build on its device.
        shard: Without a strategy: 'fsdp2' (``fully_shard`` each block on ``mesh``), 'fsdp1' (the
            model stays on meta until ``FullyShardedDataParallel(model, param_init_fn=
            sharded_param_init_fn(model), ...)`` builds it unit by unit), or None (the whole model here).
        mesh: FSDP2's device mesh; default: one dimension over the whole world.
        device: Where parts are built; default the strategy's device, else the current CUDA device or the CPU.
        checkpoint: A ``.safetensors`` file or a directory of them. None: seeded random weights (benchmarks, tests).
        dtype: Dtype of the weights that stay unquantized and of the full-precision weights before quantization.
        seed: Seed of the random init (block ``i``: ``seed + i + 1``, the rest ``seed``) and of LoRA A.
        model_class: The transformers class to build; default ``AutoModelForCausalLM``.
        reshard_after_forward, mp_policy: Passed to FSDP2's ``fully_shard``.
    """
    if not isinstance(lora_config, LoRAConfig):
        raise TypeError(f"`lora_config` must be a LoRAConfig, got {type(lora_config).__name__}: build one with LoRAConfig(r=..., ...).")
    if quantization_config is not None and not isinstance(quantization_config, QuantizationConfig):
        raise TypeError(
            f"`quantization_config` must be a QuantizationConfig or None, got {type(quantization_config).__name__}: "
            "build one with QuantizationConfig(mode='nf4')."
        )
    shard, mesh, device = _resolve_sharding(strategy, shard, mesh, device)
    _check_quantization(quantization_config, shard, dtype)
    _check_lora(lora_config, shard)
    config, checkpoint = resolve_config(config_or_path, checkpoint)
    reader = CheckpointReader(checkpoint) if checkpoint is not None else None

    model = meta_model(config, dtype, model_class)
    inject_lora(model, lora_config)  # on meta: wraps the targets and freezes the rest, allocating nothing
    state = lora_state(model)
    skip = output_head_names(model) | {name for name, _ in model.named_modules() if any(under(name, r) for r in state.modules_to_save)}
    slots, adapters = lora_slots(model)
    parts = plan_parts(model, slots, seed)
    if shard is not None:
        _refuse_ties_across_parts(parts)
    state.quantization = quantization_config
    state.plan.quantize = [s.name for part in parts for s in part.slots if will_quantize(s, quantization_config, skip)]
    if state.quantized:
        model.is_loaded_in_4bit = quantization_config.mode != "int8"
        model.is_loaded_in_8bit = quantization_config.mode == "int8"

    build = _PartBuilder(model, parts, adapters, lora_config, quantization_config, skip, device, dtype, reader, seed, shard is not None)
    if shard == "fsdp1":
        setattr(model, _BUILD_ATTR, build)
        if strategy is not None:
            _install_in_fsdp_strategy(strategy, model, build)
        return model

    fsdp_kwargs: dict[str, Any] = {"mesh": mesh, "reshard_after_forward": reshard_after_forward}
    if mp_policy is not None:
        fsdp_kwargs["mp_policy"] = mp_policy
    blocks = [block for _, block in decoder_blocks(model)]
    for part in parts:
        build.build(part)
        if shard == "fsdp2" and part.index < len(blocks):
            from torch.distributed.fsdp import fully_shard

            fully_shard(blocks[part.index], **fsdp_kwargs)  # from here this rank keeps only its shard of the block
    if shard == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        fully_shard(model, **fsdp_kwargs)
    build.finish()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return model


def _check_lora(config: LoRAConfig, shard: Shard | None) -> None:
    """The adapters this build can make: every rank must get the same one from the seed and the backbone's own bytes."""
    if init_changes_base(config.init):
        raise ValueError(
            f"`lora_config.init`={config.init!r} is not supported by build_lora_model: PiSSA / OLoRA factor each full-precision "
            "weight and leave a residual in it, which a build that quantizes and shards part by part on meta does not do. "
            "Use init='kaiming' / 'gaussian' here, or inject_lora(init=...) on a model loaded in full."
        )
    if config.use_dora and shard == "fsdp1":
        raise ValueError(
            "`lora_config.use_dora`=True is not supported with shard='fsdp1' (FSDPStrategy): DoRA reads A, B and its magnitude "
            "as whole tensors, which FSDP1 units hold only inside their own forward. Use shard='fsdp2' (ModelParallelStrategy) "
            "or use_dora=False."
        )


def sharded_param_init_fn(model: nn.Module) -> Callable[[nn.Module], None]:
    """FSDP1's ``param_init_fn`` for a model from ``build_lora_model(..., shard='fsdp1')`` (Lightning's FSDPStrategy gets it itself).

    Example::

        model = build_lora_model(config, LORA, QUANT, shard="fsdp1", device="cuda")
        model = FullyShardedDataParallel(model, auto_wrap_policy=lora_fsdp_policy({LlamaDecoderLayer}),
                                         param_init_fn=sharded_param_init_fn(model), device_id=torch.cuda.current_device(),
                                         use_orig_params=True)
    """
    build = getattr(model, _BUILD_ATTR, None)
    if build is None:
        raise ValueError(
            f"`model` ({type(model).__name__}) has nothing left to build: it did not come from "
            "build_lora_model(..., shard='fsdp1'), or FSDP has built it already."
        )
    return build.param_init_fn


def lora_slots(model: nn.Module) -> tuple[list[Slot], list[tuple[str, LoRALinear]]]:
    """The backbone's modules under their names in the model without LoRA, and the LoRA layers.

    A LoRA layer's base takes the layer's place and name (``...q_proj``, not ``...q_proj.base_layer``),
    and the adapter linears are left out, so checkpoint keys, skip patterns and the order of the random
    init are those of the plain model.
    """
    slots: list[Slot] = []
    adapters: list[tuple[str, LoRALinear]] = []
    seen: set[int] = set()

    def visit(module: nn.Module, name: str, parent: nn.Module | None, attr: str) -> None:
        if id(module) in seen:
            return
        seen.add(id(module))
        if isinstance(module, LoRALinear):
            adapters.append((name, module))
            visit(module.base_layer, name, module, "base_layer")
            return
        slots.append(Slot(name, module, parent, attr))
        for child_attr, child in module._modules.items():
            if child is not None:
                visit(child, join(name, child_attr), module, child_attr)

    visit(model, "", None, "")
    return slots, adapters


class _PartBuilder:
    """Makes the parts of one meta model real, part by part, on every rank in the same order."""

    def __init__(
        self,
        model: nn.Module,
        parts: list[Part],
        adapters: list[tuple[str, LoRALinear]],
        lora_config: LoRAConfig,
        quantization_config: QuantizationConfig | None,
        skip: set[str],
        device: torch.device,
        dtype: torch.dtype,
        reader: CheckpointReader | None,
        seed: int,
        distributed: bool,
    ) -> None:
        import torch.distributed as dist

        self.model = weakref.ref(model)  # the model holds this builder until it is built (FSDP1)
        self.parts = parts
        self.lora_config, self.quantization_config, self.skip = lora_config, quantization_config, skip
        self.device, self.dtype, self.reader, self.seed = device, dtype, reader, seed
        self.rank, self.world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
        self.memo: dict[int, tuple[nn.Parameter, weakref.ref]] = {}
        self.built: set[int] = set()
        block_paths = [path for path, _ in decoder_blocks(model)]
        self.adapters_of: dict[int, list[tuple[str, LoRALinear]]] = {part.index: [] for part in parts}
        for name, layer in adapters:
            index = next((i for i, path in enumerate(block_paths) if under(name, path)), len(block_paths))
            self.adapters_of[index].append((name, layer))
        # FSDP1 hands param_init_fn modules, not parts: module -> its part, or -> the adapter linear it is. Weak keys:
        # a linear that quantizing replaced must die with its full-precision weight.
        self.part_of: weakref.WeakKeyDictionary[nn.Module, int] = weakref.WeakKeyDictionary(
            {slot.module: part.index for part in parts for slot in part.slots}
        )
        self.adapter_of: weakref.WeakKeyDictionary[nn.Module, tuple[str, LoRALinear]] = weakref.WeakKeyDictionary()
        for name, layer in adapters:
            for linear in (layer.lora_a, layer.lora_b):
                self.adapter_of[linear] = (name, layer)
        self.fallback: Callable[[nn.Module], None] | None = None

    def owner(self, part: Part) -> int:
        return part.index % self.world

    @torch.no_grad()
    def build(self, part: Part) -> None:
        """Make ``part`` real on this rank: built by its owner, received by the others; then its adapters."""
        if part.index in self.built:
            return
        self.built.add(part.index)
        if self.owner(part) == self.rank:
            self._build_here(part)
        else:
            self._allocate_empty(part)
        if self.world > 1:
            import torch.distributed as dist

            for tensor in _part_tensors(part.slots):
                dist.broadcast(tensor.data if isinstance(tensor, nn.Parameter) else tensor, src=self.owner(part))
        for name, layer in self.adapters_of[part.index]:
            for linear in (layer.lora_a, layer.lora_b):  # FSDP1 units (wrapped) have been initialized already
                if type(linear) is nn.Linear:
                    self._init_adapter(linear, name, layer)
            if layer.use_dora and layer.lora_magnitude.is_meta:
                # DoRA's magnitude is the row norms of the adapted weight: taken from the real base, the same on every rank.
                magnitude = layer.lora_magnitude
                layer.lora_magnitude = nn.Parameter(torch.empty(magnitude.shape, dtype=magnitude.dtype, device=self.device), requires_grad=magnitude.requires_grad)
                dora.init_magnitude(layer, layer)

    def _build_here(self, part: Part) -> None:
        materialize(part.slots, self.device, self.dtype, self.memo)
        if self.reader is not None:
            self.reader.load(part.slots, self.device)
        else:
            random_init(self.model(), part.slots, part.seed, self.device)
        if self.quantization_config is None:
            return
        to_quantize = [s for s in part.slots if will_quantize(s, self.quantization_config, self.skip)]
        replaced = [s.module for s in to_quantize]
        trainable_bias = [s for s in to_quantize if _bias_trains(s.module)]
        quantize_part(part.slots, self.quantization_config, self.skip, self.device)
        for slot in trainable_bias:  # quantize_linear freezes the bias; bias='all' / 'lora_only' train it
            slot.module.bias.requires_grad_(True)
        for linear in replaced:  # FSDP1 still lists them among the unit's modules: free their weights now
            linear._parameters.clear()
        if self.world > 1:
            for slot in part.slots:
                if quantization.is_4bit(slot.module):
                    _check_layout(slot, self.quantization_config, self.dtype)

    def _allocate_empty(self, part: Part) -> None:
        to_quantize = [s for s in part.slots if will_quantize(s, self.quantization_config, self.skip)]
        for slot in to_quantize:
            slot.module = empty_4bit_like(slot.module, self.quantization_config, self.dtype, self.device)
            setattr(slot.parent, slot.attr, slot.module)
        materialize([s for s in part.slots if s not in to_quantize], self.device, self.dtype, self.memo)

    def _init_adapter(self, linear: nn.Linear, name: str, layer: LoRALinear) -> None:
        weight = linear.weight
        if not weight.is_meta:
            return
        which = "lora_a" if linear is layer.lora_a else "lora_b"
        value = lora_init(weight.shape, which, name, self.lora_config.init, layer.r, self.seed)
        linear.weight = nn.Parameter(value.to(self.device, weight.dtype), requires_grad=weight.requires_grad)

    def param_init_fn(self, module: nn.Module) -> None:
        """FSDP1's hook: build the part ``module`` belongs to (or init the adapter it is) before FSDP flattens its unit."""
        if module in self.adapter_of:
            self._init_adapter(module, *self.adapter_of[module])
        elif module in self.part_of:
            self.build(self.parts[self.part_of[module]])
        elif any(t.is_meta for t in (*module.parameters(recurse=False), *module.buffers(recurse=False))):
            if self.fallback is not None:
                self.fallback(module)
            else:  # what FSDP does without a param_init_fn
                module.to_empty(device=self.device, recurse=False)
                if hasattr(module, "reset_parameters"):
                    module.reset_parameters()
        if len(self.built) == len(self.parts):
            self.finish()

    def finish(self) -> None:
        """Drop what only building needed (the checkpoint index, the module maps) and the model's reference to this builder."""
        model = self.model()
        if model is not None and getattr(model, _BUILD_ATTR, None) is self:
            delattr(model, _BUILD_ATTR)
        self.reader, self.memo, self.adapters_of = None, {}, {}
        # part_of and adapter_of stay (weakly): FSDP1 may still hand over modules of units built already.


# -- the packed layout without the bytes ---------------------------------------------------------------
@torch.no_grad()
def empty_4bit_like(linear: nn.Linear, config: QuantizationConfig, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """A bitsandbytes 4-bit layer on ``device`` laid out as ``quantize_linear`` lays out ``linear``, with uninitialized storage.

    ``linear`` may be on meta. The shapes come from running bitsandbytes' own quantization on a meta
    tensor, so they follow whatever the installed version does.
    """
    bnb = quantization._bnb()
    has_bias = linear.bias is not None
    layer = bnb.nn.Linear4bit(
        linear.in_features,
        linear.out_features,
        bias=has_bias,
        compute_dtype=config.resolved_compute_dtype(device),
        compress_statistics=config.double_quant,
        quant_type=config.mode,
        quant_storage=config.storage_dtype(),
        device="meta",
    )
    shell = bnb.nn.Params4bit(
        torch.empty(linear.out_features, linear.in_features, dtype=dtype, device="meta"),
        requires_grad=False,
        compress_statistics=config.double_quant,
        quant_type=config.mode,
        quant_storage=config.storage_dtype(),
    )
    with _quantizing_on_meta(bnb):
        packed, state = bnb.functional.quantize_4bit(
            shell.data,
            blocksize=shell.blocksize,
            compress_statistics=shell.compress_statistics,
            quant_type=shell.quant_type,
            quant_storage=shell.quant_storage,
        )
    state = _empty_state(state, device)
    layer.weight = bnb.nn.Params4bit(
        torch.empty(packed.shape, dtype=packed.dtype, device=device),
        requires_grad=False,
        quant_state=state,
        blocksize=shell.blocksize,
        compress_statistics=shell.compress_statistics,
        quant_type=shell.quant_type,
        quant_storage=shell.quant_storage,
        module=layer,
        bnb_quantized=True,
    )
    layer.quant_state = state
    if has_bias:
        layer.bias = nn.Parameter(torch.empty(linear.out_features, dtype=dtype, device=device), requires_grad=linear.bias.requires_grad)
    layer.train(linear.training)
    quantization.keep_standard_layout(layer)
    return layer


@contextlib.contextmanager
def _quantizing_on_meta(bnb: Any) -> Iterator[None]:
    """bitsandbytes caches its 8-bit codebook on the device of the first tensor it quantizes: keep a meta one out of the cache."""
    cache = bnb.functional.name2qmap
    before = set(cache)
    try:
        yield
    finally:
        for key in set(cache) - before:
            if cache[key].is_meta:
                del cache[key]


def _empty_state(state: Any, device: torch.device) -> Any:
    new = copy.copy(state)
    new.absmax = torch.empty_like(state.absmax, device=device)
    new.code = torch.empty_like(state.code, device=device)
    if state.nested:
        new.offset = torch.empty_like(state.offset, device=device)
        new.state2 = _empty_state(state.state2, device)
    return new


def _state_tensors(state: Any) -> list[torch.Tensor]:
    """The tensors of a bitsandbytes QuantState, in a fixed order (that of ``QuantState.to``)."""
    tensors = [state.code, state.absmax]
    if state.nested:
        tensors += [state.offset, *_state_tensors(state.state2)]
    return tensors


def _part_tensors(slots: list[Slot]) -> list[torch.Tensor]:
    """Every tensor the part's modules own directly (parameters, buffers, 4-bit quant states), each once, in module order."""
    out, seen = [], set()
    for slot in slots:
        module = slot.module
        tensors = [t for t in (*module._parameters.values(), *module._buffers.values()) if t is not None]
        if quantization.is_4bit(module):
            tensors += _state_tensors(module.quant_state)
        for tensor in tensors:
            if id(tensor) not in seen:
                seen.add(id(tensor))
                out.append(tensor)
    return out


def _layout(module: nn.Module) -> list[tuple[tuple[int, ...], torch.dtype]]:
    return [(tuple(t.shape), t.dtype) for t in _part_tensors([Slot("", module, None, "")])]


def _check_layout(slot: Slot, config: QuantizationConfig, dtype: torch.dtype) -> None:
    """The layout the other ranks allocate must be the one the owner quantized into, or the broadcasts would mismatch."""
    module = slot.module
    plain = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
    expected = _layout(empty_4bit_like(plain, config, dtype, torch.device("meta")))
    if _layout(module) != expected:
        raise RuntimeError(
            f"bitsandbytes packed {slot.name!r} as {_layout(module)}, but its layout on meta is {expected}: "
            "this bitsandbytes version cannot be sharded this way; please report it with its version."
        )


def _bias_trains(module: nn.Module) -> bool:
    bias = getattr(module, "bias", None)
    return bias is not None and bias.requires_grad


# -- LoRA init every rank agrees on ------------------------------------------------------------------------
def lora_init(shape: torch.Size, which: str, layer_name: str, init: str, r: int, seed: int) -> torch.Tensor:
    """LoRA A (kaiming-uniform with a=sqrt(5) as nn.Linear, or N(0, 1/r)) or B (zeros), float32 on the CPU.

    Drawn from a generator seeded by ``(seed, layer_name)``: independent of the global RNG, of the
    device, of the rank and of the order in which layers are built.
    """
    value = torch.zeros(shape, dtype=torch.float32, device="cpu")
    if which == "lora_a":
        # The CPU generator keeps 32 bits of its seed: fold the seed and the path into those.
        generator = torch.Generator(device="cpu").manual_seed(zlib.crc32(f"{seed}/{layer_name}".encode()))
        if init == "gaussian":
            value.normal_(0.0, 1.0 / r, generator=generator)
        else:
            nn.init.kaiming_uniform_(value, a=math.sqrt(5), generator=generator)
    return value


# -- set-up checks -----------------------------------------------------------------------------------------
def _resolve_sharding(strategy: Any, shard: Shard | None, mesh: Any, device: torch.device | str | None) -> tuple[Shard | None, Any, torch.device]:
    if shard not in (None, "fsdp1", "fsdp2"):
        raise ValueError(f"`shard` must be 'fsdp1', 'fsdp2' or None, got {shard!r}.")
    if strategy is not None:
        implied = _implied_shard(strategy)
        if shard is not None and shard != implied:
            raise ValueError(f"`shard`={shard!r} contradicts `strategy`={type(strategy).__name__}; leave `shard` unset with a strategy.")
        shard = implied
        if device is None:
            device = strategy.root_device
        if implied == "fsdp2" and mesh is None:
            full = strategy.device_mesh
            if full.mesh_dim_names and "tensor_parallel" in full.mesh_dim_names and full["tensor_parallel"].size() > 1:
                raise ValueError(
                    f"`strategy` is a ModelParallelStrategy with tensor_parallel_size={full['tensor_parallel'].size()}: "
                    "build_lora_model shards with FSDP2 only. Use tensor_parallel_size=1."
                )
            mesh = full["data_parallel"] if full.mesh_dim_names and "data_parallel" in full.mesh_dim_names else full
    if mesh is not None and shard != "fsdp2":
        raise ValueError(f"`mesh` is FSDP2's: pass shard='fsdp2' with it (got shard={shard!r}).")
    if shard is not None:
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            raise ValueError(
                f"`shard`={shard!r} needs the default process group: call torch.distributed.init_process_group first "
                "(Lightning has done it by the time configure_model runs)."
            )
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    device = resolve_device(device)
    if shard == "fsdp2" and mesh is None:
        from torch.distributed.device_mesh import init_device_mesh

        import torch.distributed as dist

        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    return shard, mesh, device


def _implied_shard(strategy: Any) -> Shard | None:
    """'fsdp1' for Lightning's FSDPStrategy, 'fsdp2' for its ModelParallelStrategy (or subclasses), else None.

    By class name, so that this module never imports Lightning.
    """
    names = {cls.__name__ for cls in type(strategy).__mro__}
    if "FSDPStrategy" in names:
        return "fsdp1"
    return "fsdp2" if "ModelParallelStrategy" in names else None


def _check_quantization(config: QuantizationConfig | None, shard: Shard | None, dtype: torch.dtype) -> None:
    if config is None:
        return
    quantization.require_bitsandbytes("quantization_config", config)
    if shard is not None and config.mode == "int8":
        raise ValueError(
            "`quantization_config.mode`='int8' cannot be sharded: bitsandbytes keeps int8 scales outside the parameters. "
            "Use mode='nf4' with FSDP, or shard=None (every rank holds the whole model) for int8."
        )
    if shard == "fsdp1" and config.storage_dtype() != dtype:
        raise ValueError(
            f"FSDP1 flattens each unit into one dtype, but `quantization_config.quant_storage`={config.quant_storage!r} and the "
            f"other weights are {str(dtype).removeprefix('torch.')}. Set quant_storage={str(dtype).removeprefix('torch.')!r}."
        )


def _refuse_ties_across_parts(parts: list[Part]) -> None:
    """A parameter shared by two parts would be two tensors once FSDP has sharded the first part."""
    first: dict[int, str] = {}
    for part in parts:
        here: dict[int, str] = {}
        for slot in part.slots:
            for key, param in slot.module._parameters.items():
                if param is not None:
                    here.setdefault(id(param), join(slot.name, key))
        for pid, name in here.items():
            if pid in first:
                raise ValueError(
                    f"{name!r} is the same parameter as {first[pid]!r} in another decoder block: a sharded build cannot keep "
                    "weights tied across blocks. Untie them in the config, or build with shard=None."
                )
        first.update(here)


def _install_in_fsdp_strategy(strategy: Any, model: nn.Module, build: _PartBuilder) -> None:
    """Make Lightning's FSDPStrategy build the model unit by unit: our param_init_fn, and a policy with the blocks as units."""
    from lightning_lora.sharding import lora_fsdp_policy

    storage = build.quantization_config.storage_dtype() if build.quantization_config is not None else None
    mixed = getattr(strategy, "mixed_precision_config", None)
    param_dtype = getattr(mixed, "param_dtype", None)
    if storage is not None and param_dtype is not None and param_dtype != storage:
        raise ValueError(
            f"FSDPStrategy casts every flat parameter to {param_dtype} for compute (precision="
            f"{getattr(strategy.precision_plugin, 'precision', '?')!r}), which would reinterpret the packed 4-bit weights stored as "
            f"{storage}. Use precision='bf16-mixed' or 'bf16-true' with quant_storage='bfloat16'."
        )
    kwargs = strategy.kwargs
    block_types = {type(block) for _, block in decoder_blocks(model)}
    if kwargs.get("auto_wrap_policy") is None:
        kwargs["auto_wrap_policy"] = lora_fsdp_policy(block_types)
    else:
        _check_policy(kwargs["auto_wrap_policy"], model, block_types)
    current = kwargs.get("param_init_fn")
    if current is not None and getattr(current, "__self__", None) is not build and not isinstance(getattr(current, "__self__", None), _PartBuilder):
        build.fallback = current  # the user's own, for modules that are not ours
    kwargs["param_init_fn"] = build.param_init_fn


def _check_policy(policy: Any, model: nn.Module, block_types: set[type]) -> None:
    """Refuse an FSDP1 auto-wrap policy that would not make each decoder block and each LoRA linear a unit.

    Without block units a rank would build the whole model before FSDP shards it; a LoRA linear in a
    bf16 block unit would mix dtypes in one flat parameter. Policies that cannot be evaluated here pass.
    """
    blocks = [m for m in model.modules() if type(m) in block_types]
    adapters = [getattr(m, w) for m in model.modules() if isinstance(m, LoRALinear) for w in ("lora_a", "lora_b")]
    try:
        if hasattr(policy, "_run_policy"):
            wrapped = policy._run_policy(model, set(), {})
            is_unit = lambda m: m in wrapped  # noqa: E731
        elif callable(policy):
            is_unit = lambda m: bool(policy(module=m, recurse=False, nonwrapped_numel=sum(p.numel() for p in m.parameters())))  # noqa: E731
        else:
            return
        missing = [m for m in blocks + adapters if not is_unit(m)]
    except Exception:  # a policy we cannot run on its own
        return
    if missing:
        if type(missing[0]) in block_types:
            why = f"decoder block ({type(missing[0]).__name__}) its own FSDP unit, so a rank would build the whole model before FSDP shards it"
        else:
            why = "LoRA linear its own FSDP unit, so float32 adapters would share a flat parameter with the bf16-stored 4-bit weights"
        raise ValueError(
            f"FSDPStrategy's auto_wrap_policy does not make every {why}. Use auto_wrap_policy="
            f"lightning_lora.sharding.lora_fsdp_policy({sorted(t.__name__ for t in block_types)}), or leave it unset."
        )
