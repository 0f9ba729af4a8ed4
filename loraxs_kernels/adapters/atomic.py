"""Writing an adapter directory so that a crash at any instant leaves the old adapter or the new one.

The layout readers see is `<dir>/adapter_config.json` + `<dir>/adapter_model.safetensors` (ours and
PEFT's share the names). Two files cannot be replaced together by renames (each rename is atomic, the
pair is not), and a non-empty directory cannot be renamed over another on Linux. So the pair lives in a
version folder, and one symlink chooses the version:

    <dir>/adapter_config.json       -> .loraxs-current/adapter_config.json        (fixed, made once)
    <dir>/adapter_model.safetensors -> .loraxs-current/adapter_model.safetensors  (fixed, made once)
    <dir>/.loraxs-current           -> .loraxs-v-<hex>                            (the one switch)
    <dir>/.loraxs-v-<hex>/{adapter_config.json, adapter_model.safetensors}

A save writes both files into a new version folder (fsynced, folder fsynced, <dir> fsynced), then
replaces `.loraxs-current` by os.replace of a fresh symlink: rename(2) swaps the name in one step, so
every path lookup through `<dir>` resolves both names into the old version or both into the new one
(a reader that opens the two files at different times can straddle a save that runs concurrently;
that is concurrency, not a crash). Only after the switch are the old version and any debris removed.
Any reader that follows symlinks (PEFT's from_pretrained, safetensors, open()) sees the usual layout.

Cases that need more than the one switch, each kept crash-safe:
- `<dir>` missing or empty: the whole layout is built in a sibling `.<name>.loraxs-tmp-<hex>` and
  renamed onto `<dir>` (rename onto a missing name or an empty directory is atomic).
- `<dir>` holding the two names as plain files (written by an earlier version, copied, or by another
  tool): they are first hard-linked (copied where links fail) into a version folder that the pointer
  then names, and only then replaced by the fixed symlinks; every step leaves the same bytes visible.
- Debris of earlier crashes (`.loraxs-tmp-*`, unreferenced `.loraxs-v-*`, the earlier writer's
  `tmp*.tmp` / `tmp*.tmp.json`, a sibling `.<name>.loraxs-tmp-*`) is removed by the next save.

fsync: SIGKILL cannot lose written data (it stays in the page cache); a power loss can, and ext4/xfs
may persist a rename before the renamed file's blocks unless the file was fsynced first. Each file is
fsynced before any name points at it, and each directory after its entries change.
Files and folders are created with open()/mkdir(), so their modes follow the umask. Concurrent saves
into one parent directory are serialised by flock on that directory (Linux, macOS).
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path

from .integrity import serialize_with_checksum

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
NAMES = (WEIGHTS_NAME, CONFIG_NAME)  # the order they are made in: a config never points at nothing
CURRENT = ".loraxs-current"
VERSION_PREFIX = ".loraxs-v-"
TMP_PREFIX = ".loraxs-tmp-"
# What the writer before this one (NamedTemporaryFile(suffix=".tmp") in the adapter folder) left behind.
_LEGACY_TMP = re.compile(r"tmp[a-z0-9_]{6,}\.tmp(\.json)?")


def _fsync_path(path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "xb") as f:  # open(): mode 0o666 & ~umask; "x": never through a stale symlink
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another file system, or none with hard links: copy, durably
        with open(src, "rb") as f:
            _write_file(dst, f.read())


def _remove(path: Path) -> None:
    if path.is_symlink() or not path.is_dir():
        os.unlink(path)
    else:
        shutil.rmtree(path)


def _new_symlink(directory: Path, name: str, target: str) -> None:
    """directory/name -> target, made under a temporary name and renamed over whatever is there."""
    tmp = directory / f"{TMP_PREFIX}{uuid.uuid4().hex}"
    os.symlink(target, tmp)
    os.replace(tmp, directory / name)


def _is_ours(directory: Path, name: str) -> bool:
    p = directory / name
    return p.is_symlink() and os.readlink(p) == f"{CURRENT}/{name}"


@contextmanager
def _locked(directory: Path):
    try:
        import fcntl
    except ImportError:  # no flock (Windows): concurrent saves into one folder are the caller's to avoid
        yield
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _write_version(directory: Path, blobs: dict[str, bytes]) -> str:
    name = f"{VERSION_PREFIX}{uuid.uuid4().hex}"
    folder = directory / name
    os.mkdir(folder)
    for fname in NAMES:
        _write_file(folder / fname, blobs[fname])
    _fsync_path(folder)
    return name


def _build_fresh(out: Path, blobs: dict[str, bytes]) -> bool:
    """The whole layout in a sibling folder, renamed onto `out` (missing, or an empty directory)."""
    tmp = out.parent / f".{out.name}.loraxs-tmp-{uuid.uuid4().hex}"
    os.mkdir(tmp)
    version = _write_version(tmp, blobs)
    os.symlink(version, tmp / CURRENT)
    for fname in NAMES:
        os.symlink(f"{CURRENT}/{fname}", tmp / fname)
    _fsync_path(tmp)
    try:
        os.rename(tmp, out)
    except OSError as e:
        shutil.rmtree(tmp)
        if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
        return False  # something appeared in `out` meanwhile: take the in-place path
    _fsync_path(out.parent)
    return True


def _adopt_plain_files(out: Path) -> None:
    """Move plain (or foreign-symlink) adapter files under a version folder without changing what a
    reader sees: link the visible bytes into a version, point at it, then swap in the fixed symlinks."""
    plain = [f for f in NAMES if (out / f).exists() and not _is_ours(out, f)]
    if not plain:
        return
    visible = [f for f in NAMES if (out / f).exists()]
    name = f"{VERSION_PREFIX}{uuid.uuid4().hex}"
    os.mkdir(out / name)
    for fname in visible:
        _link_or_copy(Path(os.path.realpath(out / fname)), out / name / fname)
    _fsync_path(out / name)
    _fsync_path(out)
    _new_symlink(out, CURRENT, name)
    _fsync_path(out)
    for fname in plain:
        _new_symlink(out, fname, f"{CURRENT}/{fname}")
    _fsync_path(out)


def _remove_debris(out: Path) -> None:
    keep = os.readlink(out / CURRENT)
    for entry in out.iterdir():
        n = entry.name
        stale = (n.startswith(TMP_PREFIX) or (n.startswith(VERSION_PREFIX) and n != keep)
                 or (_LEGACY_TMP.fullmatch(n) is not None and entry.is_file()))
        if stale:
            _remove(entry)
    for entry in out.parent.iterdir():
        if entry.name.startswith(f".{out.name}.loraxs-tmp-"):
            _remove(entry)


def _check_fingerprints(config: dict) -> None:
    # A NaN/Inf fingerprint (a base with NaN weights) would be written as bare NaN by json.dump and match
    # nothing reliably: refuse it here, before any file is touched, naming the layer.
    from .fingerprint import fingerprint_problem

    layers = config.get("layers") if isinstance(config, dict) else None
    if not isinstance(layers, dict):
        return
    for lpath, lc in layers.items():
        fp = lc.get("fingerprint") if isinstance(lc, dict) else None
        if fp is None:
            continue
        why = fingerprint_problem(fp)
        if why is not None:
            raise ValueError(f"layer {lpath}: the base weight's fingerprint is unusable ({why}); a base with NaN or "
                             "Inf weights cannot be fingerprinted: refusing to save the adapter")


def write_adapter_dir(path, tensors: dict, config: dict, metadata: dict) -> Path:
    """Write `<path>/adapter_model.safetensors` (tensors, metadata, and the sha256 of the tensor bytes)
    and `<path>/adapter_config.json` (config) as one atomic switch (see the module docstring); return
    the directory. Everything is serialised before the file system is touched: a refused call (a
    non-finite fingerprint, tensors safetensors cannot hold, a path that is a file) changes nothing."""
    out = Path(os.path.abspath(path))  # "." or "a/..": siblings and the parent need a real name
    _check_fingerprints(config)
    blobs = {
        WEIGHTS_NAME: serialize_with_checksum(tensors, metadata),
        CONFIG_NAME: json.dumps(config, indent=1).encode(),
    }
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{str(out)!r} is a file; an adapter is a directory holding {CONFIG_NAME} and {WEIGHTS_NAME}")
    out.parent.mkdir(parents=True, exist_ok=True)
    with _locked(out.parent):
        for entry in out.parent.iterdir():
            if entry.name.startswith(f".{out.name}.loraxs-tmp-"):
                _remove(entry)
        # An empty folder is replaced whole, unless it is a symlink (kept) or the working directory
        # (a process would be left in a deleted folder): those take the in-place path.
        if not out.exists() or (not out.is_symlink() and not any(out.iterdir())
                                and not os.path.samefile(out, os.getcwd())):
            if _build_fresh(out, blobs):
                return Path(path)
        _adopt_plain_files(out)
        version = _write_version(out, blobs)
        _fsync_path(out)
        _new_symlink(out, CURRENT, version)  # the switch
        _fsync_path(out)
        for fname in NAMES:
            if not _is_ours(out, fname):
                _new_symlink(out, fname, f"{CURRENT}/{fname}")
        _remove_debris(out)
        _fsync_path(out)
    return Path(path)
