"""llm.c's binary files: model checkpoints, tokenizer, token shards and the debug state.

Every file is a 1024-byte header (256 little-endian 32-bit ints) followed by a payload:

    model        magic 20240326  int32 [magic, version, maxT, V, L, NH, C, Vp]
                 version 3: params as float32, version 5: params as bfloat16; the 16 tensors of
                 `layout.parameter_shapes` back to back (wte padded to Vp rows)
    debug state  magic 20240327  int32 [magic, version=2, B, T]
                 x (B*T int32), y (B*T int32), logits (B*T*V float32, V unpadded), loss (1 float32),
                 grads (num_parameters float32, same layout as the model)
    tokenizer    magic 20240328  uint32 [magic, version, V, eot]  (eot only in version 2)
                 per token: uint8 length (> 0), then that many bytes
    token shard  magic 20240520  int32 [magic, version=1, num_tokens]
                 num_tokens uint16
    run state    magic 20241122  int32 [magic, version, step, num_parameters (low, high 31 bits),
                 seed, data epoch, data shard position, data sample index, trailer bytes]   (llmpy's own)
                 AdamW m (num_parameters float32), v (num_parameters float32); version 2 (training
                 checkpoints) then a UTF-8 JSON trailer: the run's id and identity, the sha256 of the
                 model file beside it and of the header fields with m and v, which `read_run_state` verifies

Readers check the header, then the exact file size, before touching the payload; any problem
raises FormatError naming the file, the field, what was expected and what was found.
Writers validate their arguments first and then write atomically (temp file + fsync + rename),
so a failed or interrupted write never leaves a half-written file at the destination.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import stat
from dataclasses import dataclass
from typing import BinaryIO, Iterable, Iterator

import numpy as np

from llmpy.core.config import GPT2Config

HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4

MODEL_MAGIC = 20240326
MODEL_VERSION_FP32 = 3
MODEL_VERSION_BF16 = 5
MODEL_VERSIONS = {MODEL_VERSION_FP32: "float32", MODEL_VERSION_BF16: "bfloat16"}

DEBUG_STATE_MAGIC = 20240327
DEBUG_STATE_VERSION = 2

TOKENIZER_MAGIC = 20240328
TOKENIZER_VERSIONS = (1, 2)

SHARD_MAGIC = 20240520
SHARD_VERSION = 1
# llm.c's dev/data/data_common.py writes LLaMA-3 shards (uint32 tokens) under this magic.
LLAMA3_SHARD_MAGIC = 20240801
SHARD_KIND = "llm.c token shard"

# llmpy's training state beside a model checkpoint (llm.c's CPU trainer has none; its CUDA state file
# holds mixed-precision fields that do not apply here, so this is a format of our own).
RUN_STATE_MAGIC = 20241122
RUN_STATE_VERSIONS = (1, 2, 3)  # 3: the completion record of a sharded checkpoint (no m, v of its own)

INT32_MAX = 2**31 - 1
UINT16_MAX = 2**16 - 1

# Explicit little-endian dtypes: the files are little-endian whatever the host is.
I32 = np.dtype("<i4")
U32 = np.dtype("<u4")
U16 = np.dtype("<u2")
F32 = np.dtype("<f4")


class FormatError(ValueError):
    """A file that is not a valid llm.c file of the expected kind."""


# ----------------------------------------------------------------------------
# reading helpers


@contextlib.contextmanager
def _open_for_read(path) -> Iterator[tuple[BinaryIO, int]]:
    """Open `path` for reading and yield (file, size in bytes); OS errors become FormatError."""
    check_regular_file(path)
    try:
        f = open(path, "rb")
    except FileNotFoundError as err:
        raise FormatError(f"{path}: file not found") from err
    except OSError as err:
        raise FormatError(f"{path}: cannot open file: {err.strerror or err}") from err
    with f:
        # fstat on the open file, not getsize on the path, so size and contents are the same file.
        yield f, os.fstat(f.fileno()).st_size


def special_file_kind(mode: int) -> str | None:
    """What a file of this st_mode is when it is not a regular file or a directory (reading a named pipe blocks
    forever, a device never ends): None for those two."""
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return None
    return "a named pipe" if stat.S_ISFIFO(mode) else "not a regular file"


def check_regular_file(path) -> None:
    """Refuse what is not a regular file."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError as err:
        raise FormatError(f"{path}: file not found") from err
    except OSError as err:
        raise FormatError(f"{path}: cannot open file: {err.strerror or err}") from err
    if not stat.S_ISREG(mode):
        kind = special_file_kind(mode) or "a directory"
        raise FormatError(f"{path}: cannot open file: expected a regular file, found {kind}")


def check_finite(path, what: str, values: np.ndarray, config: GPT2Config | None = None) -> None:
    """FormatError naming the file and the tensor (llm.c's parameter layout, with `config`) where `values`
    first holds a NaN or an infinity."""
    bad = np.flatnonzero(~np.isfinite(values))
    if bad.size == 0:
        return
    where = f"element {int(bad[0])}"
    if config is not None:
        from llmpy.core.layout import parameter_shapes

        offset, first = 0, int(bad[0])
        for name, shape in parameter_shapes(config).items():
            size = int(np.prod(shape))
            if first < offset + size:
                where = f"tensor {name}, element {first - offset}"
                break
            offset += size
    raise FormatError(f"{path}: {what}: {bad.size} non-finite values (first: {where})")


def file_sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_header(f: BinaryIO, path, size: int, magic: int, dtype: np.dtype, kind: str) -> np.ndarray:
    """The 256 header ints as Python-int-friendly int64, after the size and magic checks."""
    if size < HEADER_BYTES:
        raise FormatError(
            f"{path}: file size: expected at least {HEADER_BYTES} bytes for the header, "
            f"found {size} bytes (file truncated, or not an {kind}?)"
        )
    raw = f.read(HEADER_BYTES)
    if len(raw) != HEADER_BYTES:
        raise FormatError(f"{path}: header: expected {HEADER_BYTES} bytes, read only {len(raw)}")
    header = np.frombuffer(raw, dtype=dtype).astype(np.int64)
    if header[0] != magic:
        hint = ""
        if kind == SHARD_KIND and header[0] == LLAMA3_SHARD_MAGIC:
            hint = " (that is llm.c's LLaMA-3 uint32 shard; only GPT-2 uint16 shards are supported)"
        raise FormatError(f"{path}: header magic: expected {magic} ({kind}), found {header[0]}{hint}")
    return header


def _check_positive(path, field: str, value: int) -> int:
    if value <= 0:
        raise FormatError(f"{path}: header {field}: expected a positive integer, found {value}")
    return int(value)


def _check_file_size(path, size: int, expected: int, formula: str, because: str) -> None:
    """Exact payload size check; `formula` shows how `expected` was computed."""
    if size == expected:
        return
    why = "file truncated?" if size < expected else f"{size - expected} trailing bytes"
    raise FormatError(
        f"{path}: file size: expected {formula} = {expected} bytes ({because}), found {size} bytes ({why})"
    )


def _read_array(f: BinaryIO, path, dtype: np.dtype, count: int, field: str) -> np.ndarray:
    """`count` items from the current position, in native byte order."""
    array = np.fromfile(f, dtype=dtype, count=count)
    if array.size != count:
        # Only reachable if the file shrank after the size check.
        raise FormatError(f"{path}: {field}: expected {count} values, read only {array.size} (file truncated?)")
    return array.astype(dtype.newbyteorder("="), copy=False)


# ----------------------------------------------------------------------------
# atomic writing


@contextlib.contextmanager
def atomic_open(path) -> Iterator[BinaryIO]:
    """A binary file that appears at `path` only when the `with` block ends without an exception.

    Writes go to a hidden temp file in the same directory (so the final rename stays on one file
    system and is atomic); on success it is flushed, fsynced and renamed over `path`. On an
    exception the temp file is removed and whatever was at `path` before is left untouched.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    base = os.path.basename(path)
    tmp_path = os.path.join(directory, f".{base}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    # O_EXCL: never clobber someone else's temp file; mode 0o666 lets the umask decide permissions,
    # as a plain open() would (mkstemp would force 0o600 onto the final file).
    try:
        fd = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    except OSError as error:
        raise OSError(error.errno, error.strerror, path) from None
    with contextlib.suppress(OSError):  # a replaced file keeps its permissions
        os.chmod(fd, stat.S_IMODE(os.stat(path).st_mode))
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException as error:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_path)
        if isinstance(error, OSError) and error.filename is None:  # a failed write names no file: name ours
            raise OSError(error.errno, error.strerror, path) from None
        raise
    _fsync_directory(directory)


_TEMPORARY = re.compile(r"^\..+\.(\d+)\.[0-9a-f]{8}\.tmp$")


def remove_stale_temporaries(directory) -> list[str]:
    """Remove the temp files that atomic writes of processes no longer running left in `directory`."""
    removed = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    for name in names:
        match = _TEMPORARY.match(name)
        if match is None or _process_alive(int(match.group(1))):
            continue
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(directory, name))
            removed.append(name)
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync_directory(directory: str) -> None:
    # Makes the rename itself durable; not every platform lets a directory be opened or fsynced.
    try:
        dir_fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def atomic_write_bytes(path, chunks: bytes | bytearray | memoryview | np.ndarray | Iterable) -> None:
    """Atomically write one bytes-like object or array, or an iterable of them, to `path`."""
    if isinstance(chunks, (bytes, bytearray, memoryview, np.ndarray)):
        chunks = (chunks,)
    with atomic_open(path) as f:
        for chunk in chunks:
            if isinstance(chunk, np.ndarray):
                chunk = np.ascontiguousarray(chunk).data.cast("B")
            f.write(chunk)


def _header(values: list[int], dtype: np.dtype) -> np.ndarray:
    header = np.zeros(HEADER_INTS, dtype=dtype)
    header[: len(values)] = values
    return header


# ----------------------------------------------------------------------------
# bfloat16


def float32_to_bfloat16_bits(values: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) of float32 values, rounded to nearest, ties to even."""
    values = np.ascontiguousarray(values, dtype=np.float32)
    bits = values.view(np.uint32)
    # Adding 0x7FFF plus the lowest kept bit carries into the kept half exactly when the dropped
    # half is above one half, or equal to it with an odd kept half. uint32 wraparound only hits
    # negative NaNs, which are replaced below.
    # In-place steps keep the peak memory at one extra uint32 array (GPT-2 124M: 0.5 GB, not 2 GB).
    rounded = bits >> 16
    rounded &= 1
    rounded += 0x7FFF
    rounded += bits
    rounded >>= 16
    nan = np.isnan(values)
    if nan.any():
        # Rounding could carry a NaN payload into the exponent and make it infinity; keep it a NaN.
        rounded = np.where(nan, (bits >> 16) | 0x0040, rounded)
    return rounded.astype(np.uint16)


def bfloat16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """float32 values of bfloat16 bit patterns (exact: bfloat16 is the top half of a float32)."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


# ----------------------------------------------------------------------------
# model checkpoint

_MODEL_FIELDS = ("max_seq_len", "vocab_size", "num_layers", "num_heads", "channels", "padded_vocab_size")


def _config_from_model_header(path, header: np.ndarray) -> GPT2Config:
    fields = {name: _check_positive(path, name, header[2 + i]) for i, name in enumerate(_MODEL_FIELDS)}
    if fields["padded_vocab_size"] < fields["vocab_size"]:
        raise FormatError(
            f"{path}: header padded_vocab_size: expected >= vocab_size ({fields['vocab_size']}), "
            f"found {fields['padded_vocab_size']}"
        )
    if fields["channels"] % fields["num_heads"] != 0:
        raise FormatError(
            f"{path}: header channels: expected a multiple of num_heads ({fields['num_heads']}), "
            f"found {fields['channels']}"
        )
    return GPT2Config(**fields)


def is_model_file(path) -> bool:
    """Whether `path` starts like an llm.c model file (its magic), for refusing to overwrite anything else."""
    try:
        with open(path, "rb") as f:
            return np.frombuffer(f.read(4).ljust(4, b"\0"), dtype=I32)[0] == MODEL_MAGIC
    except OSError:
        return False


def read_model(path) -> tuple[GPT2Config, np.ndarray]:
    """Read an llm.c model file: (config, flat float32 parameters in llm.c's order).

    Layout: int32 header [20240326, version, maxT, V, L, NH, C, Vp, 0...], then the parameters,
    float32 (version 3) or bfloat16 (version 5); bfloat16 is widened to float32 exactly.
    """
    with _open_for_read(path) as (f, size):
        header = _read_header(f, path, size, MODEL_MAGIC, I32, "llm.c model file")
        version = int(header[1])
        if version not in MODEL_VERSIONS:
            raise FormatError(
                f"{path}: header version: expected {MODEL_VERSION_FP32} (float32) or {MODEL_VERSION_BF16} "
                f"(bfloat16), found {version}"
                + (" (versions before 3 predate the padded vocabulary; re-export the model)" if version < 3 else "")
            )
        config = _config_from_model_header(path, header)
        num_parameters = config.num_parameters()
        item_bytes = 4 if version == MODEL_VERSION_FP32 else 2
        _check_file_size(
            path, size, HEADER_BYTES + item_bytes * num_parameters,
            f"{HEADER_BYTES} + {item_bytes}*{num_parameters}",
            f"header says {num_parameters} {MODEL_VERSIONS[version]} parameters",
        )
        if version == MODEL_VERSION_FP32:
            params = _read_array(f, path, F32, num_parameters, "parameters")
        else:
            params = bfloat16_bits_to_float32(_read_array(f, path, U16, num_parameters, "parameters"))
    return config, params


def load_model(path) -> tuple[GPT2Config, np.ndarray]:
    """read_model for weights that will be used: NaN or Inf anywhere is refused, naming the tensor."""
    config, params = read_model(path)
    check_finite(path, "the parameters", params, config)
    return config, params


def write_model(path, config: GPT2Config, params_flat: np.ndarray, dtype: str = "float32") -> None:
    """Atomically write an llm.c model file: version 3 for dtype "float32", 5 for "bfloat16".

    bfloat16 values are rounded to nearest, ties to even (as torch's .to(torch.bfloat16) does).
    """
    versions = {name: version for version, name in MODEL_VERSIONS.items()}
    if dtype not in versions:
        raise ValueError(f"write_model: dtype must be one of {', '.join(versions)}, got {dtype!r}")
    params = np.asarray(params_flat)
    num_parameters = config.num_parameters()
    if params.ndim != 1 or params.size != num_parameters:
        raise ValueError(
            f"write_model: params_flat must be 1-D with {num_parameters} values for this config, "
            f"got shape {params.shape}"
        )
    fields = [getattr(config, name) for name in _MODEL_FIELDS]
    if max(fields) > INT32_MAX:
        raise ValueError(f"write_model: config fields must fit in int32, got {config}")
    header = _header([MODEL_MAGIC, versions[dtype], *fields], I32)
    if dtype == "float32":
        payload = params.astype(F32, copy=False)
    else:
        payload = float32_to_bfloat16_bits(params.astype(np.float32, copy=False)).astype(U16, copy=False)
    atomic_write_bytes(path, (header, payload))


# ----------------------------------------------------------------------------
# tokenizer


def read_tokenizer(path) -> tuple[list[bytes], int | None]:
    """Read an llm.c tokenizer file: (token byte strings, eot token id, or None for version 1).

    Layout: uint32 header [20240328, version, V, eot (version 2 only), 0...], then per token
    a uint8 length (> 0) followed by that many bytes.
    """
    with _open_for_read(path) as (f, size):
        header = _read_header(f, path, size, TOKENIZER_MAGIC, U32, "llm.c tokenizer file")
        version = int(header[1])
        if version not in TOKENIZER_VERSIONS:
            raise FormatError(f"{path}: header version: expected 1 or 2, found {version}")
        vocab_size = _check_positive(path, "vocab_size", header[2])
        eot_token = None
        if version == 2:
            eot_token = int(header[3])
            if eot_token >= vocab_size:
                raise FormatError(
                    f"{path}: header eot_token: expected a token id below vocab_size ({vocab_size}), found {eot_token}"
                )
        # The payload is small (about 0.5 MB for GPT-2), so parse it from memory.
        payload = f.read()
    tokens: list[bytes] = []
    pos = 0
    for index in range(vocab_size):
        if pos >= len(payload):
            raise FormatError(
                f"{path}: token {index} length: expected a length byte at offset {HEADER_BYTES + pos}, "
                f"found end of file after {index} of {vocab_size} tokens (file truncated?)"
            )
        length = payload[pos]
        if length == 0:
            raise FormatError(
                f"{path}: token {index} length: expected 1..255, found 0 (at offset {HEADER_BYTES + pos})"
            )
        start, end = pos + 1, pos + 1 + length
        if end > len(payload):
            raise FormatError(
                f"{path}: token {index} bytes: expected {length} bytes, found {len(payload) - start} "
                f"before end of file (file truncated?)"
            )
        tokens.append(bytes(payload[start:end]))
        pos = end
    if pos != len(payload):
        raise FormatError(
            f"{path}: file size: expected {HEADER_BYTES + pos} bytes (header says {vocab_size} tokens), "
            f"found {size} bytes ({len(payload) - pos} trailing bytes)"
        )
    return tokens, eot_token


def write_tokenizer(path, tokens: list[bytes], eot_token: int) -> None:
    """Atomically write a version 2 llm.c tokenizer file (layout: see read_tokenizer)."""
    if not tokens:
        raise ValueError("write_tokenizer: need at least one token")
    if not 0 <= eot_token < len(tokens):
        raise ValueError(f"write_tokenizer: eot_token must be in [0, {len(tokens)}), got {eot_token}")
    payload = bytearray()
    for index, token in enumerate(tokens):
        if not isinstance(token, (bytes, bytearray)):
            raise ValueError(f"write_tokenizer: token {index} must be bytes, got {type(token).__name__}")
        # A length byte of 0 is invalid in the format, and 255 is the most one byte can say.
        if not 1 <= len(token) <= 255:
            raise ValueError(f"write_tokenizer: token {index} must be 1..255 bytes long, got {len(token)}")
        payload.append(len(token))
        payload += token
    header = _header([TOKENIZER_MAGIC, 2, len(tokens), eot_token], U32)
    atomic_write_bytes(path, (header, payload))


# ----------------------------------------------------------------------------
# token shard


def _read_shard_header(f: BinaryIO, path, size: int) -> int:
    header = _read_header(f, path, size, SHARD_MAGIC, I32, SHARD_KIND)
    if header[1] != SHARD_VERSION:
        raise FormatError(f"{path}: header version: expected {SHARD_VERSION}, found {header[1]}")
    num_tokens = _check_positive(path, "num_tokens", header[2])
    _check_file_size(
        path, size, HEADER_BYTES + 2 * num_tokens, f"{HEADER_BYTES} + 2*{num_tokens}",
        f"header says {num_tokens} tokens",
    )
    return num_tokens


def read_shard_header(path) -> int:
    """Number of tokens in a token shard, after checking magic, version and the exact file size."""
    with _open_for_read(path) as (f, size):
        return _read_shard_header(f, path, size)


def read_shard(path, mmap: bool = True) -> np.ndarray:
    """The uint16 tokens of a token shard: int32 header [20240520, 1, num_tokens, 0...], then tokens.

    With mmap=True the result is a read-only np.memmap, so large shards cost no memory up front.
    """
    with _open_for_read(path) as (f, size):
        num_tokens = _read_shard_header(f, path, size)
        if not mmap:
            return _read_array(f, path, U16, num_tokens, "tokens")
    return np.memmap(path, dtype=U16, mode="r", offset=HEADER_BYTES, shape=(num_tokens,))


def write_shard(path, tokens) -> None:
    """Atomically write a version 1 token shard of uint16 tokens (layout: see read_shard)."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise ValueError(f"write_shard: tokens must be 1-D, got shape {tokens.shape}")
    if tokens.size == 0:
        raise ValueError("write_shard: need at least one token")
    if tokens.size > INT32_MAX:
        raise ValueError(f"write_shard: at most {INT32_MAX} tokens fit in a shard header, got {tokens.size}")
    if not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"write_shard: tokens must be integers, got dtype {tokens.dtype}")
    low, high = int(tokens.min()), int(tokens.max())
    if low < 0 or high > UINT16_MAX:
        raise ValueError(f"write_shard: tokens must be in [0, {UINT16_MAX}], found range [{low}, {high}]")
    header = _header([SHARD_MAGIC, SHARD_VERSION, tokens.size], I32)
    atomic_write_bytes(path, (header, tokens.astype(U16)))


# ----------------------------------------------------------------------------
# debug state


@dataclass
class DebugState:
    """Reference inputs and results of one forward/backward pass, from llm.c's train_gpt2.py."""

    B: int
    T: int
    inputs: np.ndarray  # (B, T) int32
    targets: np.ndarray  # (B, T) int32
    logits: np.ndarray  # (B, T, V) float32, V = unpadded vocab size
    loss: float
    grads: np.ndarray  # (num_parameters,) float32, padded layout as in the model file


def _check_token_ids(path, field: str, ids: np.ndarray, vocab_size: int) -> None:
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= vocab_size:
        raise FormatError(
            f"{path}: {field}: expected token ids in [0, {vocab_size}), found range [{low}, {high}] "
            f"(wrong model config?)"
        )


def read_debug_state(path, config: GPT2Config) -> DebugState:
    """Read an llm.c debug state for the model `config` (the file does not record the model).

    Layout: int32 header [20240327, 2, B, T, 0...], then x (B*T int32), y (B*T int32),
    logits (B*T*V float32), loss (float32), grads (num_parameters float32).
    """
    with _open_for_read(path) as (f, size):
        header = _read_header(f, path, size, DEBUG_STATE_MAGIC, I32, "llm.c debug state file")
        if header[1] != DEBUG_STATE_VERSION:
            raise FormatError(
                f"{path}: header version: expected {DEBUG_STATE_VERSION}, found {header[1]}"
                + (" (version 1 predates the padded vocabulary)" if header[1] == 1 else "")
            )
        B = _check_positive(path, "B", header[2])
        T = _check_positive(path, "T", header[3])
        if T > config.max_seq_len:
            raise FormatError(f"{path}: header T: expected at most max_seq_len ({config.max_seq_len}), found {T}")
        V, BT, num_parameters = config.vocab_size, B * T, config.num_parameters()
        _check_file_size(
            path, size, HEADER_BYTES + 4 * (2 * BT + BT * V + 1 + num_parameters),
            f"{HEADER_BYTES} + 4*(2*{BT} + {BT}*{V} + 1 + {num_parameters})",
            f"B={B}, T={T} from the header; V={V}, {num_parameters} parameters from the config",
        )
        inputs = _read_array(f, path, I32, BT, "inputs").reshape(B, T)
        targets = _read_array(f, path, I32, BT, "targets").reshape(B, T)
        logits = _read_array(f, path, F32, BT * V, "logits").reshape(B, T, V)
        loss = float(_read_array(f, path, F32, 1, "loss")[0])
        grads = _read_array(f, path, F32, num_parameters, "grads")
    _check_token_ids(path, "inputs", inputs, V)
    _check_token_ids(path, "targets", targets, V)
    return DebugState(B=B, T=T, inputs=inputs, targets=targets, logits=logits, loss=loss, grads=grads)


def write_debug_state(path, config: GPT2Config, inputs, targets, logits, loss: float, grads_flat) -> None:
    """Atomically write an llm.c debug state (layout: see read_debug_state)."""
    inputs, targets = np.asarray(inputs), np.asarray(targets)
    logits, grads = np.asarray(logits), np.asarray(grads_flat)
    if inputs.ndim != 2 or targets.shape != inputs.shape:
        raise ValueError(
            f"write_debug_state: inputs and targets must both be (B, T), got {inputs.shape} and {targets.shape}"
        )
    B, T = inputs.shape
    V = config.vocab_size
    if B == 0 or T == 0 or T > config.max_seq_len or B * T > INT32_MAX:
        raise ValueError(f"write_debug_state: need B >= 1 and 1 <= T <= {config.max_seq_len}, got B={B}, T={T}")
    for name, ids in (("inputs", inputs), ("targets", targets)):
        if not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"write_debug_state: {name} must be integers, got dtype {ids.dtype}")
        if ids.min() < 0 or ids.max() >= V:
            raise ValueError(
                f"write_debug_state: {name} must be token ids in [0, {V}), found [{ids.min()}, {ids.max()}]"
            )
    if logits.shape != (B, T, V):
        padded = logits.shape == (B, T, config.padded_vocab_size)
        hint = " (slice padded logits to [..., :vocab_size])" if padded else ""
        raise ValueError(f"write_debug_state: logits must be (B, T, V) = {(B, T, V)}, got {logits.shape}{hint}")
    num_parameters = config.num_parameters()
    if grads.ndim != 1 or grads.size != num_parameters:
        raise ValueError(
            f"write_debug_state: grads_flat must be 1-D with {num_parameters} values, got shape {grads.shape}"
        )
    loss_array = np.asarray(loss, dtype=F32)
    if loss_array.size != 1:
        raise ValueError(f"write_debug_state: loss must be a single value, got shape {loss_array.shape}")
    header = _header([DEBUG_STATE_MAGIC, DEBUG_STATE_VERSION, B, T], I32)
    atomic_write_bytes(
        path,
        (header, inputs.astype(I32), targets.astype(I32), logits.astype(F32), loss_array.reshape(1), grads.astype(F32)),
    )


# ----------------------------------------------------------------------------
# run state (llmpy's own: what a resumed run needs beside the model checkpoint)


@dataclass
class RunState:
    """Optimizer and data-loader position after `step` optimizer steps; a training checkpoint's state also
    names its run (run_id, identity) and the checksum of the model file written beside it (version 2).

    Sharded checkpoints (data-parallel ranks): each rank's shard is a version 2 state whose m and v hold the
    parameter `ranges` ([start, stop) pairs, in order) it updates; the completion record is a version 3 state
    with no m and v, listing the `shards` (file name, checksum, ranges), written only once they all exist."""

    step: int
    seed: int
    data_epoch: int
    data_shard_position: int
    data_sample_index: int
    m: np.ndarray  # (num_parameters,) float32, AdamW first moment
    v: np.ndarray  # (num_parameters,) float32, AdamW second moment
    run_id: str | None = None
    identity: dict | None = None
    model_sha256: str | None = None
    ranges: list | None = None  # a shard: the parameter ranges its m and v hold
    shards: list | None = None  # a completion record: [{"file", "state_sha256", "ranges"}, ...]
    state_sha256: str | None = None  # as read from the file (version 2 and 3)


def _state_sha256(fields: tuple, m: np.ndarray, v: np.ndarray) -> str:
    """sha256 of a run state's header fields (step, seed, data position) and its moments."""
    digest = hashlib.sha256(np.asarray(fields, dtype=np.int64).tobytes())
    for array in (m, v):
        digest.update(np.ascontiguousarray(array, dtype=F32).data.cast("B"))
    return digest.hexdigest()


def _read_run_state_header(f: BinaryIO, path, size: int, num_parameters: int | None) -> np.ndarray:
    header = _read_header(f, path, size, RUN_STATE_MAGIC, I32, "llmpy run state file")
    if header[1] not in RUN_STATE_VERSIONS:
        raise FormatError(f"{path}: header version: expected one of {RUN_STATE_VERSIONS}, found {header[1]}")
    _check_positive(path, "step", header[2])
    found = int(header[3]) | (int(header[4]) << 31)
    if num_parameters is not None and found != num_parameters:
        raise FormatError(
            f"{path}: header num_parameters: expected {num_parameters} (the model checkpoint's), found {found}"
        )
    for index, field in ((5, "seed"), (6, "data epoch"), (7, "data shard position"), (8, "data sample index"),
                         (9, "trailer bytes")):
        if header[index] < 0:
            raise FormatError(f"{path}: header {field}: expected a non-negative integer, found {header[index]}")
    if header[1] == 1 and header[9] != 0:
        raise FormatError(f"{path}: header trailer bytes: expected 0 in version 1, found {header[9]}")
    trailer = int(header[9])
    if header[1] == 3:  # a sharded checkpoint's completion record: the moments are in its shards
        _check_file_size(path, size, HEADER_BYTES + trailer, f"{HEADER_BYTES} + {trailer}", "the JSON trailer")
        return header
    _check_file_size(path, size, HEADER_BYTES + 8 * found + trailer,
                     f"{HEADER_BYTES} + 2*4*{found}" + (f" + {trailer}" if trailer else ""),
                     f"AdamW m and v for {found} parameters" + (" and the JSON trailer" if trailer else ""))
    return header


def _read_trailer(f: BinaryIO, path, header: np.ndarray) -> dict:
    raw = f.read(int(header[9]))
    try:
        trailer = json.loads(raw.decode("utf-8"))
        if not isinstance(trailer, dict) or not all(isinstance(trailer.get(k), str) for k in
                                                    ("run_id", "model_sha256", "state_sha256")):
            raise ValueError("missing fields")
        if header[1] == 3 and not _valid_shards(trailer.get("shards")):
            raise ValueError("no valid list of shards")
    except (UnicodeDecodeError, ValueError) as err:
        raise FormatError(f"{path}: trailer: expected the run's JSON record, found unreadable bytes ({err})") from None
    return trailer


def read_run_state_owner(path) -> tuple[int, str | None]:
    """(step, run id) of a run state, reading only its header and trailer (run id None: version 1)."""
    with _open_for_read(path) as (f, size):
        header = _read_run_state_header(f, path, size, None)
        if header[1] == 1:
            return int(header[2]), None
        f.seek(HEADER_BYTES + (0 if header[1] == 3 else 8 * (int(header[3]) | (int(header[4]) << 31))))
        return int(header[2]), _read_trailer(f, path, header)["run_id"]


def _valid_shards(shards) -> bool:
    return isinstance(shards, list) and bool(shards) and all(
        isinstance(s, dict) and isinstance(s.get("file"), str) and isinstance(s.get("state_sha256"), str)
        and isinstance(s.get("ranges"), list) and all(isinstance(r, list) and len(r) == 2 and
                                                      all(isinstance(x, int) and x >= 0 for x in r) and r[0] <= r[1]
                                                      for r in s["ranges"]) for s in shards)


def read_run_state(path, num_parameters: int) -> RunState:
    """Read a run state for a model of `num_parameters` parameters (layout: see the module docstring); version 2
    files are checked against their checksum of m and v, and m, v must be finite (v >= 0)."""
    with _open_for_read(path) as (f, size):
        header = _read_run_state_header(f, path, size, num_parameters)
        held = 0 if header[1] == 3 else num_parameters  # version 3: the moments are in the shards it lists
        m = _read_array(f, path, F32, held, "m")
        v = _read_array(f, path, F32, held, "v")
        trailer = _read_trailer(f, path, header) if header[1] >= 2 else {}
    fields = tuple(int(x) for x in header[[2, 5, 6, 7, 8]])
    if trailer and _state_sha256(fields, m, v) != trailer["state_sha256"]:
        raise FormatError(f"{path}: checksum of the step, data position and AdamW m and v: does not match the one "
                          "written (file corrupt)")
    check_finite(path, "AdamW m", m)
    check_finite(path, "AdamW v", v)
    if (v < 0).any():
        raise FormatError(f"{path}: AdamW v holds negative values (first at element {int(np.argmax(v < 0))})")
    return RunState(int(header[2]), int(header[5]), int(header[6]), int(header[7]), int(header[8]), m, v,
                    trailer.get("run_id"), trailer.get("identity"), trailer.get("model_sha256"), trailer.get("ranges"),
                    trailer.get("shards"), trailer.get("state_sha256"))


def write_run_state(path, state: RunState, num_parameters: int | None = None) -> str | None:
    """Atomically write a run state: version 1, or version 2 with its trailer when the state names its run, or
    version 3 when it lists `shards` (then m and v are empty and `num_parameters` is the model's). Returns the
    checksum of its step, data position and moments (None for version 1)."""
    m, v = np.asarray(state.m), np.asarray(state.v)
    if m.ndim != 1 or m.shape != v.shape:
        raise ValueError(f"write_run_state: m and v must be 1-D of one size, got {m.shape} and {v.shape}")
    fields = (state.step, state.seed, state.data_epoch, state.data_shard_position, state.data_sample_index)
    if state.step < 1 or min(fields) < 0 or max(fields) > INT32_MAX:
        raise ValueError(f"write_run_state: step must be >= 1 and every field in [0, 2^31), got {fields}")
    trailer, checksum = b"", None
    if state.run_id is not None:
        checksum = _state_sha256(fields, m, v)
        record = {"run_id": state.run_id, "identity": state.identity, "model_sha256": state.model_sha256,
                  "state_sha256": checksum}
        record.update({k: getattr(state, k) for k in ("ranges", "shards") if getattr(state, k) is not None})
        trailer = json.dumps(record, sort_keys=True).encode()
    sharded = state.shards is not None
    if sharded and (m.size or num_parameters is None or state.run_id is None):
        raise ValueError("write_run_state: a completion record names its run and the model size, and holds no m, v")
    n = num_parameters if sharded else m.size
    header = _header([RUN_STATE_MAGIC, 3 if sharded else 2 if trailer else 1, state.step, n & INT32_MAX, n >> 31,
                      state.seed, state.data_epoch, state.data_shard_position, state.data_sample_index, len(trailer)],
                     I32)
    atomic_write_bytes(path, (header, m.astype(F32, copy=False), v.astype(F32, copy=False), trailer))
    return checksum
