"""Reading safetensors files safely: tensors as numpy arrays, shapes from the header alone, never unpickling.

safetensors' own numpy loader cannot name bfloat16 (common in large published checkpoints); such files are parsed here
directly from the format's layout (an 8-byte little-endian header length, a JSON header, then raw tensors). Nothing
here imports jax.
"""

from __future__ import annotations

import json
import stat
from pathlib import Path
from typing import Any

from convscale_cli.errors import CheckpointError, UsageError


def safetensors_shapes(file: Path) -> dict[str, tuple[int, ...]]:
    """``name -> shape`` of every tensor in a safetensors file, from its header (no tensor is read)."""
    import struct

    try:
        with open(file, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
        return {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"}
    except (OSError, struct.error, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{str(file)!r} is not a readable safetensors file ({type(exc).__name__})") from None


def _read_safetensors(file: Path) -> dict[str, Any]:
    """Parse a safetensors file directly: its 8-byte header length, JSON header, then raw little-endian tensors.

    Used when numpy cannot name a dtype (bfloat16, common in large published checkpoints); values are widened to
    float32 exactly.
    """
    import struct

    import ml_dtypes
    import numpy as np

    dtypes = {
        "F64": np.float64,
        "F32": np.float32,
        "F16": np.float16,
        "BF16": ml_dtypes.bfloat16,
        "I64": np.int64,
        "I32": np.int32,
        "I16": np.int16,
        "I8": np.int8,
        "U8": np.uint8,
        "BOOL": np.bool_,
    }
    data = file.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    body = memoryview(data)[8 + length :]
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in dtypes:
            raise UsageError(f"tensor {name!r} of {str(file)!r} has unsupported dtype {info['dtype']}")
        start, end = info["data_offsets"]
        array = np.frombuffer(body[start:end], dtype=np.dtype(dtypes[info["dtype"]]).newbyteorder("<"))
        array = array.reshape(info["shape"])
        tensors[name] = array.astype(np.float32) if info["dtype"] == "BF16" else array.copy()
    return tensors


def load_safetensors(file: str | Path) -> dict[str, Any]:
    """Tensors of a ``.safetensors`` file as numpy arrays (never unpickles anything); bfloat16 becomes float32."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    file = Path(file).expanduser()
    try:
        mode = file.stat().st_mode
    except FileNotFoundError:
        raise UsageError(f"weights file {str(file)!r} does not exist") from None
    except OSError as exc:  # a symlink loop, a permission denied on the way
        raise UsageError(f"weights file {str(file)!r} cannot be read ({exc.strerror or exc})") from None
    if stat.S_ISDIR(mode):
        raise UsageError(f"weights file {str(file)!r} is a directory, expected a .safetensors file")
    if not stat.S_ISREG(mode):  # a FIFO would block, /dev/zero never ends
        raise UsageError(f"weights file {str(file)!r} is not a regular file, expected a .safetensors file")
    try:
        return load_file(str(file))
    except (TypeError, AttributeError):  # a dtype numpy cannot name (bfloat16, float8): read the file ourselves
        return _read_safetensors(file)
    except (SafetensorError, ValueError, OSError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"{str(file)!r} is not a readable safetensors file ({reason})") from None


__all__ = ["load_safetensors", "safetensors_shapes"]
