"""Predict the peak GPU memory per GPU of a LoRA / QLoRA training step, before anything is loaded.

Pure arithmetic on the model's config: this module imports neither torch, Lightning nor bitsandbytes.

Example::

    from transformers import LlamaConfig
    est = estimate_memory(LlamaConfig(hidden_size=4096, num_hidden_layers=32, intermediate_size=11008),
                          quantization="nf4", r=16, batch_size=2, seq_len=2048)
    print(est.table())

Assumptions (the comments next to each term say why it exists):

- The model is a Llama-like decoder as transformers builds it (``LlamaForCausalLM``): per layer
  RMSNorm -> q/k/v/o projections with RoPE and grouped-query attention -> RMSNorm -> SwiGLU MLP
  (gate/up/down), then a final RMSNorm and an output head (tied to the embedding or not).
- Only the decoder projections are quantized; embeddings, norms, biases and the output head stay in
  ``dtype`` (the library never quantizes the output head). LoRA may target the seven projections.
- Compute runs in ``dtype``; LoRA weights live in ``lora_dtype`` and are cast to ``dtype`` for the
  matmul, as ``LoRALinear`` or autocast does. LoRA dropout is 0 unless ``lora_dropout`` says otherwise.
- Attention is SDPA with a flash / memory-efficient kernel: no (seq x seq) matrix is stored, and GQA
  runs without ``repeat_kv`` copies (transformers passes ``enable_gqa`` when there is no padding mask).
- Saved activations follow what autograd keeps for backward with frozen base weights; the per-layer
  formula matches the bytes counted with ``torch.autograd.graph.saved_tensors_hooks`` exactly
  (transformers 5.24, torch 2.13; see tests/test_estimate.py). Activation checkpointing means
  non-reentrant, one checkpoint per decoder layer (``gradient_checkpointing_enable``).
- ``batch_size`` is the micro-batch per GPU: gradient accumulation does not change the peak.
- The peak is the larger of two moments of a step after the first (optimizer states exist):
  the loss backward (all saved activations plus the full-vocabulary fp32 loss buffers) and a decoder
  layer's backward (saved activations, the layer's recomputed activations when checkpointing,
  the logits the model output still holds, dequantization and gradient buffers).
- FSDP, two strategies: 'fsdp' is Lightning's FSDPStrategy (FSDP1, ``lora_fsdp_policy``: one unit per
  decoder layer and per LoRA A / B, ``use_orig_params=True``, bf16-mixed), 'fsdp2' is ModelParallelStrategy
  with ``fully_shard_lora``. Sharded bytes follow each one's padding exactly (FSDP2 cuts every parameter
  along dim 0; FSDP1 flattens each unit, aligns parameters to 16 bytes, pads to the world size). Neither
  shards the 4-bit ``quant_state``: every rank holds all block scales (0.127 bit/param with double quant;
  ``unsharded_weights``). Both keep the root unit gathered from forward to the end of backward; FSDP2's
  input embedding and output head have groups of their own (resharded after forward), so only the head is
  gathered again, for the loss backward. Two decoder layers are in flight during a layer's backward.
  Gradients exist only for the LoRA parameters (their own FSDP1 units, so pytorch #104690 does not apply).
- Checked on the CPU against rank 0 of 2-8 ranks under torch's fake process group (``lightning_lora.measure``):
  sharded parameter, quant-state and optimizer bytes exactly; the FSDP terms of the peak within 1 MB at small
  shapes. ``benchmarks/simulated_scale.py`` measures the 70B and 405B shapes at 2-64 ranks on one GPU.
- The total is what ``torch.cuda.max_memory_allocated()`` reports plus ``CUDA_CONTEXT_BYTES``. The
  caching allocator reserves more than it hands out (nvidia-smi shows the reserve): measured 5-18%
  on top of the peak allocation; ``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True`` narrows the gap.
- Checked against real steps on an H200 (nf4 + LoRA r=16 all-linear, AdamW, bf16): Llama-2-7B shape,
  batch 2 x 2048, 26.84 vs 26.74 GiB allocated without checkpointing, 6.97 vs 6.93 GiB with it;
  smaller shapes within 3.1% (tests/test_estimate.py::test_estimate_matches_cuda_peak).
- ``offload_activations``: the checkpointed layer inputs live in host memory
  (``lightning_lora.checkpointing``); two of them are on the GPU at a time.
- Not modelled: CPU offload of parameters, paged optimizers, padding masks beyond the SDPA kernels above and
  NCCL communication buffers (outside torch's allocator). DDP terms are arithmetic.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

__all__ = ["ALL_LINEAR", "CUDA_CONTEXT_BYTES", "MemoryEstimate", "ParameterCount", "count_parameters", "estimate_memory", "weight_bytes"]

GiB = 2**30
MiB = 2**20

# Memory a process holds on the GPU outside torch's allocator (so never in torch.cuda.memory_allocated()):
# the CUDA context, i.e. driver state plus the kernels of torch, cuBLAS and bitsandbytes (loaded lazily
# since CUDA 11.7). Measured 0.75 GiB on an H200 (torch 2.11, CUDA 13, bitsandbytes 0.50) as
# used - memory_reserved(); older stacks are nearer 0.3-0.5 GiB, so this errs on the safe side.
CUDA_CONTEXT_BYTES = 768 * MiB
# DDP's default bucket cap (bucket_cap_mb=25). It caps each bucket, not their sum: see `ddp_buckets`.
DDP_BUCKET_CAP_BYTES = 25 * MiB
# FSDP holds the unsharded parameters of the unit being computed and of the one prefetched next
# (BackwardPrefetch.BACKWARD_PRE, FSDP2's default prefetch of one unit).
FSDP_UNSHARDED_LAYERS = 2
# Decoder layers all-gathered during the loss backward: FSDP1's root unit prefetches the last layer as the
# backward starts; under FSDP2 the head's own group prefetches it only once the loss gradient is done.
FSDP_LAYERS_AT_LOSS = {"fsdp": 1, "fsdp2": 0}
# FSDP1 with use_orig_params=True aligns every original parameter inside a FlatParameter to 16 bytes.
FSDP1_ALIGN_BYTES = 16
# With offloaded checkpoints, layer inputs on the GPU at once: the one being copied out (or in) and the next.
OFFLOAD_IN_FLIGHT = 2
# `chunked_ce=True` models torchtune's CEWithChunkedOutputLoss: bf16 logits in 8 chunks, each chunk
# upcast to fp32 and reduced on its own, so only one chunk's fp32 loss buffers exist at a time.
CE_CHUNKS = 8

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""What ``target_modules="all-linear"`` means for a Llama decoder (the output head excluded, as in PEFT)."""

_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
_QUANTIZATIONS = ("none", "nf4", "fp4", "int8")
_STRATEGIES = ("single", "ddp", "fsdp", "fsdp2")
_FSDP = ("fsdp", "fsdp2")
_OPTIMIZER_STATES = {"adamw": 2, "sgd": 0}  # AdamW: exp_avg + exp_avg_sq; SGD without momentum keeps none
_REQUIRED_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")

# bitsandbytes 4-bit layout (0.50, functional.quantize_4bit): two weights per byte, one absmax per block
# of 64. Double quant stores those absmax as uint8, minus their mean (`offset`, one fp32), with one fp32
# absmax per 256 of them: 8/64 + 32/16384 = 0.127 bit/param instead of 32/64 = 0.5 bit/param.
# Every layer also holds its own 16-entry fp32 code (NF4/FP4 values) and, with double quant,
# the 256-entry fp32 code of the 8-bit absmax.
_BLOCKSIZE_4BIT = 64
_NESTED_BLOCKSIZE = 256
_CODE_4BIT_BYTES = 16 * 4
_NESTED_CODE_BYTES = 256 * 4 + 4  # code + offset


@dataclass(frozen=True)
class _Shape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool
    attention_bias: bool
    mlp_bias: bool

    def linears(self) -> dict[str, tuple[int, int, bool]]:
        """The projections of one decoder layer: name -> (in_features, out_features, has_bias)."""
        h, q, kv, i = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        ab, mb = self.attention_bias, self.mlp_bias
        return {
            "q_proj": (h, q, ab), "k_proj": (h, kv, ab), "v_proj": (h, kv, ab), "o_proj": (q, h, ab),
            "gate_proj": (h, i, mb), "up_proj": (h, i, mb), "down_proj": (i, h, mb),
        }  # fmt: skip


@dataclass(frozen=True)
class ParameterCount:
    """Parameter counts of a Llama-like model, equal to ``sum(p.numel() for p in model.parameters())``."""

    base: int
    """Every parameter of the model before LoRA (a tied output head counted once)."""
    quantizable: int
    """Weights of the decoder projections (the part bitsandbytes quantizes)."""
    lora: int
    """LoRA parameters: ``r * (in + out)`` for each targeted projection of every layer."""
    lora_per_layer: int


@dataclass
class MemoryEstimate:
    """Predicted peak memory per GPU, in bytes, broken down as it stands at the peak.

    Example::

        est = estimate_memory({"hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
                               "intermediate_size": 11008, "vocab_size": 32000}, batch_size=2)
        print(est.table())
        assert est.total == sum(est.to_dict()["breakdown"].values())
    """

    base_weights: int
    lora_params: int
    lora_grads: int
    optimizer_states: int
    activations: int
    logits_loss: int
    dequant_buffers: int
    backward_working: int
    fsdp_unsharded: int
    ddp_buckets: int
    cuda_context: int
    peak_phase: str = field(default="")
    """'loss backward', 'decoder-layer backward' or (FSDP2) 'output-head backward': the moment the breakdown describes."""
    other_phase_total: int = field(default=0)
    """Total at the next-highest moment, for comparison."""
    other_phase: str = field(default="")
    layer_activations: int = field(default=0)
    """Bytes one decoder layer saves for backward without checkpointing (not a term of `total`)."""
    unsharded_weights: int = field(default=0)
    """The part of ``base_weights`` that FSDP does not shard: 4-bit block scales and code tables (every rank holds all)."""
    parameters: ParameterCount | None = field(default=None)
    summary: str = field(default="")

    _ROWS = {
        "base_weights": "frozen base weights",
        "lora_params": "LoRA parameters",
        "lora_grads": "LoRA gradients",
        "optimizer_states": "optimizer states",
        "activations": "activations saved for backward",
        "logits_loss": "logits and loss",
        "dequant_buffers": "dequantized weight + its input grad",
        "backward_working": "backward gradient buffers",
        "fsdp_unsharded": "FSDP unsharded layers + root",
        "ddp_buckets": "DDP gradient buckets",
        "cuda_context": "CUDA context (outside the allocator)",
    }

    def breakdown(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self._ROWS}

    @property
    def total(self) -> int:
        return sum(self.breakdown().values())

    def to_dict(self) -> dict[str, Any]:
        info = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in self._ROWS}
        info["parameters"] = asdict(self.parameters) if self.parameters else None
        return {"total": self.total, "breakdown": self.breakdown(), **info}

    def table(self) -> str:
        lines = [self.summary, f"{'':2}{'term':<38}{'GiB':>9}"]
        # "-": a term that is not live at the peak (or does not apply to this set-up).
        lines += [f"{'':2}{label:<38}{_gib(getattr(self, name))}" for name, label in self._ROWS.items()]
        lines.append(f"{'':2}{'total (peak per GPU)':<38}{self.total / GiB:>9.3f}")
        if self.unsharded_weights:
            lines.append(f"  of the frozen weights, {self.unsharded_weights / GiB:.3f} GiB are 4-bit scales that every GPU holds whole")
        lines.append(f"  peak during the {self.peak_phase}; the {self.other_phase} needs {self.other_phase_total / GiB:.3f} GiB")
        return "\n".join(lines)


def _gib(n: int) -> str:
    return f"{n / GiB:>9.3f}" if n else f"{'-':>9}"


def _read_config_file(model_config: Any) -> Any:
    """The dict in a config.json (given the file or its folder); anything that is not a path, unchanged."""
    if not isinstance(model_config, (str, os.PathLike)):
        return model_config
    path = os.fspath(model_config)
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    if not os.path.isfile(path):
        raise ValueError(f"`model_config` path {os.fspath(model_config)!r} has no config.json: pass a model folder or its config.json.")
    with open(path) as f:
        return json.load(f)


def _load_config(model_config: Any) -> _Shape:
    model_config = _read_config_file(model_config)
    if isinstance(model_config, Mapping):
        get = model_config.get
    elif hasattr(model_config, "to_dict"):  # a transformers PretrainedConfig, read without importing transformers
        get = lambda name, default=None: getattr(model_config, name, default)  # noqa: E731
    else:
        raise TypeError(f"`model_config` must be a transformers config, a dict or a path to config.json, got {type(model_config).__name__}.")
    missing = [name for name in _REQUIRED_FIELDS if get(name) is None]
    if missing:
        raise ValueError(
            f"`model_config` is missing {', '.join(repr(m) for m in missing)}: a Llama-like config needs {', '.join(_REQUIRED_FIELDS)} "
            "(GPT-2 style names such as n_embd are not supported)."
        )
    heads = int(get("num_attention_heads"))
    hidden = int(get("hidden_size"))
    shape = _Shape(
        hidden=hidden,
        layers=int(get("num_hidden_layers")),
        heads=heads,
        kv_heads=int(get("num_key_value_heads") or heads),
        head_dim=int(get("head_dim") or hidden // heads),
        intermediate=int(get("intermediate_size")),
        vocab=int(get("vocab_size")),
        tied=bool(get("tie_word_embeddings", False)),  # LlamaConfig's default is False
        attention_bias=bool(get("attention_bias", False)),
        mlp_bias=bool(get("mlp_bias", False)),
    )
    for name, value in asdict(shape).items():
        if isinstance(value, int) and not isinstance(value, bool) and value <= 0:
            raise ValueError(f"`model_config` field for {name!r} must be positive, got {value!r}.")
    if shape.heads % shape.kv_heads:
        raise ValueError(f"`num_attention_heads` ({shape.heads}) must be a multiple of `num_key_value_heads` ({shape.kv_heads}).")
    return shape


def _resolve_targets(target_modules: list[str] | str) -> tuple[str, ...]:
    if target_modules == "all-linear":
        return ALL_LINEAR
    names = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    resolved = tuple(dict.fromkeys(str(n).rsplit(".", 1)[-1] for n in names))  # "self_attn.q_proj" -> "q_proj"
    unknown = [n for n in resolved if n not in ALL_LINEAR]
    if not resolved or unknown:
        raise ValueError(
            f"`target_modules` got {target_modules!r}: the estimate covers the decoder projections {list(ALL_LINEAR)} "
            "(or 'all-linear'); pick from those."
        )
    return resolved


def _check_positive_int(name: str, value: Any, hint: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"`{name}` must be a positive integer, got {value!r}: {hint}.")


def _check_choice(name: str, value: Any, choices: tuple[str, ...] | Mapping[str, Any]) -> None:
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {list(choices)}, got {value!r}.")


def count_parameters(model_config: Any, target_modules: list[str] | str = "all-linear", r: int = 16) -> ParameterCount:
    """Exact parameter counts of the base model and of the LoRA adapters, from the config alone.

    Example::

        count_parameters(llama_7b_config, ["q_proj", "v_proj"], r=8).lora  # 4_194_304
    """
    _check_positive_int("r", r, "the LoRA rank is usually 8 to 64")
    return _count(_load_config(model_config), _resolve_targets(target_modules), r)


def _count(shape: _Shape, targets: tuple[str, ...], r: int) -> ParameterCount:
    h, linears = shape.hidden, shape.linears()
    quantizable = sum(i * o for i, o, _ in linears.values())
    biases = sum(o for _, o, bias in linears.values() if bias)
    per_layer = quantizable + biases + 2 * h  # + input and post-attention RMSNorm weights
    root = shape.vocab * h * (1 if shape.tied else 2) + h  # embedding, output head unless tied, final norm
    lora_per_layer = sum(r * (linears[n][0] + linears[n][1]) for n in targets)
    return ParameterCount(
        base=shape.layers * per_layer + root,
        quantizable=shape.layers * quantizable,
        lora=shape.layers * lora_per_layer,
        lora_per_layer=lora_per_layer,
    )


def weight_bytes(in_features: int, out_features: int, *, quantization: str = "nf4", double_quant: bool = True, dtype: str = "bf16") -> int:
    """Bytes one frozen ``nn.Linear`` weight occupies on the GPU once bitsandbytes has quantized it."""
    _check_choice("quantization", quantization, _QUANTIZATIONS)
    n = in_features * out_features
    if quantization == "none":
        return n * _BYTES[dtype]
    if quantization == "int8":
        return n + 4 * out_features  # int8 weight (LLM.int8()) + one fp32 scale (SCB) per output row
    blocks = math.ceil(n / _BLOCKSIZE_4BIT)
    packed = math.ceil(n / 2)
    if not double_quant:
        return packed + 4 * blocks + _CODE_4BIT_BYTES
    return packed + blocks + 4 * math.ceil(blocks / _NESTED_BLOCKSIZE) + _CODE_4BIT_BYTES + _NESTED_CODE_BYTES


def _layer_activation_bytes(shape: _Shape, targets: tuple[str, ...], r: int, batch: int, seq: int, e: int, lora_e: int, dropout: float) -> int:
    """Bytes one decoder layer keeps for backward (frozen base, LoRA on `targets`), in compute dtype `e`."""
    t, h, i = batch * seq, shape.hidden, shape.intermediate
    q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    linears = shape.linears()
    # LlamaRMSNorm computes in fp32: pow and the rsqrt multiply keep the fp32 input (t, h) and rsqrt (t, 1).
    total = 2 * (4 * t * h + 4 * t)
    # SDPA's flash / efficient kernels keep q and k after RoPE, v, the output (also o_proj's input) and
    # a fp32 logsumexp per head and token; nothing of size seq x seq.
    total += e * t * (2 * q + 2 * kv) + 4 * batch * shape.heads * seq
    # SwiGLU: silu keeps gate (t, i), the product keeps silu(gate) and up.
    total += 3 * e * t * i
    # LoRA: lora_b keeps lora_a's output (t, r); lora_a keeps its input. Frozen bases keep no input, so the
    # normalised inputs (t, h: one for q/k/v, one for gate/up) and down_proj's input (t, i) are kept only
    # for LoRA. With dropout, each adapted layer keeps its own dropped copy and a bool mask instead.
    total += len(targets) * e * t * r
    if dropout == 0:
        attn_in = any(n in targets for n in ("q_proj", "k_proj", "v_proj"))
        mlp_in = any(n in targets for n in ("gate_proj", "up_proj"))
        total += e * t * (h * (attn_in + mlp_in) + i * ("down_proj" in targets))
    else:
        total += sum((e + 1) * t * linears[n][0] for n in targets)
    if lora_e != e:  # A and B cast to the compute dtype for the matmul; the casts are kept for backward.
        total += e * r * sum(linears[n][0] + linears[n][1] for n in targets)
    return total


def _quant_state_bytes(in_features: int, out_features: int, quantization: str, double_quant: bool) -> int:
    """Bytes of a 4-bit layer's ``quant_state`` (block scales, code tables): the part of ``weight_bytes`` FSDP never shards."""
    if quantization not in ("nf4", "fp4"):
        return 0
    return weight_bytes(in_features, out_features, quantization=quantization, double_quant=double_quant) - math.ceil(in_features * out_features / 2)


@dataclass(frozen=True)
class _Param:
    """A parameter as FSDP sees it: elements, size of dim 0 (FSDP2 shards along it), bytes per element."""

    numel: int
    dim0: int
    elem: int


def _layer_params(shape: _Shape, quantization: str, e: int) -> list[_Param]:
    """The frozen parameters of one decoder layer in module order (projections, then the two norms)."""
    params = []
    for i, o, bias in shape.linears().values():
        if quantization in ("nf4", "fp4"):
            packed = (i * o + 1) // (2 * e)  # bitsandbytes packs two 4-bit values a byte into `dtype`-sized storage
            params.append(_Param(packed, packed, e))
        else:
            params.append(_Param(i * o, o, e))
        if bias:
            params.append(_Param(o, o, e))
    return params + [_Param(shape.hidden, shape.hidden, e)] * 2


def _root_params(shape: _Shape, e: int) -> tuple[list[_Param], _Param, _Param | None]:
    """(the root unit's parameters in module order, the input embedding, the untied output head or None)."""
    embed = _Param(shape.vocab * shape.hidden, shape.vocab, e)
    norm = _Param(shape.hidden, shape.hidden, e)
    head = None if shape.tied else _Param(shape.vocab * shape.hidden, shape.vocab, e)
    return [embed, norm] + ([head] if head else []), embed, head


def _fsdp2_shard(params: list[_Param], world: int) -> int:
    """Bytes per rank under FSDP2: each parameter cut along dim 0 in `world` chunks, every rank's chunk padded to the first."""
    return sum(math.ceil(p.dim0 / world) * (p.numel // p.dim0) * p.elem for p in params)


def _fsdp1_unit(params: list[_Param], world: int, align_elems: int) -> tuple[int, int]:
    """(bytes per rank, unsharded bytes) of one FSDP1 unit: a FlatParameter that aligns each original parameter to
    `align_elems` elements (use_orig_params=True) and is padded to a multiple of the world size, then cut evenly."""
    total = 0
    for p in params:
        total += (-total) % align_elems + p.numel
    total += (-total) % world
    return total // world * params[0].elem, total * params[0].elem


def estimate_memory(
    model_config: Any,
    *,
    quantization: Literal["none", "nf4", "fp4", "int8"] = "nf4",
    double_quant: bool = True,
    r: int = 16,
    target_modules: list[str] | str = "all-linear",
    batch_size: int = 1,
    seq_len: int = 2048,
    strategy: Literal["single", "ddp", "fsdp", "fsdp2"] = "single",
    num_gpus: int = 1,
    activation_checkpointing: bool = False,
    offload_activations: bool = False,
    dtype: Literal["bf16", "fp16", "fp32"] = "bf16",
    lora_dtype: Literal["bf16", "fp16", "fp32"] = "fp32",
    optimizer: Literal["adamw", "sgd"] = "adamw",
    chunked_ce: bool = False,
    lora_dropout: float = 0.0,
) -> MemoryEstimate:
    """Predict the peak GPU memory per GPU of LoRA / QLoRA training (see the module docstring for the model).

    ``strategy``: 'single', 'ddp', 'fsdp' (Lightning's FSDPStrategy: FSDP1 with ``lora_fsdp_policy``,
    ``use_orig_params=True``, bf16-mixed) or 'fsdp2' (ModelParallelStrategy with ``fully_shard_lora``).
    ``offload_activations``: checkpointed layer inputs kept in host memory
    (``enable_activation_checkpointing(model, offload_to_cpu=True)``); needs ``activation_checkpointing``.
    """
    _check_positive_int("r", r, "the LoRA rank is usually 8 to 64")
    _check_positive_int("batch_size", batch_size, "it is the micro-batch per GPU, at least 1")
    _check_positive_int("seq_len", seq_len, "give the padded sequence length in tokens")
    _check_positive_int("num_gpus", num_gpus, "use 1 for a single GPU")
    _check_choice("quantization", quantization, _QUANTIZATIONS)
    _check_choice("strategy", strategy, _STRATEGIES)
    _check_choice("dtype", dtype, _BYTES)
    _check_choice("lora_dtype", lora_dtype, _BYTES)
    _check_choice("optimizer", optimizer, _OPTIMIZER_STATES)
    if not isinstance(double_quant, bool):
        raise TypeError(f"`double_quant` must be True or False, got {double_quant!r}.")
    if not double_quant and quantization in ("none", "int8"):  # as QuantizationConfig refuses an option that changes nothing
        raise ValueError(
            f"`double_quant`=False has no effect with `quantization`={quantization!r}: only 4-bit scales are double-quantized. "
            "Drop it (leave it at True), or use quantization='nf4' / 'fp4'."
        )
    if strategy == "single" and num_gpus > 1:
        raise ValueError(
            f"`num_gpus`={num_gpus!r} needs a distributed strategy: pass strategy='ddp', strategy='fsdp' or strategy='fsdp2', or num_gpus=1."
        )
    if strategy in _FSDP and quantization == "int8":
        raise ValueError(
            f"`quantization`='int8' cannot be sharded with `strategy`={strategy!r} (bitsandbytes keeps int8 scales outside "
            "the parameters): use 'nf4' with FSDP, or strategy='ddp' for int8."
        )
    if offload_activations and not activation_checkpointing:
        raise ValueError("`offload_activations`=True offloads the checkpointed layer inputs: set `activation_checkpointing`=True too.")
    if not 0.0 <= lora_dropout < 1.0:
        raise ValueError(f"`lora_dropout` must be in [0, 1), got {lora_dropout!r}.")
    shape = _load_config(model_config)
    targets = _resolve_targets(target_modules)
    counts = _count(shape, targets, r)
    e, lora_e = _BYTES[dtype], _BYTES[lora_dtype]
    t, h, vocab = batch_size * seq_len, shape.hidden, shape.vocab
    linears = shape.linears()

    # Frozen weights: quantized projections; norms and biases in `dtype`; embedding (+ untied head) in `dtype`.
    layer_weights = sum(weight_bytes(i, o, quantization=quantization, double_quant=double_quant, dtype=dtype) for i, o, _ in linears.values())
    layer_weights += e * (2 * h + sum(o for _, o, bias in linears.values() if bias))
    root_weights = e * (vocab * h * (1 if shape.tied else 2) + h)
    lora_total = counts.lora * lora_e
    base_weights, lora_params = shape.layers * layer_weights + root_weights, lora_total
    fsdp_layer = fsdp_root_loss = fsdp_root_layer = fsdp_head = 0
    unsharded = 0
    if strategy in _FSDP:
        base_weights, lora_params, unsharded, fsdp_layer, fsdp_root_loss, fsdp_root_layer, fsdp_head = _fsdp_terms(
            shape, targets, r, num_gpus, strategy, quantization, double_quant, e, lora_e
        )
    lora_grads = lora_params  # gradients take the parameters' dtype (FSDP1 casts its bf16-reduced shards back)
    optimizer_states = _OPTIMIZER_STATES[optimizer] * lora_params  # torch's AdamW keeps states in the param dtype
    # DDP's Reducer allocates every bucket's flat gradient buffer at construction (Reducer::initialize_buckets);
    # 25 MiB caps each bucket, so the buffers together are one more copy of all LoRA grads
    # (gradient_as_bucket_view=True would remove it; Lightning leaves it False).
    ddp_buckets = lora_total if strategy == "ddp" else 0

    layer_acts = _layer_activation_bytes(shape, targets, r, batch_size, seq_len, e, lora_e, lora_dropout)
    rope = 2 * e * seq_len * shape.head_dim  # cos and sin (seq, head_dim), one pair shared by all layers
    if offload_activations:
        # Host memory keeps each checkpoint's input; the GPU holds the one being written out and the one fetched back.
        saved = OFFLOAD_IN_FLIGHT * e * t * h + rope
    elif activation_checkpointing:
        saved = shape.layers * e * t * h + rope  # each checkpoint keeps only its layer's input (t, h)
    else:
        saved = shape.layers * layer_acts + rope
    final_norm = 4 * t * h + 4 * t  # the last RMSNorm's fp32 input and rsqrt; the frozen head keeps nothing
    # Logits (t, vocab) in `dtype` stay alive in the model output until the step ends. The loss upcasts them:
    # log_softmax keeps its fp32 output, and its backward adds the incoming and outgoing fp32 gradients
    # (measured: 2 + 12 bytes per logit at the peak, with bf16).
    logits = e * t * vocab
    loss_tokens = math.ceil(t / CE_CHUNKS) if chunked_ce else t
    loss_buffers = 3 * 4 * loss_tokens * vocab
    # Inside a decoder layer's backward: the largest projection's weight dequantized to `dtype` for
    # grad_input = grad_output @ W, that grad_input (t, in), the gradient entering the layer (t, h) and
    # the LoRA path's own grad_input before autograd sums the two.
    max_in = max(i for i, _, _ in linears.values())
    dequant_weight = e * max(i * o for i, o, _ in linears.values()) if quantization != "none" else 0
    dequant_buffers = dequant_weight + e * t * max_in
    backward_working = e * t * (h + max_in)

    static = dict(
        base_weights=base_weights, lora_params=lora_params, lora_grads=lora_grads, optimizer_states=optimizer_states,
        ddp_buckets=ddp_buckets, cuda_context=CUDA_CONTEXT_BYTES,
    )  # fmt: skip
    loss_phase = dict(
        activations=saved + final_norm, logits_loss=logits + loss_buffers, dequant_buffers=0, backward_working=0,
        fsdp_unsharded=fsdp_root_loss + FSDP_LAYERS_AT_LOSS.get(strategy, 0) * fsdp_layer,
    )  # fmt: skip
    if strategy == "fsdp" and num_gpus > 1:
        # FSDP1 wraps each LoRA A / B as a unit, so LoRALinear runs base and adapter apart (bitsandbytes' own
        # autograd node for the base): a layer's backward then frees saved activations before it dequantizes, and
        # its peak is the recomputation, holding one dequantized weight (measured on CPU at several sizes).
        dequant_buffers, backward_working = dequant_weight, 0
    layer_phase = dict(
        activations=saved + (layer_acts if activation_checkpointing else 0),  # checkpointing recomputes one layer
        logits_loss=logits, dequant_buffers=dequant_buffers, backward_working=backward_working,
        fsdp_unsharded=fsdp_root_layer + FSDP_UNSHARDED_LAYERS * fsdp_layer,
    )  # fmt: skip
    phases = {"loss backward": loss_phase, "decoder-layer backward": layer_phase}
    if strategy == "fsdp2" and not shape.tied and num_gpus > 1:
        # Once the loss gradient reaches the logits, the head's group (gathered again at the start of backward)
        # prefetches the last layer: the fp32 loss buffers are gone, the bf16 logits gradient is there.
        phases["output-head backward"] = dict(
            activations=saved + final_norm, logits_loss=2 * logits, dequant_buffers=0, backward_working=0,
            fsdp_unsharded=fsdp_root_loss + fsdp_layer,
        )  # fmt: skip
    if strategy not in _FSDP or num_gpus == 1:
        for terms in phases.values():
            terms["fsdp_unsharded"] = 0  # one rank holds everything already
    ranked = sorted(phases, key=lambda name: sum(phases[name].values()), reverse=True)
    phase, other = ranked[0], ranked[1]
    peak = phases[phase]
    quant = quantization + ("+dq" if double_quant and quantization in ("nf4", "fp4") else "")
    checkpointing = ("on, inputs offloaded to the CPU" if offload_activations else "on") if activation_checkpointing else "off"
    summary = (
        f"Peak GPU memory per GPU: Llama h={h} x{shape.layers} layers, {quant}, LoRA r={r} on {len(targets)} projections, "
        f"batch {batch_size} x seq {seq_len}, {strategy} on {num_gpus} GPU(s), checkpointing {checkpointing}"
    )
    return MemoryEstimate(
        **static, **peak, peak_phase=phase, other_phase=other, other_phase_total=sum(phases[other].values()) + sum(static.values()),
        layer_activations=layer_acts, unsharded_weights=unsharded, parameters=counts, summary=summary,
    )  # fmt: skip


def _fsdp_terms(
    shape: _Shape, targets: tuple[str, ...], r: int, world: int, strategy: str, quantization: str, double_quant: bool, e: int, lora_e: int
) -> tuple[int, int, int, int, int, int, int]:
    """Per-rank bytes under FSDP: (frozen weights, LoRA parameters, of the frozen weights those not sharded,
    one decoder layer all-gathered with its LoRA in flight, root unsharded at the loss backward, at a layer's
    backward, the FSDP2 output head's group all-gathered for its backward).

    Both strategies shard parameters only: every rank keeps the whole ``quant_state`` of every 4-bit layer.
    FSDP2 cuts each parameter along dim 0 (``_fsdp2_shard``); FSDP1 flattens each unit (``_fsdp1_unit``):
    one per decoder layer (its frozen weights), one per LoRA A / B (``lora_fsdp_policy``) and the root. FSDP1
    all-gathers in ``param_dtype`` (bf16-mixed: the compute dtype), FSDP2 without an ``mp_policy`` in each
    parameter's own dtype. The root unit is not resharded after forward (both FSDPs special-case it); under
    FSDP2 ``fully_shard_lora`` gives an untied input embedding and output head groups of their own, resharded
    after forward like the layers: the head is gathered again for its backward, the embedding never (it is frozen
    and its output needs no gradient), so neither is held during the loss or the layers' backward.
    """
    linears = shape.linears()
    scales = shape.layers * sum(_quant_state_bytes(i, o, quantization, double_quant) for i, o, _ in linears.values())
    frozen = _layer_params(shape, quantization, e)
    root, embed, head = _root_params(shape, e)
    lora = [(_Param(r * linears[n][0], r, lora_e), _Param(linears[n][1] * r, linears[n][1], lora_e)) for n in targets]
    lora_unsharded = sum(a.numel + b.numel for a, b in lora)
    if strategy == "fsdp2":
        weights = shape.layers * _fsdp2_shard(frozen, world) + _fsdp2_shard(root, world)
        lora_shards = shape.layers * _fsdp2_shard([p for pair in lora for p in pair], world)
        layer_full = sum(p.numel * p.elem for p in frozen) + lora_e * lora_unsharded
        head_full = 0
        if head is None:  # tied: one group holds embedding and head, like the root unit of FSDP1
            root_loss = root_layer = sum(p.numel * p.elem for p in root)
        else:
            # The root's pre-backward prefetches the head's group as backward starts, so the loss backward holds it.
            head_full = head.numel * e
            root_loss, root_layer = shape.hidden * e + head_full, shape.hidden * e
    else:
        align = FSDP1_ALIGN_BYTES // e  # FlatParameter alignment, in elements of the all-gather dtype
        layer_shard, layer_full = _fsdp1_unit(frozen, world, align)
        root_shard, root_full = _fsdp1_unit(root, world, align)
        weights = shape.layers * layer_shard + root_shard
        lora_shards = shape.layers * sum(_fsdp1_unit([p], world, align)[0] for pair in lora for p in pair)
        layer_full += e * lora_unsharded  # LoRA units are all-gathered in param_dtype
        root_loss = root_layer = root_full
        head_full = 0
    # The layer's LoRA gradients in flight: unsharded, plus the reduce-scatter's input copy.
    layer_inflight = layer_full + 2 * lora_e * lora_unsharded
    return weights + scales, lora_shards, scales, layer_inflight, root_loss, root_layer, head_full
