"""A checkpoint directory checked before a byte of weights is loaded: every file the index names
is there, inside the directory, and its safetensors header parses and fits the file's size;
config.json (and generation_config.json, tokenizer.json when present) parse. A damaged
checkpoint (a truncated shard, a shard the index lists but that is missing, a config.json that
is not JSON) is refused with `CheckpointInvalid` naming the file and the problem, which the
worker turns into its start-up refusal (exit 2 and the termination message); before, it failed
somewhere in loading (exit 1 with a traceback, or a hang), which the operator took for a rank
that died and replaced forever.

It reads headers only (8 bytes and the header's JSON per file), never tensor data, so it costs
a few milliseconds per shard; it runs under a deadline (`verify(..., timeout_s=)`), since a hung
volume would otherwise hang the worker instead of refusing it. No torch here.
"""

from __future__ import annotations

import json
import math
import threading
from pathlib import Path
from typing import Any

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
OPTIONAL_JSON = ("generation_config.json", "tokenizer.json")
INVALID = "the checkpoint is invalid"
"""How every refusal's message starts (the operator's `failures.CHECKPOINT_INVALID`)."""
TIMEOUT_S = 300.0
"""How long the whole check may take: headers only, seconds on a network volume; longer, the
volume hangs."""
MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit
DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2,
    "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip


class CheckpointInvalid(ValueError):
    """A checkpoint directory that cannot be loaded as it is: the message names the file."""

    def __init__(self, where: Path | str, problem: str) -> None:
        super().__init__(f"{INVALID}: {where}: {problem}")


def verify(path: str | Path, *, timeout_s: float = TIMEOUT_S) -> None:
    """Raise CheckpointInvalid unless the directory at `path` looks loadable (see the module
    docstring), or when the check does not finish within `timeout_s`."""
    outcome: list[BaseException | None] = []
    worker = threading.Thread(
        target=lambda: outcome.append(_caught(Path(path))), name="moe-checkpoint-check", daemon=True
    )
    worker.start()
    worker.join(timeout_s)
    if not outcome:  # a daemon thread: left blocked in the volume, the process still exits
        raise CheckpointInvalid(
            path, f"checking its files did not finish in {timeout_s:g} s: the volume hangs"
        )
    if outcome[0] is not None:
        raise outcome[0]


def _caught(path: Path) -> BaseException | None:
    try:
        check_directory(path)
    except CheckpointInvalid as error:
        return error
    except Exception as error:  # a file that breaks the reader (nested past its limit, ...)
        return CheckpointInvalid(path, f"unreadable ({type(error).__name__}: {error})")
    return None


def check_directory(path: Path) -> None:
    """The checks themselves, with no deadline."""
    if not path.is_dir():
        raise CheckpointInvalid(path, "no such directory" if not path.exists() else "no directory")
    config = read_json(path / "config.json")
    if not isinstance(config, dict):
        raise CheckpointInvalid(path / "config.json", "not a JSON object")
    for name in OPTIONAL_JSON:
        if (path / name).exists():
            read_json(path / name)
    index = path / INDEX_FILE
    if index.exists():
        for file, keys in _shards(path, index).items():
            names = check_safetensors(path / file)
            missing = sorted(set(keys) - names)
            if missing:
                raise CheckpointInvalid(
                    path / file,
                    f"{INDEX_FILE} puts {len(missing)} tensors in it that its header lacks "
                    f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})",
                )
    elif (path / SINGLE_FILE).exists():
        check_safetensors(path / SINGLE_FILE)
    else:
        raise CheckpointInvalid(path, f"neither {SINGLE_FILE} nor {INDEX_FILE}")


def read_json(file: Path) -> Any:
    try:
        return json.loads(file.read_bytes())
    except FileNotFoundError:
        raise CheckpointInvalid(file, "missing") from None
    except OSError as error:
        raise CheckpointInvalid(file, f"unreadable ({error.strerror or error})") from None
    except (ValueError, UnicodeDecodeError) as error:
        raise CheckpointInvalid(file, f"not valid JSON ({error})") from None


def _shards(path: Path, index: Path) -> dict[str, list[str]]:
    """File -> the tensors the index puts in it; every file inside the directory and there."""
    document = read_json(index)
    weight_map = document.get("weight_map") if isinstance(document, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointInvalid(index, "no weight_map of tensor names to files")
    shards: dict[str, list[str]] = {}
    for key, file in weight_map.items():
        if not isinstance(file, str) or "/" in file or file in ("", ".", ".."):
            raise CheckpointInvalid(index, f"{key!r} maps to {file!r}, not a file of the directory")
        shards.setdefault(file, []).append(key)
    for file, keys in shards.items():
        if not (path / file).is_file():
            raise CheckpointInvalid(
                path / file, f"missing: {INDEX_FILE} lists it for {len(keys)} tensors"
            )
    return shards


def check_safetensors(file: Path) -> set[str]:
    """The tensor names of a safetensors file whose header parses and whose tensors all lie
    within the file, each the size its dtype and shape say; CheckpointInvalid otherwise."""
    try:
        with file.open("rb") as handle:
            size = handle.seek(0, 2)
            handle.seek(0)
            head = handle.read(8)
            if len(head) < 8:
                raise CheckpointInvalid(file, f"truncated: {size} bytes, not even a header")
            length = int.from_bytes(head, "little")
            if length > MAX_HEADER_BYTES or 8 + length > size:
                raise CheckpointInvalid(
                    file,
                    f"truncated or not safetensors: a {length}-byte header announced, "
                    f"{size - 8} bytes follow",
                )
            raw = handle.read(length)
    except FileNotFoundError:
        raise CheckpointInvalid(file, "missing") from None
    except OSError as error:
        raise CheckpointInvalid(file, f"unreadable ({error.strerror or error})") from None
    try:
        header = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as error:
        raise CheckpointInvalid(file, f"its safetensors header is not JSON ({error})") from None
    if not isinstance(header, dict):
        raise CheckpointInvalid(file, "its safetensors header is not a JSON object")
    data = size - 8 - length
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        end = max(end, _tensor_end(file, name, entry))
    if end > data:
        raise CheckpointInvalid(
            file, f"truncated: its header places tensors up to byte {end}, {data} bytes follow it"
        )
    return {name for name in header if name != "__metadata__"}


def _tensor_end(file: Path, name: str, entry: Any) -> int:
    """Where the tensor's bytes end, after checking they are as many as it needs."""
    try:
        begin, end = entry["data_offsets"]
        itemsize = DTYPE_BYTES[entry["dtype"]]
        elements = math.prod(int(n) for n in entry["shape"])
        valid = isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end
    except (KeyError, TypeError, ValueError):
        raise CheckpointInvalid(file, f"tensor {name!r}: a malformed header entry") from None
    if not valid or end - begin != elements * itemsize:
        raise CheckpointInvalid(
            file, f"tensor {name!r}: offsets {begin}..{end} do not hold its {elements} elements"
        )
    return int(end)
