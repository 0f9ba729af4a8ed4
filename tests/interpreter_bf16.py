"""bf16 on Triton's CPU interpreter, patched from the tests (Triton itself is not modified).

Triton 3.8.0 and 3.9.0's interpreter (triton/runtime/interpreter.py) keeps bf16 values as raw uint16
bit patterns and gets two operations wrong on them (upstream triton-lang/triton#11584, its fix closed
unmerged):
  - InterpreterBuilder.create_dot converts only fp8 operands, so np.matmul multiplies the bf16 bit
    patterns as integers;
  - InterpreterBuilder.cast_impl turns fp32 into bf16 by truncation, where GPUs and torch round to
    nearest even (1,993 of 4,096 random values differed from torch, measured).
install() widens bf16 dot operands to fp32 (exact) before the original create_dot, and rounds fp32 ->
bf16 casts to nearest even on the bits. Elementwise bf16 arithmetic stays wrong (raw bits), so this
only serves kernels that compute in fp32 and load, store, cast and tl.dot bf16, as this project's do.

The patch leans on interpreter internals: install() checks that every name it touches exists, and
fails naming the Triton version when one does not.
"""

from __future__ import annotations

_INSTALLED = False


def install() -> None:
    """Patch the interpreter (idempotent). Raises RuntimeError naming the Triton version when the
    interpreter's internals differ from what the patch was written for."""
    global _INSTALLED
    if _INSTALLED:
        return
    import numpy as np
    import triton
    import triton.language as tl

    try:
        from triton.runtime import interpreter as interp
    except ImportError as e:  # pragma: no cover - depends on the installed Triton
        raise RuntimeError(f"triton {triton.__version__}: triton.runtime.interpreter is gone ({e}); "
                           "the bf16 interpreter patch (tests/interpreter_bf16.py) needs updating") from e
    missing = [name for name in ("InterpreterBuilder", "TensorHandle") if not hasattr(interp, name)]
    if not missing:
        missing = [f"InterpreterBuilder.{name}" for name in ("create_dot", "cast_impl")
                   if not callable(getattr(interp.InterpreterBuilder, name, None))]
    if missing:
        raise RuntimeError(f"triton {triton.__version__}: the interpreter has no {', '.join(missing)}; the bf16 "
                           "interpreter patch (tests/interpreter_bf16.py) was written for triton 3.8/3.9 and needs "
                           "updating before bf16 Triton tests can run on the CPU")
    Builder, Handle = interp.InterpreterBuilder, interp.TensorHandle
    original_dot, original_cast = Builder.create_dot, Builder.cast_impl

    def widen(h):
        if h.dtype != tl.bfloat16:
            return h
        if h.data.dtype != np.uint16:
            raise RuntimeError(f"triton {triton.__version__}: bf16 interpreter values are {h.data.dtype}, not the "
                               "uint16 bit patterns tests/interpreter_bf16.py expects")
        return Handle((h.data.astype(np.uint32) << 16).view(np.float32), tl.float32)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return original_dot(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            bits = np.ascontiguousarray(src.data, dtype=np.float32).view(np.uint32)
            rounded = ((bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) >> 16).astype(np.uint16)
            # NaN stays NaN (rounding could carry a NaN payload into the exponent: +inf, or wrap).
            nan = np.isnan(src.data)
            rounded = np.where(nan, ((bits >> 16) | np.uint32(0x40)).astype(np.uint16), rounded)
            return Handle(rounded, dst_type.scalar)
        return original_cast(self, src, dst_type)

    Builder.create_dot = create_dot
    Builder.cast_impl = cast_impl
    # The create_fp_trunc / create_fp_ext lambdas call self.cast_impl, so they see the patched method.
    _INSTALLED = True
