"""A small forward+backward through each GPU backend, sized for compute-sanitizer (memcheck).

Odd sizes so that every masked edge of the kernels runs; M=1 and M=37 cover the decoding and tiled
paths. Fails if a backend is unavailable on a CUDA machine, or if an output is non-finite."""

import torch

from loraxs_kernels import loraxs_linear
from loraxs_kernels.backends import unavailable_reason

dev = torch.device("cuda")
for backend in ("triton", "cuda"):
    reason = unavailable_reason(backend, dev)
    if reason is not None:
        raise SystemExit(f"backend {backend} unavailable on a CUDA machine: {reason}")
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for M, in_f, out_f, r in ((1, 72, 40, 5), (37, 130, 66, 17)):
            g = torch.Generator(device=dev).manual_seed(0)
            x = torch.randn(M, in_f, device=dev, dtype=dtype, generator=g, requires_grad=True)
            w = torch.randn(out_f, in_f, device=dev, dtype=dtype, generator=g) / in_f**0.5
            b = torch.randn(out_f, device=dev, dtype=dtype, generator=g)
            A = torch.randn(in_f, r, device=dev, dtype=dtype, generator=g)
            B = torch.randn(r, out_f, device=dev, dtype=dtype, generator=g)
            R = torch.randn(r, r, device=dev, dtype=torch.float32, generator=g, requires_grad=True)
            y = loraxs_linear(x, w, b, A, R, B, 0.5, backend=backend)
            y.float().square().sum().backward()
            torch.cuda.synchronize()
            assert torch.isfinite(y).all() and torch.isfinite(x.grad).all() and torch.isfinite(R.grad).all()
            print(f"{backend} {dtype} M={M} in={in_f} out={out_f} r={r}: ok")
