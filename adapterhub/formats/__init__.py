"""On-disk adapter formats: PEFT's LoRA, read and written without importing peft."""

from .peft_lora import LoraAdapter, LoraModule, read_peft_lora, write_peft_lora

__all__ = ["LoraAdapter", "LoraModule", "read_peft_lora", "write_peft_lora"]
