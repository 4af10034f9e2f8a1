"""Measure the per-GPU memory of an N-GPU FSDP QLoRA job on the one device you have.

torch's fake process group runs FSDP as rank 0 of ``num_gpus`` ranks in one process: every collective
returns at once without moving data, so the *values* are garbage, but the tensors rank 0 allocates, and
when it frees them, are those of a real run. This module builds only what that rank owns:

1. the model on the meta device, each decoder projection a bitsandbytes 4-bit layer whose weight has
   the packed shape and storage dtype of a real one, and whose ``quant_state`` (block scales, code
   tables) is a real one on the device: one projection per distinct shape is quantized for real and
   its state copied into every layer of that shape (each layer holds its own copy, as in real training:
   FSDP shards parameters, never the quant state);
2. LoRA with ``inject_lora``, activation checkpointing as the strategy applies it;
3. FSDP2 (``fully_shard_lora``, as with ``ModelParallelStrategy``) or FSDP1 (``lora_fsdp_policy``,
   ``use_orig_params=True``, bf16 mixed precision, as ``FSDPStrategy`` with ``precision='bf16-mixed'``),
   which allocate on the device only this rank's shards;
4. ``steps`` training steps (bf16 autocast forward, loss backward, norm clipping, AdamW), the peak of the
   steps after the first (the optimizer states exist by then) read from the allocator.

On CUDA the peak comes from ``torch.cuda.max_memory_allocated``; on the CPU (for debugging at tiny sizes)
from the allocation events of torch's profiler. ``measure_memory`` runs all this in a fresh process, so
the fake group and the allocator's statistics start clean.

Example::

    from lightning_lora.measure import measure_memory
    m = measure_memory({"hidden_size": 8192, "num_hidden_layers": 80, "num_attention_heads": 64,
                        "num_key_value_heads": 8, "intermediate_size": 28672, "vocab_size": 32000},
                       num_gpus=64, strategy="fsdp2")
    print(m.table())

Not simulated: NCCL's own buffers (outside torch's allocator, typically a few hundred MiB per GPU), the
rank-to-rank variation of uneven shards (rank 0 holds the largest shard of every parameter, so it is the
rank to size for), and CPU offload.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["MeasuredMemory", "compare_with_estimate", "measure_memory"]

GiB = 2**30
STRATEGIES = ("fsdp2", "fsdp")
_RESULT_MARK = "LIGHTNING_LORA_MEASURE_RESULT "
_STEP_MARK = "lightning_lora.measure.step"


@dataclass
class MeasuredMemory:
    """What rank 0 of ``num_gpus`` held, in bytes (from ``measure_memory``)."""

    strategy: str
    num_gpus: int
    device: str
    peak_allocated: int
    """Peak of the allocator during the steps after the first: compare with an estimate minus the CUDA context."""
    peak_reserved: int | None
    """Peak the CUDA caching allocator reserved (what nvidia-smi shows, less the context); None on the CPU."""
    step_start_allocated: int
    """Allocated when a measured step starts: shards, quant states, LoRA, gradients set to None, optimizer states."""
    setup_peak_allocated: int
    """Peak while building and sharding (the build quantizes one projection of each shape for real)."""
    sharded_bytes: dict[str, int]
    """This rank's parameter storage by kind ('4bit', 'frozen', 'lora'), padding included."""
    quant_state_bytes: int
    """Block scales and code tables of every 4-bit layer: not sharded, every rank holds all of them."""
    optimizer_state_bytes: int
    steps: int
    seconds: float
    versions: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def table(self) -> str:
        rows = [
            ("peak allocated (steps 2+)", self.peak_allocated),
            ("peak reserved", self.peak_reserved),
            ("allocated at a step's start", self.step_start_allocated),
            ("  4-bit weight shards", self.sharded_bytes.get("4bit", 0)),
            ("  other frozen shards", self.sharded_bytes.get("frozen", 0)),
            ("  LoRA shards", self.sharded_bytes.get("lora", 0)),
            ("  4-bit quant states (not sharded)", self.quant_state_bytes),
            ("  optimizer states", self.optimizer_state_bytes),
            ("peak while building and sharding", self.setup_peak_allocated),
        ]
        lines = [f"Measured as rank 0 of {self.num_gpus} ({self.strategy}, fake process group) on {self.device}:"]
        lines += [f"  {label:<38}{'-' if value is None else f'{value / GiB:9.3f}':>9}" for label, value in rows]
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)


def measure_memory(
    model_config: Any,
    *,
    num_gpus: int,
    strategy: str = "fsdp2",
    quantization: str = "nf4",
    double_quant: bool = True,
    r: int = 16,
    target_modules: list[str] | str = "all-linear",
    batch_size: int = 1,
    seq_len: int = 2048,
    activation_checkpointing: bool = True,
    offload_activations: bool = False,
    lora_dtype: str = "fp32",
    steps: int = 2,
    device: str | None = None,
    timeout: float | None = None,
) -> MeasuredMemory:
    """Train ``steps`` steps as rank 0 of ``num_gpus`` FSDP ranks on one device, in a subprocess; see the module doc.

    ``model_config``: a transformers config, a dict of its fields or a path to a config.json / model folder
    (only the config is read: no weights are loaded). ``device``: 'cuda' (default when a GPU is visible),
    'cuda:1', or 'cpu' (tiny models only: the CPU runs the full model's compute).
    """
    spec = _make_spec(model_config, num_gpus=num_gpus, strategy=strategy, quantization=quantization, double_quant=double_quant,
                      r=r, target_modules=target_modules, batch_size=batch_size, seq_len=seq_len,
                      activation_checkpointing=activation_checkpointing, offload_activations=offload_activations,
                      lora_dtype=lora_dtype, steps=steps, device=device)  # fmt: skip
    return _measure(spec, timeout)


def compare_with_estimate(model_config: Any, estimate_kwargs: dict[str, Any], *, device: str | None = None, steps: int = 2) -> str:
    """Measure the set-up that ``estimate_memory(model_config, **estimate_kwargs)`` describes; its report beside the estimate.

    What ``lightning-lora estimate --measure`` prints. Raises ValueError for set-ups the measurement does not
    simulate, and RuntimeError (with the reason) when it cannot run, e.g. without a GPU or when rank 0 does
    not fit on this one.
    """
    import inspect

    from lightning_lora.estimate import CUDA_CONTEXT_BYTES, estimate_memory

    defaults = {k: p.default for k, p in inspect.signature(estimate_memory).parameters.items() if p.kind is p.KEYWORD_ONLY}
    unknown = sorted(set(estimate_kwargs) - set(defaults))
    if unknown:
        raise TypeError(f"`estimate_kwargs` has options estimate_memory does not take: {unknown}.")
    args = {**defaults, **estimate_kwargs}
    if args["strategy"] not in STRATEGIES or args["num_gpus"] < 2:
        raise ValueError(
            f"--measure simulates sharding across GPUs, but got strategy={args['strategy']!r} on num_gpus={args['num_gpus']!r}: "
            "pass --strategy fsdp2 (ModelParallelStrategy) or fsdp (FSDPStrategy) and --num-gpus 2 or more."
        )
    fixed = {"dtype": "bf16", "optimizer": "adamw", "chunked_ce": False, "lora_dropout": 0.0}
    for name, value in fixed.items():
        if args[name] != value:
            raise ValueError(
                f"--measure trains with {name}={value!r} (bf16 autocast, AdamW, the full loss, no LoRA dropout), got {args[name]!r}: "
                "drop that option to measure, or estimate without --measure."
            )
    if args["lora_dtype"] not in ("fp32", "bf16"):
        raise ValueError(f"--measure keeps LoRA weights in 'fp32' or 'bf16', got lora_dtype={args['lora_dtype']!r}.")
    estimate = estimate_memory(model_config, **args)
    measured = measure_memory(
        model_config, num_gpus=args["num_gpus"], strategy=args["strategy"], quantization=args["quantization"],
        double_quant=args["double_quant"], r=args["r"], target_modules=args["target_modules"], batch_size=args["batch_size"],
        seq_len=args["seq_len"], activation_checkpointing=args["activation_checkpointing"],
        offload_activations=args["offload_activations"], lora_dtype=args["lora_dtype"], steps=steps, device=device,
    )  # fmt: skip
    predicted = estimate.total - CUDA_CONTEXT_BYTES
    error = predicted / measured.peak_allocated - 1
    lines = [measured.table(), f"  {'estimate, without the CUDA context':<38}{predicted / GiB:9.3f}   ({error:+.1%} against the measured peak)"]
    if measured.peak_reserved is not None:
        lines.append(
            f"  per GPU with the CUDA context (~{CUDA_CONTEXT_BYTES / GiB:.2f} GiB): {(measured.peak_reserved + CUDA_CONTEXT_BYTES) / GiB:.2f} GiB "
            "reserved, what nvidia-smi would show; NCCL adds its own buffers on a real cluster."
        )
    else:
        lines.append("  measured on the CPU: the tensors of a GPU run, without the CUDA allocator's rounding and reserve.")
    return "\n".join(lines)


def _measure(spec: dict[str, Any], timeout: float | None) -> MeasuredMemory:
    """Run one measurement (a spec from ``_make_spec``) in a fresh Python process and parse its result."""
    try:
        proc = subprocess.run(_command(spec), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as err:
        raise RuntimeError(f"The measurement did not finish within `timeout`={timeout!r} s; give it more time or a smaller model.") from err
    return _read_result(proc)


def _command(spec: dict[str, Any]) -> list[str]:
    """The measurement's own process: ``python -m lightning_lora.measure SPEC``."""
    return [sys.executable, "-m", "lightning_lora.measure", json.dumps(spec)]


def _read_result(proc: subprocess.CompletedProcess) -> MeasuredMemory:
    """The measurement a finished ``python -m lightning_lora.measure SPEC`` printed, or its error raised."""
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(_RESULT_MARK):
            payload = json.loads(line[len(_RESULT_MARK) :])
            if "error" in payload:
                raise RuntimeError(payload["error"])
            return MeasuredMemory(**payload)
    tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
    raise RuntimeError(f"The measurement process failed (exit code {proc.returncode}):\n{tail}")


def _make_spec(model_config: Any, **kwargs: Any) -> dict[str, Any]:
    from lightning_lora.estimate import _check_choice, _check_positive_int, _load_config, _resolve_targets

    fields_ = _config_fields(model_config)
    _load_config(fields_)  # the estimator's validation: a Llama-like config with positive sizes
    for name, hint in (("num_gpus", "the world size to simulate"), ("r", "the LoRA rank"), ("batch_size", "the micro-batch per GPU"),
                       ("seq_len", "tokens per sequence"), ("steps", "at least 2: the first creates the optimizer states")):  # fmt: skip
        _check_positive_int(name, kwargs[name], hint)
    if kwargs["steps"] < 2:
        raise ValueError(f"`steps` must be at least 2, got {kwargs['steps']!r}: the peak is read after the first step, once optimizer states exist.")
    if kwargs["num_gpus"] < 2:
        raise ValueError(f"`num_gpus` must be at least 2 to simulate sharding, got {kwargs['num_gpus']!r}; for one GPU, train on it and read its peak.")
    _check_choice("strategy", kwargs["strategy"], STRATEGIES)
    _check_choice("quantization", kwargs["quantization"], ("nf4", "fp4"))
    _check_choice("lora_dtype", kwargs["lora_dtype"], ("fp32", "bf16"))
    if kwargs["offload_activations"] and not kwargs["activation_checkpointing"]:
        raise ValueError("`offload_activations`=True offloads the checkpointed layer inputs: set `activation_checkpointing`=True too.")
    targets = kwargs["target_modules"]
    _resolve_targets(targets)
    device = kwargs["device"]
    if device is not None and str(device).split(":")[0] not in ("cuda", "cpu"):
        raise ValueError(f"`device` must be 'cuda', 'cuda:N' or 'cpu', got {device!r}.")
    return {**kwargs, "config": fields_, "target_modules": targets if isinstance(targets, str) else list(targets)}


def _config_fields(model_config: Any) -> dict[str, Any]:
    """A JSON-able dict of the model's config fields (the subprocess rebuilds the config from it)."""
    from lightning_lora.estimate import _read_config_file

    model_config = _read_config_file(model_config)
    if isinstance(model_config, dict):
        return dict(model_config)
    if hasattr(model_config, "to_dict"):
        return json.loads(json.dumps(model_config.to_dict(), default=str))
    raise TypeError(f"`model_config` must be a transformers config, a dict or a path to config.json, got {type(model_config).__name__}.")


# -- inside the measuring process ------------------------------------------------------------------
def _run(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    device = _device(spec["device"])
    world = spec["num_gpus"]
    meter = _CudaMeter(device) if device.type == "cuda" else _CpuMeter()
    notes = ["values are garbage (collectives move no data); the memory is that of rank 0"]
    t0 = time.perf_counter()
    with meter:
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh
        from torch.testing._internal.distributed.fake_pg import FakeStore

        dist.init_process_group("fake", rank=0, world_size=world, store=FakeStore())
        try:
            mesh = init_device_mesh(device.type, (world,))
            model, quant_states = _build_rank_model(spec, device, mesh)
            optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
            ids = torch.randint(0, spec["config"]["vocab_size"], (spec["batch_size"], spec["seq_len"]), device=device)
            setup_peak = meter.peak()
            step_start = 0
            for step in range(spec["steps"]):
                if step == 1:
                    meter.reset_peak()
                    step_start = meter.allocated()
                with meter.region(f"{_STEP_MARK}{step}"):
                    _train_step(model, optimizer, ids, spec["strategy"], device)
            sharded = _sharded_bytes(model)
            optimizer_bytes = _state_bytes(optimizer)
            del model, optimizer
        finally:
            dist.destroy_process_group()
    measured = meter.result()
    if device.type == "cpu":
        notes.append("CPU: peak from the profiler's allocation events; the CUDA caching allocator rounds and reserves more")
    return dict(
        strategy=spec["strategy"], num_gpus=world, device=meter.device_name,
        peak_allocated=measured.get("peak", 0), peak_reserved=measured.get("peak_reserved"),
        step_start_allocated=measured.get("step_start", step_start), setup_peak_allocated=measured.get("setup_peak", setup_peak),
        sharded_bytes=sharded, quant_state_bytes=quant_states, optimizer_state_bytes=optimizer_bytes, steps=spec["steps"],
        seconds=time.perf_counter() - t0, versions=_versions(), notes=notes,
    )  # fmt: skip


def _device(name: str | None) -> Any:
    import torch

    if name is None:
        if not torch.cuda.is_available():
            raise RuntimeError(
                "No CUDA GPU is visible: pass device='cpu' (`--measure-device cpu`) to measure on the CPU; it runs the whole "
                "model's compute for one rank, so only small models finish in reasonable time."
            )
        name = "cuda"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"`device`={name!r} but no CUDA GPU is visible: pass device='cpu' (tiny models only).")
        device = torch.device("cuda", device.index or 0)
        torch.cuda.set_device(device)
    return device


def _build_rank_model(spec: dict[str, Any], device: Any, mesh: Any) -> tuple[Any, int]:
    """The model as rank 0 holds it after sharding; returns it and the bytes of its 4-bit quant states."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from lightning_lora import sharding
    from lightning_lora.blocks import block_classes_of
    from lightning_lora.checkpointing import enable_activation_checkpointing
    from lightning_lora.config import LoRAConfig, QuantizationConfig
    from lightning_lora.inject import inject_lora

    fields_ = dict(spec["config"])
    model_type = fields_.pop("model_type", "llama")
    config = AutoConfig.for_model(model_type, **fields_)
    config.use_cache = False
    config.tie_word_embeddings = bool(fields_.get("tie_word_embeddings", False))
    config.max_position_embeddings = max(int(getattr(config, "max_position_embeddings", 0) or 0), spec["seq_len"])
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa")
    model.train()
    quant = QuantizationConfig(mode=spec["quantization"], double_quant=spec["double_quant"], compute_dtype="bfloat16", quant_storage="bfloat16")
    quant_state_bytes = _four_bit_shells(model, quant, device)
    inject_lora(model, LoRAConfig(r=spec["r"], alpha=2.0 * spec["r"], target_modules=spec["target_modules"]))
    if spec["lora_dtype"] == "bf16":
        for name, param in model.named_parameters():
            if param.requires_grad:
                param.data = param.data.to(torch.bfloat16)
    blocks = block_classes_of(model)
    hf_checkpointing = spec["activation_checkpointing"] and (spec["strategy"] == "fsdp2" or spec["offload_activations"])
    if hf_checkpointing:  # as CausalLMModule(gradient_checkpointing=True) does before sharding
        enable_activation_checkpointing(model, offload_to_cpu=spec["offload_activations"])
    if spec["strategy"] == "fsdp2":
        if spec.get("root_as_one_group"):  # fully_shard_lora before it gave the embedding and head groups of their own
            from torch.distributed.fsdp import fully_shard

            for block in [m for m in model.modules() if type(m).__name__ in blocks]:
                fully_shard(block, mesh=mesh)
            fully_shard(model, mesh=mesh)
        else:
            sharding.fully_shard_lora(model, blocks, mesh=mesh)
        model.to_empty(device=device)  # only this rank's shards get storage
        _fill(model, config, device)
        return model, quant_state_bytes

    from torch.distributed.fsdp import FullyShardedDataParallel, MixedPrecision, ShardingStrategy

    # FSDPStrategy(auto_wrap_policy=lora_fsdp_policy(...), activation_checkpointing_policy={block}), bf16-mixed.
    wrapped = FullyShardedDataParallel(
        model,
        auto_wrap_policy=sharding.lora_fsdp_policy(blocks),
        mixed_precision=MixedPrecision(param_dtype=torch.bfloat16, reduce_dtype=torch.bfloat16, buffer_dtype=torch.bfloat16),
        sharding_strategy=ShardingStrategy.FULL_SHARD,
        device_id=device,
        use_orig_params=True,
        param_init_fn=lambda module: _materialize(module, config, device),
        process_group=mesh.get_group(),
    )
    if spec["activation_checkpointing"] and not hf_checkpointing:  # FSDPStrategy(activation_checkpointing_policy=...)
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing, checkpoint_wrapper
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        classes = {type(m) for m in wrapped.modules() if type(m).__name__ in blocks}
        apply_activation_checkpointing(wrapped, checkpoint_wrapper_fn=checkpoint_wrapper, auto_wrap_policy=ModuleWrapPolicy(classes))
    return wrapped, quant_state_bytes


def _four_bit_shells(model: Any, quant: Any, device: Any) -> int:
    """Replace the decoder's ``nn.Linear`` layers by meta-device 4-bit layers carrying real, per-layer quant states.

    One real layer per distinct (in, out, bias) is quantized on ``device``; its packed weight (shape and dtype
    of every layer of that shape) goes to the meta device, its quant state is copied into each layer.
    """
    import copy

    import torch
    from torch import nn

    from lightning_lora import quantization
    from lightning_lora.inject import output_head_names

    heads = output_head_names(model)
    names = [name for name, m in model.named_modules() if type(m) is nn.Linear and name not in heads]
    templates: dict[tuple[int, int, bool], tuple[nn.Module, Any, dict[str, Any]]] = {}
    total = 0
    for name in names:
        linear = model.get_submodule(name)
        key = (linear.in_features, linear.out_features, linear.bias is not None)
        if key not in templates:
            shell = quantization.quantize_linear(nn.Linear(*key, device=device, dtype=torch.bfloat16), quant, device)
            weight = shell.weight
            # Params4bit's constructor with the real layer's settings; rebuilt per layer on a meta tensor of the packed shape.
            make = dict(cls=type(weight), blocksize=weight.blocksize, compress_statistics=weight.compress_statistics,
                        quant_type=weight.quant_type, quant_storage=weight.quant_storage)  # fmt: skip
            state = weight.quant_state
            shell.weight = nn.Parameter(torch.empty(weight.shape, dtype=weight.dtype, device="meta"), requires_grad=False)
            if shell.bias is not None:
                shell.bias = nn.Parameter(torch.empty_like(shell.bias, device="meta"), requires_grad=False)
            shell.quant_state = None
            templates[key] = (shell, state, make)
            del weight
        shell, state, make = templates[key]
        layer = copy.deepcopy(shell)
        own_state = copy.deepcopy(state)  # every layer owns its scales and code tables
        kwargs = dict(make)
        layer.weight = kwargs.pop("cls")(layer.weight.data, requires_grad=False, quant_state=own_state, module=layer, bnb_quantized=True, **kwargs)
        layer.quant_state = own_state
        layer.train(linear.training)
        total += _quant_state_nbytes(own_state)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer)
    if names:
        model.is_loaded_in_4bit = True
    return total


def _quant_state_nbytes(state: Any) -> int:
    tensors = [state.absmax, state.code]
    if getattr(state, "nested", False):
        tensors += [state.offset, state.state2.absmax, state.state2.code]
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def _materialize(module: Any, config: Any, device: Any) -> None:
    """FSDP1's ``param_init_fn``: storage on ``device`` for the meta tensors ``module`` owns directly."""
    module.to_empty(device=device, recurse=False)
    _fill(module, config, device, recurse=False)


def _fill(model: Any, config: Any, device: Any, recurse: bool = True) -> None:
    """Zero every local tensor (uninitialized memory may hold NaNs) and rebuild rotary tables, which are computed buffers."""
    import torch

    with torch.no_grad():
        for tensor in [*model.parameters(recurse=recurse), *model.buffers(recurse=recurse)]:
            local = tensor.to_local() if type(tensor).__name__ == "DTensor" else tensor
            if local.is_floating_point():
                local.zero_()
        for name, module in list(model.named_modules() if recurse else [("", model)]):
            if "Rotary" in type(module).__name__ and hasattr(module, "inv_freq"):
                with torch.device(device):
                    fresh = type(module)(config=config)
                for key, buffer in fresh.named_buffers(recurse=False):
                    module._buffers[key] = buffer.to(device)


def _train_step(model: Any, optimizer: Any, ids: Any, strategy: str, device: Any) -> None:
    import torch

    with torch.autocast(device.type, dtype=torch.bfloat16):  # precision='bf16-mixed'
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    if strategy == "fsdp":
        model.clip_grad_norm_(1.0)  # what lightning_lora.lightning.strategies.clip_grad_norm does under FSDP1
    else:
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _local(tensor: Any) -> Any:
    return tensor.to_local() if type(tensor).__name__ == "DTensor" else tensor


def _sharded_bytes(model: Any) -> dict[str, int]:
    """Bytes of this rank's parameter storage by kind; one storage counted once (FSDP1 flat parameters hold several)."""
    from lightning_lora.quantization import is_4bit

    four_bit = {id(m.weight) for m in model.modules() if is_4bit(m)}
    out = {"4bit": 0, "frozen": 0, "lora": 0}
    seen: set[int] = set()
    flat = [p for p in model.parameters() if getattr(p, "_is_flat_param", False)]
    if flat:  # FSDP1: each flat parameter's local shard, by the kind of the original parameters it holds
        for module in model.modules():
            handle = getattr(module, "_handle", None)
            if handle is None or id(handle.flat_param) in seen:
                continue
            seen.add(id(handle.flat_param))
            kinds = {"lora" if p.requires_grad else ("4bit" if id(p) in four_bit else "frozen") for p in handle.flat_param._params}
            kind = "lora" if "lora" in kinds else ("4bit" if "4bit" in kinds else "frozen")
            out[kind] += handle.flat_param.untyped_storage().nbytes()
        return out
    for param in model.parameters():
        local = _local(param)
        storage = local.untyped_storage()
        if storage.data_ptr() in seen:
            continue
        seen.add(storage.data_ptr())
        kind = "lora" if param.requires_grad else ("4bit" if id(param) in four_bit else "frozen")
        out[kind] += storage.nbytes()
    return out


def _state_bytes(optimizer: Any) -> int:
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if hasattr(value, "untyped_storage"):
                total += _local(value).untyped_storage().nbytes()
    return total


class _CudaMeter:
    def __init__(self, device: Any) -> None:
        import torch

        self.torch, self.device = torch, device
        self.device_name = torch.cuda.get_device_name(device)

    def __enter__(self) -> _CudaMeter:
        self.torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.torch.cuda.synchronize(self.device)
        self._peak = self.torch.cuda.max_memory_allocated(self.device)
        self._reserved = self.torch.cuda.max_memory_reserved(self.device)

    def region(self, name: str) -> Any:
        import contextlib

        return contextlib.nullcontext()

    def peak(self) -> int:
        self.torch.cuda.synchronize(self.device)
        return self.torch.cuda.max_memory_allocated(self.device)

    def allocated(self) -> int:
        return self.torch.cuda.memory_allocated(self.device)

    def reset_peak(self) -> None:
        self.torch.cuda.synchronize(self.device)
        self.torch.cuda.empty_cache()  # what building left cached (e.g. the quantized templates) is no part of a step
        self.torch.cuda.reset_peak_memory_stats(self.device)

    def result(self) -> dict[str, int]:
        return {"peak": self._peak, "peak_reserved": self._reserved}


class _CpuMeter:
    """The CPU allocator's live bytes over time, from torch profiler's allocation events.

    The profile runs from before the model exists, so the running sum of allocation (+) and free (-)
    events is what the process allocated since then; marked regions give the peak of the measured steps.
    """

    device_name = "cpu"

    def __enter__(self) -> _CpuMeter:
        from torch.profiler import ProfilerActivity, profile

        self._prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        self._prof.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._prof.__exit__(*exc)

    def region(self, name: str) -> Any:
        from torch.profiler import record_function

        return record_function(name)

    # Known only once the profile is read; `result` replaces these placeholders.
    def peak(self) -> int:
        return 0

    def allocated(self) -> int:
        return 0

    def reset_peak(self) -> None:
        pass

    def result(self) -> dict[str, int]:
        events = list(self._prof.profiler.kineto_results.events())
        steps = sorted((e.start_ns(), e.end_ns(), e.name()) for e in events if e.name().startswith(_STEP_MARK))
        memory = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]" and e.device_type().name == "CPU")
        measured = [s for s in steps if not s[2].endswith("step0")]
        first = steps[0][0] if steps else float("inf")
        begin, end = (measured[0][0], measured[-1][1]) if measured else (float("inf"), float("inf"))
        live = setup_peak = peak = step_start = 0
        started = False
        for when, nbytes in memory:
            if not started and when >= begin:
                started, step_start, peak = True, live, live
            live += nbytes
            if when < first:
                setup_peak = max(setup_peak, live)
            elif begin <= when <= end:
                peak = max(peak, live)
        return {"peak": peak, "step_start": step_start, "setup_peak": setup_peak}


def _versions() -> dict[str, str]:
    import platform

    import torch

    out = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("transformers", "bitsandbytes"):
        try:
            out[name] = __import__(name).__version__
        except Exception:
            pass
    if torch.cuda.is_available():
        out["cuda"] = str(torch.version.cuda)
    return out


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    spec = json.loads(args[0])
    try:
        result = _run(spec)
    except Exception as err:  # the parent raises it with this text
        import traceback

        traceback.print_exc()
        result = {"error": _explain(err, spec)}
    print(_RESULT_MARK + json.dumps(result), flush=True)


def _explain(err: Exception, spec: dict[str, Any]) -> str:
    text = f"{type(err).__name__}: {err}"
    if "out of memory" in str(err).lower():
        return (
            f"Rank 0 of {spec['num_gpus']} does not fit on this device ({text.splitlines()[0]}): the job needs more memory "
            "per GPU than this one has. The formula's estimate (`lightning-lora estimate`) still applies."
        )
    return f"The measurement failed: {text}"


if __name__ == "__main__":
    main()
