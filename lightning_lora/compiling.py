"""Regional compilation: ``torch.compile`` each repeated block (decoder layer) of a model in place.

Compiling the blocks rather than the whole model compiles one graph that every layer reuses (the
layers differ only in their weights), keeps module paths and state-dict keys unchanged, and leaves
the strategy's wrapping (DDP, FSDP) and hooks outside the compiled code. It fuses what eager mode
runs as separate kernels around the matmuls (norms, rotary embeddings, activations, residual adds,
the LoRA casts). bitsandbytes' 4-bit ops are custom ops that the graph calls as they are.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import nn

from lightning_lora import nf4_kernel
from lightning_lora.blocks import block_matcher


def compile_blocks(model: nn.Module, block_classes: Iterable[type | str] | None = None, **compile_kwargs: Any) -> list[str]:
    """Compile every block of ``model`` in place with ``nn.Module.compile``; returns their paths.

    ``block_classes`` are the block classes or class names (default: transformers'
    ``_no_split_modules`` of the model, e.g. ``{'LlamaDecoderLayer'}``); ``compile_kwargs`` go to
    ``torch.compile`` (e.g. ``mode='max-autotune-no-cudagraphs'``). Blocks compiled already are left alone.

    Example::

        inject_lora(model, LoRAConfig(r=16), QuantizationConfig(mode="nf4"))
        compile_blocks(model)  # then train as usual; the first steps compile
    """
    nf4_kernel.prepare()  # register the nf4 dequantize op before dynamo traces a layer that calls it
    is_block = block_matcher(model, block_classes)
    compiled = []
    for name, module in model.named_modules():
        if is_block(module):
            if getattr(module, "_compiled_call_impl", None) is None:
                module.compile(**compile_kwargs)
            compiled.append(name)
    if not compiled:
        raise ValueError(
            f"No module of {type(model).__name__} matches `block_classes`={block_classes!r}: name its repeated block class, "
            "e.g. ['LlamaDecoderLayer']."
        )
    return compiled
