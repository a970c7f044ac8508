"""VLM family adapters, built-in tiny presets and the offline tokenizer (host side: torch + transformers).

Imported lazily by the CLI; `import vlsi_edge` never pulls this package.
"""
from vlsi_edge.models.registry import FAMILIES, adapter_for_family, load_model, supported_model_types

__all__ = ["FAMILIES", "adapter_for_family", "load_model", "supported_model_types"]
