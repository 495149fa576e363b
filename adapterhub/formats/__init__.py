"""On-disk adapter formats: PEFT's layout (shared by every PEFT type) and its LoRA format, without importing peft."""

from .peft import PeftFiles, read_peft, write_peft
from .peft_lora import read_peft_lora, write_peft_lora

__all__ = ["PeftFiles", "read_peft", "write_peft", "read_peft_lora", "write_peft_lora"]
