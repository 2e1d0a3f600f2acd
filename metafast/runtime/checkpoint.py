"""Atomic checkpoint files: a crash or Ctrl-C while writing never destroys the previous checkpoint, and a
damaged checkpoint is refused by name instead of resuming from wrong values."""
import hashlib
import io
import json
import os
import re
import tempfile
from typing import Any, Callable, Dict, IO, List

import torch

CHECKPOINT_NAME = "checkpoint.pt"
FORMAT_VERSION = 1

# mkstemp creates files 0600; finished files get the usual permissions (0666 minus the umask).
_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write(path: str, write: Callable[[IO[bytes]], None]) -> None:
    """Call ``write(f)`` on a temp file beside ``path``, fsync it, then rename it over ``path``.

    os.replace is atomic on POSIX and Windows, so readers see either the old file or the new one. A failed
    write (a full disk, a file size limit) raises an OSError naming ``path``; the old file stays. The temp
    file's name carries the writer's pid, so that one left by a writer killed mid-write (SIGKILL, power
    loss) is removed by the next write of ``path`` (:func:`remove_stale_temp_files`).
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    remove_stale_temp_files(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.{os.getpid()}.", suffix=".tmp", dir=directory)
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:  # KeyboardInterrupt included: never leave a half-written temp file behind
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(e, OSError) and e.errno is not None:
            raise OSError(e.errno, f"cannot write {path}: {e.strerror}; the previous file, if any, is unchanged") from e
        raise
    _fsync_dir(directory)


def _temp_pattern(path: str) -> "re.Pattern[str]":
    """The names of :func:`atomic_write`'s temp files for ``path``: ``.<name>.<pid>.<random>.tmp``."""
    return re.compile(re.escape("." + os.path.basename(path)) + r"\.(\d+)\.[A-Za-z0-9_]+\.tmp")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale_temp_files(path: str) -> List[str]:
    """Delete the temp files of ``path``'s atomic writes whose writer process is gone (killed mid-write);
    a temp file of a live process (this one included: another thread may be writing) stays, and so do
    files of other names. Returns the paths removed."""
    directory = os.path.dirname(os.path.abspath(path))
    pattern, removed = _temp_pattern(path), []
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return removed
    for name in names:
        m = pattern.fullmatch(name)
        if m is None or _pid_alive(int(m.group(1))):
            continue
        stale = os.path.join(directory, name)
        try:
            os.unlink(stale)
        except FileNotFoundError:  # removed meanwhile by another process cleaning up the same directory
            continue
        removed.append(stale)
    return removed


def _fsync_dir(directory: str) -> None:
    # Makes the rename itself durable; not supported everywhere (e.g. Windows), hence best effort.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json(path: str, obj: Any) -> None:
    data = (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode()
    atomic_write(path, lambda f: f.write(data))


def save_checkpoint(state: Dict[str, Any], path: str) -> None:
    """Atomically ``torch.save`` a checkpoint dict (tensors, state dicts and plain Python values)."""
    if not isinstance(state, dict):
        raise TypeError(f"state must be a dict, got {type(state).__name__}")
    state = dict(state, format_version=FORMAT_VERSION)
    state[_DIGEST] = _digest(state)
    # serialized in memory first: torch.save's zip writer turns a failed write to the file (a full disk)
    # into "enforce fail ... unexpected pos", while a plain write raises the OSError that says why
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write(path, lambda f: f.write(buffer.getbuffer()))


def load_checkpoint(path: str) -> Dict[str, Any]:
    """Load a checkpoint written by ``save_checkpoint`` onto the CPU (``weights_only``: no pickled code)."""
    if os.path.isdir(path):
        path = os.path.join(path, CHECKPOINT_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (FileNotFoundError, PermissionError, IsADirectoryError):
        raise
    except Exception as e:  # noqa: BLE001 - torch.load reports damage as many types (zip, EOF, EINVAL, unpickling)
        raise ValueError(f"{path}: cannot read the checkpoint, it is truncated or corrupted "
                         f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no detail'})") from None
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path} is not a metafast checkpoint (format version {FORMAT_VERSION})")
    digest = state.pop(_DIGEST, None)  # absent in checkpoints written before digests
    if digest is not None and digest != _digest(state):
        raise ValueError(f"{path}: the checkpoint is corrupted (its content does not match the digest saved with it)")
    return state


# A flipped byte in a tensor's data loads without any error from torch.load (the zip records are not
# checksummed on read), so every checkpoint carries a digest of its whole content.
_DIGEST = "sha256"


def _digest(obj: Any) -> str:
    h = hashlib.sha256()
    _feed(h, obj)
    return h.hexdigest()


def _feed(h, obj: Any) -> None:
    """Hash a state (dicts, lists, tuples, tensors, plain values) in a canonical order."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().to("cpu").contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, dict):
        h.update(f"D{len(obj)}".encode())
        for k, v in obj.items():
            _feed(h, k)
            _feed(h, v)
    elif isinstance(obj, (list, tuple)):
        h.update(f"{type(obj).__name__[0]}{len(obj)}".encode())
        for v in obj:
            _feed(h, v)
    else:
        h.update(f"V{type(obj).__name__}:{obj!r};".encode())
