"""What an interpreter already holds, for scripts/setup_env.sh. Standard library only: it runs in
whatever Python the Makefile found, before anything is installed.

  python env_probe.py info            key=value lines: python, is_venv, site_packages, torch,
                                      torch_dist, torch_cuda, cuda_available, gpu_arch, triton, pip (or the
                                      import error in *_error keys)
  python env_probe.py missing FILE... [--also REQ ...]
                                      the requirements (from pip requirement files, plus --also ones)
                                      that this interpreter does not satisfy, one per line
"""

from __future__ import annotations

import importlib.metadata as md
import os
import re
import site
import sys

_REQ = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(\[[^\]]*\])?\s*([^;#]*?)\s*(;.*)?$")


def _first_line(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()
    return text[0] if text else type(exc).__name__


def info() -> None:
    out = {
        "python": "%d.%d.%d" % sys.version_info[:3],
        "executable": sys.executable,
        "is_venv": int(sys.prefix != sys.base_prefix),
        "site_packages": os.pathsep.join(p for p in site.getsitepackages() if os.path.isdir(p)),
    }
    try:
        import pip  # noqa: F401

        out["pip"] = md.version("pip")
    except Exception as exc:  # pip absent (Debian's python3 without python3-pip)
        out["pip_error"] = _first_line(exc)
    try:
        import torch

        out["torch"] = torch.__version__
        # pip knows the distribution's version, which can differ from torch.__version__ (PyPI's CUDA
        # wheel: metadata 2.13.0, __version__ 2.13.0+cu130); a constraint must use this one.
        out["torch_dist"] = md.version("torch")
        out["torch_cuda"] = torch.version.cuda or ""
        # Only asked on a machine with a GPU (setup_env.sh passes --gpu): it initialises CUDA.
        if "--gpu" in sys.argv and torch.version.cuda:
            ok = torch.cuda.is_available()
            out["cuda_available"] = int(ok)
            if ok:
                major, minor = torch.cuda.get_device_capability(0)
                out["gpu_arch"] = f"{major}.{minor}"
    except Exception as exc:  # no torch, or a torch that cannot load (missing CUDA libs, ABI)
        out["torch_error"] = _first_line(exc)
    try:  # the metadata: importing triton costs seconds and its version is all that is asked here
        out["triton"] = md.version("triton")
    except md.PackageNotFoundError:
        try:  # a build installed under another name (pytorch-triton)
            import triton

            out["triton"] = triton.__version__
        except Exception as exc:
            out["triton_error"] = _first_line(exc)
    for key, value in out.items():
        print(f"{key}={value}")


def _parse_version(text: str) -> tuple:
    # Release segments only ("2.11.0+cu130" -> (2, 11, 0)); enough for the >=, ==, <, ~= pins of
    # requirements/*.txt. Pre-releases compare as their release.
    nums = re.match(r"\d+(?:\.\d+)*", text.strip())
    return tuple(int(x) for x in nums.group(0).split(".")) if nums else ()


def _cmp(a: tuple, b: tuple) -> int:
    n = max(len(a), len(b))
    a, b = a + (0,) * (n - len(a)), b + (0,) * (n - len(b))
    return (a > b) - (a < b)


def _satisfies(installed: str, spec: str) -> bool:
    try:  # pip's own parser when pip is importable: full PEP 440
        from pip._vendor.packaging.specifiers import SpecifierSet
        from pip._vendor.packaging.version import Version

        return SpecifierSet(spec).contains(Version(installed), prereleases=True)
    except ImportError:
        pass
    have = _parse_version(installed)
    for clause in filter(None, (c.strip() for c in spec.split(","))):
        op, ver = re.match(r"(===|==|!=|<=|>=|~=|<|>)\s*(.+)", clause).groups()
        want = _parse_version(ver.replace(".*", ""))
        c = _cmp(have, want)
        if op in ("==", "===") and ver.endswith(".*"):
            ok = have[: len(want)] == want
        else:
            ok = {"==": c == 0, "===": c == 0, "!=": c != 0, "<=": c <= 0, ">=": c >= 0, "<": c < 0, ">": c > 0,
                  "~=": c >= 0 and have[: len(want) - 1] == want[:-1]}[op]
        if not ok:
            return False
    return True


def _read_requirements(path: str, seen: set) -> list:
    path = os.path.abspath(path)
    if path in seen:
        return []
    seen.add(path)
    reqs = []
    with open(path) as f:
        for raw in f:
            line = raw.split(" #")[0].strip()
            if not line or line.startswith("#"):
                continue
            if line.startswith(("-r ", "--requirement ")):
                reqs += _read_requirements(os.path.join(os.path.dirname(path), line.split(None, 1)[1]), seen)
            elif not line.startswith("-"):  # other pip options (indexes) say nothing about what is installed
                reqs.append(line)
    return reqs


def missing(args: list) -> None:
    files, also = [], []
    it = iter(args)
    for a in it:
        if a == "--also":
            also.append(next(it))
        else:
            files.append(a)
    seen: set = set()
    reqs = [r for f in files for r in _read_requirements(f, seen)] + also
    for req in reqs:
        m = _REQ.match(req)
        if not m:
            raise SystemExit(f"env_probe: cannot read the requirement {req!r}")
        name, _extras, spec, _marker = m.groups()
        try:
            have = md.version(name)
        except md.PackageNotFoundError:
            print(req)
            continue
        if spec and not _satisfies(have, spec):
            print(req)


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "info":
        info()
    elif len(sys.argv) >= 2 and sys.argv[1] == "missing":
        missing(sys.argv[2:])
    else:
        raise SystemExit(__doc__)
