"""A sha256 of a safetensors file's tensor bytes, written into its own header and checked on read.

A safetensors file is [8-byte little-endian header length n][n bytes of JSON header][tensor data].
The digest covers the data section (every tensor's bytes, in file order) and is stored in the header's
`__metadata__` under CHECKSUM_KEY, so the file verifies itself wherever it is copied, and readers that
do not know the key (PEFT, vLLM, safetensors itself) ignore it. A flipped bit in the data makes the
digest differ; one in the header either breaks its JSON, changes a shape or offset that the loader's
own checks refuse, or changes the stored digest, which then no longer matches.

Files written before the checksum existed (no key) still load: the key is optional, not the check.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

CHECKSUM_KEY = "loraxs_data_sha256"


class ChecksumMismatch(ValueError):
    """The file's tensor bytes are not the ones it was saved with (its header says otherwise)."""


def _split(blob: bytes, where: str) -> tuple[dict, memoryview]:
    """(the parsed JSON header, the data section) of a safetensors file's bytes."""
    if len(blob) < 8:
        raise ValueError(f"{where}: {len(blob)} bytes, shorter than a safetensors header length field")
    n = int.from_bytes(blob[:8], "little")
    if n > len(blob) - 8:
        raise ValueError(f"{where}: the header claims {n} bytes but the file has {len(blob) - 8} after the length field")
    try:
        header = json.loads(bytes(blob[8:8 + n]))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{where}: the safetensors header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{where}: the safetensors header is a {type(header).__name__}, not an object")
    return header, memoryview(blob)[8 + n:]


def data_sha256(blob: bytes, where: str = "safetensors bytes") -> str:
    return hashlib.sha256(_split(blob, where)[1]).hexdigest()


def serialize_with_checksum(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None) -> bytes:
    """The safetensors bytes of `tensors`, with the sha256 of their data section in the metadata.

    The digest is computed on a first serialization and written into a second one: the data section
    does not depend on the metadata (tensor offsets are relative to its start, and the tensors are laid
    out by dtype alignment and name), which the final check below confirms rather than assumes."""
    from safetensors.torch import save

    meta = {k: v for k, v in (metadata or {}).items() if k != CHECKSUM_KEY}
    digest = data_sha256(save(tensors, metadata=meta or None))
    blob = save(tensors, metadata={**meta, CHECKSUM_KEY: digest})
    if data_sha256(blob) != digest:
        raise RuntimeError("the safetensors data section changed when its metadata changed; cannot checksum it")
    return blob


def load_verified(path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file (on the CPU), after checking its data against the sha256 in its
    header when there is one. Raises ChecksumMismatch (a ValueError) naming the file and both digests,
    ValueError for a file that is not safetensors, OSError when it cannot be read."""
    from safetensors.torch import load

    path = Path(path)
    blob = path.read_bytes()
    header, data = _split(blob, str(path))
    meta = header.get("__metadata__") or {}
    stored = meta.get(CHECKSUM_KEY) if isinstance(meta, dict) else None
    if stored is not None:
        actual = hashlib.sha256(data).hexdigest()
        if actual != stored:
            raise ChecksumMismatch(
                f"{path}: the sha256 of its tensor data is {actual}, but {stored} was written when it was saved: "
                "the file was corrupted or changed after it was saved; nothing was loaded")
    return load(blob)
