"""The Triton backend imported under Triton's interpreter, for the interpreter test files
(test_triton_interpret.py, test_triton_multi_interpret.py): `from triton_interpreted import tb`.

triton.jit picks the interpreter when a kernel module is imported, so TRITON_INTERPRET is set before
every kernel module of the backend (the many-adapter ones included) is imported here, and the
session's own setting is given back afterwards, so that Triton code compiled later in the same run
(Inductor's kernels in other tests on a GPU machine) is not interpreted. Where the backend was
imported earlier without the interpreter (a GPU run), the importing test file is skipped.
"""

import os

import pytest

_PREVIOUS_INTERPRET = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"
try:
    tb = pytest.importorskip("loraxs_kernels.backends.triton")
    from loraxs_kernels.backends.triton import multi  # noqa: F401  (its kernel modules, under the interpreter)
finally:
    if _PREVIOUS_INTERPRET is None:
        del os.environ["TRITON_INTERPRET"]
    else:
        os.environ["TRITON_INTERPRET"] = _PREVIOUS_INTERPRET

if not tb.INTERPRETED:
    pytest.skip("the Triton backend was imported without the interpreter", allow_module_level=True)
