"""Deprecated path, split three ways: block discovery (``lightning_lora.blocks``), plain-PyTorch sharding
(``lightning_lora.sharding``) and what differs per Lightning strategy (``lightning_lora.lightning.strategies``).

The Lightning names resolve on first use, so the sharding names still import without Lightning.
"""

from lightning_lora._deprecated import lazy_names, moved

moved(__name__, "lightning_lora.sharding / lightning_lora.blocks / lightning_lora.lightning.strategies")

_NAMES = {
    "block_classes_of": "lightning_lora.blocks",
    "class_matcher": "lightning_lora.blocks",
    "fully_shard_lora": "lightning_lora.sharding",
    "is_sharded_param": "lightning_lora.sharding",
    "lora_fsdp_policy": "lightning_lora.sharding",
    "packed_4bit_bytes": "lightning_lora.sharding",
    "allow_adapter_only_sharded_load": "lightning_lora.lightning.strategies",
    "check_quantization_for_strategy": "lightning_lora.lightning.strategies:check_quantization",
    "clip_grad_norm": "lightning_lora.lightning.strategies",
    "gather_adapter_state_dict": "lightning_lora.lightning.strategies",
    "is_sharded_checkpoint": "lightning_lora.lightning.checkpoints",
    "strategy_kind": "lightning_lora.lightning.strategies",
}
__getattr__, __dir__ = lazy_names(__name__, _NAMES)
__all__ = sorted(_NAMES)
