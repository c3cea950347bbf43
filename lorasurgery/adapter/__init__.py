"""The PEFT adapter model: config, key grammar, per-module scale, and mapping onto a base checkpoint."""

from lorasurgery.adapter.config import AdapterConfig, parse_adapter_config, pattern_key
from lorasurgery.adapter.model import PEFT_PREFIX, Adapter, LoraModule, load_adapter
from lorasurgery.adapter.names import PrefixRule, find_prefix_rule

__all__ = [
    "PEFT_PREFIX",
    "Adapter",
    "AdapterConfig",
    "LoraModule",
    "PrefixRule",
    "find_prefix_rule",
    "load_adapter",
    "parse_adapter_config",
    "pattern_key",
]
