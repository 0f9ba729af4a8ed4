"""LoRA-XS as a PEFT method. `import loraxs_kernels.peft` registers it; afterwards

    peft.get_peft_model(model, LoraXSConfig(r=8, target_modules=["query", "value"]))

gives a PeftModel whose adapted layers are FusedLoRAXSLinear modules (the fused op), and
save_pretrained / PeftModel.from_pretrained / AutoPeftModelFor... / merge_and_unload / Trainer work as
for PEFT's own methods. The adapter files are the ones save_adapter / load_adapter read and write.

config.py (LoraXSConfig), layer.py (the tuner layer), model.py (the tuner: injection, the base
fingerprint check, the state-dict keys), registration.py (the PeftType member, the version check).
"""

from .registration import MIN_PEFT, PEFT_TYPE, register

register()

from .config import LoraXSConfig  # noqa: E402
from .layer import LoraXSLayer  # noqa: E402
from .model import LoraXSModel  # noqa: E402

__all__ = ["LoraXSConfig", "LoraXSModel", "LoraXSLayer", "PEFT_TYPE", "MIN_PEFT"]
