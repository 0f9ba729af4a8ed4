"""The ecosystem around LoRA-XS: PEFT LoRA export, official LoRA-XS checkpoints, PEFT tinylora, and the fused
op under PEFT's own TinyLoRA / official LoRA-XS layers (accelerate_peft)."""

from .peft_accelerate import Acceleration, accelerate_peft
from .official import load_official_loraxs
from .peft_lora import export_peft_lora
from .tinylora import from_peft_tinylora

__all__ = ["export_peft_lora", "load_official_loraxs", "from_peft_tinylora", "accelerate_peft", "Acceleration"]
