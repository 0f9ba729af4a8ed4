"""Make "loraxs" a PEFT method: a PeftType member, then peft.register_peft_method.

PEFT's register_peft_method refuses a name whose upper case is not already a PeftType member, and
PeftType is a closed str Enum. The narrowest addition that works is one member put into the enum's
own maps (_member_map_, _value2member_map_, _member_names_) and onto the class, str-valued with name
and value "LORAXS": PeftType("LORAXS"), PeftType["LORAXS"], PeftType.LORAXS, `in list(PeftType)` and
JSON output ("LORAXS") then behave as for PEFT's own members. Nothing else of PEFT is patched.

The tuner relies on BaseTuner's state-dict hooks (_get_adapter_state_dict,
_remove_adapter_name_from_key, _remap_adapter_state_dict_for_load): they decide which tensors an
adapter file holds (R, and A/B only where the basis is stored) and under which keys. PEFT versions
without them save every tensor of a tuner layer (the base weight too) and are refused here with the
version named.
"""

from __future__ import annotations

import enum

NAME = "loraxs"
PEFT_TYPE_NAME = "LORAXS"
REQUIRED_HOOKS = ("_get_adapter_state_dict", "_remove_adapter_name_from_key", "_remap_adapter_state_dict_for_load")
# The first PEFT release with the three hooks: 0.21.0 passes tests/test_peft_method.py and
# tests/test_peft_trainer.py (as does 0.21.2); 0.20.0 lacks the hooks.
MIN_PEFT = "0.21.0"


def unsupported_reason(version: str, base_tuner_cls, has_register: bool) -> str | None:
    """None when this PEFT can host the method, else a sentence naming the version and what to install."""
    missing = [h for h in REQUIRED_HOOKS if not hasattr(base_tuner_cls, h)]
    if not has_register:
        missing.insert(0, "peft.utils.register_peft_method")
    if not missing:
        return None
    return (f"loraxs_kernels.peft needs PEFT >= {MIN_PEFT}; the installed peft {version} lacks "
            f"{', '.join(missing)}. Upgrade with `pip install -U 'peft>={MIN_PEFT}'`, or use the PEFT-free "
            "path (loraxs_kernels.apply_loraxs / save_adapter / load_adapter, the same file format)")


def add_enum_member(enum_cls: type, name: str):
    """The member `name` (value == name) of a str Enum, added if missing; returns it."""
    if name in enum_cls.__members__:
        return enum_cls[name]
    if not (issubclass(enum_cls, str) and issubclass(enum_cls, enum.Enum)):
        raise TypeError(f"{enum_cls.__name__} is not a str Enum; cannot add {name!r}")
    member = str.__new__(enum_cls, name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = enum_cls
    if hasattr(next(iter(enum_cls)), "_sort_order_"):
        member._sort_order_ = len(enum_cls._member_names_)
    enum_cls._member_map_[name] = member
    enum_cls._value2member_map_[name] = member
    enum_cls._member_names_.append(name)
    type.__setattr__(enum_cls, name, member)  # EnumType.__setattr__ guards members; this one is new
    return member


def _peft_type():
    from peft.utils.peft_types import PeftType

    return add_enum_member(PeftType, PEFT_TYPE_NAME)


PEFT_TYPE = _peft_type()


def register() -> None:
    """Register LoRA-XS with PEFT (idempotent); ImportError naming the PEFT version when it cannot host it."""
    import peft
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
    from peft.tuners.tuners_utils import BaseTuner

    register_fn = getattr(peft.utils, "register_peft_method", None)
    why = unsupported_reason(peft.__version__, BaseTuner, register_fn is not None)
    if why is not None:
        raise ImportError(why)
    if PEFT_TYPE in PEFT_TYPE_TO_CONFIG_MAPPING:
        return
    from .config import LoraXSConfig
    from .model import LoraXSModel

    register_fn(name=NAME, config_cls=LoraXSConfig, model_cls=LoraXSModel, prefix=LoraXSModel.prefix)
