"""llm.c file formats: round trips, byte layouts checked by hand, and one test per kind of bad file."""

from __future__ import annotations

import os
import struct

import numpy as np
import pytest

from llmpy.core.config import GPT2Config
from llmpy.io.formats import (
    DebugState,
    FormatError,
    atomic_open,
    atomic_write_bytes,
    read_debug_state,
    read_model,
    read_shard,
    read_shard_header,
    read_tokenizer,
    write_debug_state,
    write_model,
    write_shard,
    write_tokenizer,
)

CONFIG = GPT2Config(max_seq_len=16, vocab_size=100, padded_vocab_size=128, num_layers=2, num_heads=2, channels=8)


def num_params_by_hand(maxT, V, Vp, L, C):
    """Parameter count written out from llm.c's tensor list, independent of layout.py."""
    per_layer = (C + C) + (3 * C * C + 3 * C) + (C * C + C) + (C + C) + (4 * C * C + 4 * C) + (4 * C * C + C)
    return Vp * C + maxT * C + L * per_layer + C + C


NUM_PARAMS = num_params_by_hand(16, 100, 128, 2, 8)


def random_params(seed=0):
    return np.random.default_rng(seed).standard_normal(NUM_PARAMS).astype(np.float32)


def header_bytes(fmt, *values):
    """A 1024-byte header: `values` packed with struct format char `fmt`, rest zero."""
    return struct.pack(f"<{len(values)}{fmt}", *values).ljust(1024, b"\0")


def bf16_round_by_hand(x: np.ndarray) -> np.ndarray:
    """Round float32 to the nearest bfloat16 (ties to even) by comparing the two neighbours in float64."""
    x = np.asarray(x, dtype=np.float32)
    bits = x.view(np.uint32).astype(np.uint64)
    down_bits = bits & 0xFFFF0000  # truncation: the neighbour nearer zero
    up_bits = down_bits + 0x10000  # the neighbour farther from zero
    down = down_bits.astype(np.uint32).view(np.float32).astype(np.float64)
    up = up_bits.astype(np.uint32).view(np.float32).astype(np.float64)
    exact = x.astype(np.float64)
    dist_down, dist_up = np.abs(exact - down), np.abs(up - exact)
    down_is_even = ((down_bits >> 16) & 1) == 0
    take_down = (dist_down < dist_up) | ((dist_down == dist_up) & down_is_even)
    return np.where(take_down, down, up).astype(np.float32)


def assert_format_error(read, path, *fragments):
    with pytest.raises(FormatError) as info:
        read(path)
    message = str(info.value)
    assert str(path) in message, message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


# ----------------------------------------------------------------------------
# model


def test_num_parameters_matches_hand_count():
    assert CONFIG.num_parameters() == NUM_PARAMS


def test_model_fp32_round_trip_and_layout(tmp_path):
    path = tmp_path / "model.bin"
    params = random_params()
    write_model(path, CONFIG, params)

    raw = path.read_bytes()
    assert len(raw) == 1024 + 4 * NUM_PARAMS
    assert struct.unpack_from("<8i", raw, 0) == (20240326, 3, 16, 100, 2, 2, 8, 128)
    assert raw[32:1024] == bytes(1024 - 32)
    assert raw[1024:] == params.astype("<f4").tobytes()

    config, loaded = read_model(path)
    assert config == CONFIG
    assert loaded.dtype == np.float32 and loaded.shape == (NUM_PARAMS,)
    np.testing.assert_array_equal(loaded, params)


def test_model_bf16_round_trip_and_layout(tmp_path):
    path = tmp_path / "model_bf16.bin"
    params = random_params(1) * np.float32(3.0)
    # Exact halfway cases, both parities, and values spanning many exponents.
    params[:6] = [1.0 + 2.0**-8, 1.0 + 3 * 2.0**-8, -(1.0 + 2.0**-8), 0.0, -0.0, 1e-30]
    params[6:1006] *= np.logspace(-20, 20, 1000, dtype=np.float32)
    write_model(path, CONFIG, params, dtype="bfloat16")

    raw = path.read_bytes()
    assert len(raw) == 1024 + 2 * NUM_PARAMS
    assert struct.unpack_from("<8i", raw, 0) == (20240326, 5, 16, 100, 2, 2, 8, 128)
    expected = bf16_round_by_hand(params)
    expected_bits = (expected.view(np.uint32) >> 16).astype("<u2")
    assert raw[1024:] == expected_bits.tobytes()

    config, loaded = read_model(path)
    assert config == CONFIG
    assert loaded.dtype == np.float32
    np.testing.assert_array_equal(loaded, expected)
    # Known answers: ties go to the even neighbour.
    assert loaded[0] == 1.0
    assert loaded[1] == 1.0 + 2.0**-6
    assert loaded[2] == -1.0


def test_bf16_special_values(tmp_path):
    path = tmp_path / "model_bf16.bin"
    params = np.zeros(NUM_PARAMS, dtype=np.float32)
    largest = np.finfo(np.float32).max
    params[:5] = [np.inf, -np.inf, np.nan, largest, -largest]
    params[5] = np.uint32(0x7F800001).view(np.float32)  # NaN whose payload sits in the dropped bits
    write_model(path, CONFIG, params, dtype="bfloat16")
    _, loaded = read_model(path)
    assert loaded[0] == np.inf and loaded[1] == -np.inf
    assert np.isnan(loaded[2]) and np.isnan(loaded[5])
    # float32 max lies above bfloat16's largest finite value plus half an ulp: rounds to infinity.
    assert loaded[3] == np.inf and loaded[4] == -np.inf


def test_model_bf16_matches_torch(tmp_path):
    torch = pytest.importorskip("torch")
    path = tmp_path / "model_bf16.bin"
    params = random_params(2) * np.float32(100.0)
    write_model(path, CONFIG, params, dtype="bfloat16")
    _, loaded = read_model(path)
    reference = torch.from_numpy(params).to(torch.bfloat16).to(torch.float32).numpy()
    np.testing.assert_array_equal(loaded, reference)


def test_write_model_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="dtype"):
        write_model(tmp_path / "m.bin", CONFIG, random_params(), dtype="float16")
    with pytest.raises(ValueError, match=str(NUM_PARAMS)):
        write_model(tmp_path / "m.bin", CONFIG, random_params()[:-1])
    assert not os.listdir(tmp_path)


def model_file_with_header(tmp_path, **patch):
    """A valid fp32 model file, then header ints overwritten: patch maps header index -> value."""
    path = tmp_path / "model.bin"
    write_model(path, CONFIG, random_params())
    raw = bytearray(path.read_bytes())
    for index, value in patch.items():
        struct.pack_into("<i", raw, 4 * int(index[1:]), value)
    path.write_bytes(bytes(raw))
    return path


def test_model_wrong_magic(tmp_path):
    path = model_file_with_header(tmp_path, h0=12345)
    message = assert_format_error(read_model, path, "header magic", "expected 20240326", "found 12345")
    assert message == f"{path}: header magic: expected 20240326 (llm.c model file), found 12345"


@pytest.mark.parametrize("version", [1, 2, 4, 6])
def test_model_unsupported_version(tmp_path, version):
    path = model_file_with_header(tmp_path, h1=version)
    assert_format_error(read_model, path, "header version", "3 (float32)", "5 (bfloat16)", f"found {version}")


def test_model_truncated_payload(tmp_path):
    path = tmp_path / "model.bin"
    write_model(path, CONFIG, random_params())
    with open(path, "r+b") as f:
        f.truncate(1024 + 4 * NUM_PARAMS - 3)
    expected_size = 1024 + 4 * NUM_PARAMS
    assert_format_error(
        read_model, path, "file size", f"expected 1024 + 4*{NUM_PARAMS} = {expected_size} bytes",
        f"found {expected_size - 3} bytes", "truncated",
    )


def test_model_bf16_truncated_payload(tmp_path):
    path = tmp_path / "model.bin"
    write_model(path, CONFIG, random_params(), dtype="bfloat16")
    with open(path, "r+b") as f:
        f.truncate(2000)
    assert_format_error(read_model, path, "file size", f"1024 + 2*{NUM_PARAMS}", "found 2000 bytes", "truncated")


def test_model_trailing_bytes(tmp_path):
    path = tmp_path / "model.bin"
    write_model(path, CONFIG, random_params())
    with open(path, "ab") as f:
        f.write(b"\0" * 8)
    assert_format_error(read_model, path, "file size", "8 trailing bytes")


@pytest.mark.parametrize(
    "patch, fragments",
    [
        ({"h6": 9}, ("header channels", "multiple of num_heads (2)", "found 9")),
        ({"h7": 64}, ("header padded_vocab_size", ">= vocab_size (100)", "found 64")),
        ({"h4": 0}, ("header num_layers", "positive", "found 0")),
        ({"h5": -2}, ("header num_heads", "positive", "found -2")),
        ({"h2": 0}, ("header max_seq_len", "positive", "found 0")),
        ({"h3": -1}, ("header vocab_size", "positive", "found -1")),
    ],
)
def test_model_bad_header_field(tmp_path, patch, fragments):
    path = model_file_with_header(tmp_path, **patch)
    assert_format_error(read_model, path, *fragments)


def test_model_header_mismatching_payload_is_a_size_error(tmp_path):
    # A plausible but wrong config (3 layers) must not be read as if it were right.
    path = model_file_with_header(tmp_path, h4=3)
    assert_format_error(read_model, path, "file size", "truncated")


# ----------------------------------------------------------------------------
# errors common to every reader

READERS = {
    "model": read_model,
    "tokenizer": read_tokenizer,
    "shard": read_shard,
    "shard_header": read_shard_header,
    "debug_state": lambda path: read_debug_state(path, CONFIG),
}


@pytest.mark.parametrize("reader", READERS.values(), ids=READERS.keys())
def test_missing_file(tmp_path, reader):
    path = tmp_path / "does_not_exist.bin"
    assert_format_error(reader, path, "file not found")


@pytest.mark.parametrize("reader", READERS.values(), ids=READERS.keys())
def test_directory_instead_of_file(tmp_path, reader):
    assert_format_error(reader, tmp_path, "cannot open")


@pytest.mark.parametrize("reader", READERS.values(), ids=READERS.keys())
@pytest.mark.parametrize("size", [0, 12, 1023])
def test_header_shorter_than_1024_bytes(tmp_path, reader, size):
    path = tmp_path / "short.bin"
    path.write_bytes(struct.pack("<3i", 20240326, 3, 16)[:size].ljust(size, b"\0"))
    assert_format_error(reader, path, "file size", "at least 1024 bytes", f"found {size} bytes")


@pytest.mark.parametrize(
    "reader, magic",
    [(read_model, 20240326), (read_tokenizer, 20240328), (read_shard, 20240520),
     (lambda path: read_debug_state(path, CONFIG), 20240327)],
    ids=["model", "tokenizer", "shard", "debug_state"],
)
def test_every_reader_checks_magic(tmp_path, reader, magic):
    path = tmp_path / "other.bin"
    path.write_bytes(header_bytes("i", 777, 1, 1) + b"\0" * 64)
    assert_format_error(reader, path, "header magic", f"expected {magic}", "found 777")


# ----------------------------------------------------------------------------
# tokenizer

TOKENS = [b"a", b"bc", b"\xff\x00\xfe", b" the", bytes(range(1, 256)), b"<|endoftext|>"]


def test_tokenizer_v2_round_trip_and_layout(tmp_path):
    path = tmp_path / "tok.bin"
    write_tokenizer(path, TOKENS, eot_token=5)

    expected = header_bytes("I", 20240328, 2, len(TOKENS), 5)
    for token in TOKENS:
        expected += bytes([len(token)]) + token
    assert path.read_bytes() == expected

    tokens, eot = read_tokenizer(path)
    assert tokens == TOKENS
    assert eot == 5


def test_tokenizer_v1_read(tmp_path):
    path = tmp_path / "tok_v1.bin"
    raw = header_bytes("I", 20240328, 1, 3) + b"\x01x" + b"\x02yz" + b"\x03abc"
    path.write_bytes(raw)
    tokens, eot = read_tokenizer(path)
    assert tokens == [b"x", b"yz", b"abc"]
    assert eot is None


def test_tokenizer_zero_length_token(tmp_path):
    path = tmp_path / "tok.bin"
    path.write_bytes(header_bytes("I", 20240328, 2, 3, 0) + b"\x01x" + b"\x00" + b"\x01z")
    assert_format_error(read_tokenizer, path, "token 1 length", "found 0")


def test_tokenizer_truncated_names_token(tmp_path):
    path = tmp_path / "tok.bin"
    write_tokenizer(path, TOKENS, eot_token=5)
    raw = path.read_bytes()
    # Cut inside token 4 (the 255-byte one), then exactly before token 5's length byte.
    start_of_4 = 1024 + sum(1 + len(t) for t in TOKENS[:4])
    path.write_bytes(raw[: start_of_4 + 10])
    assert_format_error(read_tokenizer, path, "token 4 bytes", "expected 255 bytes", "found 9", "truncated")
    path.write_bytes(raw[: start_of_4 + 256])
    assert_format_error(read_tokenizer, path, "token 5 length", "after 5 of 6 tokens", "truncated")


def test_tokenizer_trailing_bytes(tmp_path):
    path = tmp_path / "tok.bin"
    write_tokenizer(path, TOKENS, eot_token=5)
    with open(path, "ab") as f:
        f.write(b"\x01q")
    assert_format_error(read_tokenizer, path, "file size", "2 trailing bytes")


@pytest.mark.parametrize("version", [0, 3])
def test_tokenizer_wrong_version(tmp_path, version):
    path = tmp_path / "tok.bin"
    path.write_bytes(header_bytes("I", 20240328, version, 1, 0) + b"\x01a")
    assert_format_error(read_tokenizer, path, "header version", "expected 1 or 2", f"found {version}")


def test_tokenizer_bad_header_fields(tmp_path):
    path = tmp_path / "tok.bin"
    path.write_bytes(header_bytes("I", 20240328, 2, 1, 1) + b"\x01a")
    assert_format_error(read_tokenizer, path, "header eot_token", "below vocab_size (1)", "found 1")
    path.write_bytes(header_bytes("I", 20240328, 2, 0, 0))
    assert_format_error(read_tokenizer, path, "header vocab_size", "found 0")


def test_write_tokenizer_rejects_bad_tokens(tmp_path):
    path = tmp_path / "tok.bin"
    with pytest.raises(ValueError, match="token 1 must be 1..255 bytes long, got 0"):
        write_tokenizer(path, [b"a", b"", b"c"], eot_token=0)
    with pytest.raises(ValueError, match="token 0 must be 1..255 bytes long, got 256"):
        write_tokenizer(path, [b"x" * 256], eot_token=0)
    with pytest.raises(ValueError, match="eot_token"):
        write_tokenizer(path, [b"a"], eot_token=1)
    assert not path.exists()


# ----------------------------------------------------------------------------
# token shard


@pytest.mark.parametrize("mmap", [True, False])
def test_shard_round_trip_and_layout(tmp_path, mmap):
    path = tmp_path / "shard.bin"
    tokens = np.array([0, 1, 50256, 65535, 7, 300], dtype=np.int64)
    write_shard(path, tokens)

    assert path.read_bytes() == header_bytes("i", 20240520, 1, 6) + struct.pack("<6H", *tokens.tolist())
    assert read_shard_header(path) == 6
    loaded = read_shard(path, mmap=mmap)
    assert loaded.dtype == np.uint16 and loaded.shape == (6,)
    np.testing.assert_array_equal(loaded, tokens)
    if mmap:
        assert isinstance(loaded, np.memmap)


def test_shard_size_mismatch(tmp_path):
    path = tmp_path / "shard.bin"
    path.write_bytes(header_bytes("i", 20240520, 1, 1000) + b"\0" * 976)
    message = assert_format_error(read_shard, path, "file size")
    assert message == (
        f"{path}: file size: expected 1024 + 2*1000 = 3024 bytes (header says 1000 tokens), "
        f"found 2000 bytes (file truncated?)"
    )
    assert_format_error(read_shard_header, path, "file size", "3024")
    path.write_bytes(header_bytes("i", 20240520, 1, 2) + b"\0" * 6)
    assert_format_error(read_shard, path, "file size", "expected 1024 + 2*2 = 1028 bytes", "2 trailing bytes")


def test_shard_wrong_version(tmp_path):
    path = tmp_path / "shard.bin"
    path.write_bytes(header_bytes("i", 20240520, 2, 1) + b"\0\0")
    assert_format_error(read_shard, path, "header version", "expected 1", "found 2")


def test_shard_bad_token_count(tmp_path):
    path = tmp_path / "shard.bin"
    path.write_bytes(header_bytes("i", 20240520, 1, -5))
    assert_format_error(read_shard, path, "header num_tokens", "positive", "found -5")


def test_shard_llama3_magic_is_explained(tmp_path):
    path = tmp_path / "shard.bin"
    path.write_bytes(header_bytes("i", 20240801, 7, 1) + b"\0" * 4)
    assert_format_error(read_shard, path, "header magic", "found 20240801", "LLaMA-3")


def test_write_shard_rejects_bad_tokens(tmp_path):
    path = tmp_path / "shard.bin"
    with pytest.raises(ValueError, match=r"found range \[1, 65536\]"):
        write_shard(path, [1, 65536])
    with pytest.raises(ValueError, match=r"\[-1, 2\]"):
        write_shard(path, [-1, 2])
    with pytest.raises(ValueError, match="integers"):
        write_shard(path, np.array([1.0, 2.0]))
    with pytest.raises(ValueError, match="at least one"):
        write_shard(path, np.array([], dtype=np.int32))
    assert not path.exists()


# ----------------------------------------------------------------------------
# debug state

B, T = 2, 3


def debug_arrays(seed=0):
    rng = np.random.default_rng(seed)
    inputs = rng.integers(0, 100, size=(B, T), dtype=np.int64)
    targets = rng.integers(0, 100, size=(B, T), dtype=np.int64)
    logits = rng.standard_normal((B, T, 100)).astype(np.float32)
    grads = rng.standard_normal(NUM_PARAMS).astype(np.float32)
    return inputs, targets, logits, np.float32(4.625), grads


def test_debug_state_round_trip_and_layout(tmp_path):
    path = tmp_path / "state.bin"
    inputs, targets, logits, loss, grads = debug_arrays()
    write_debug_state(path, CONFIG, inputs, targets, logits, loss, grads)

    expected = (
        header_bytes("i", 20240327, 2, B, T)
        + struct.pack(f"<{B * T}i", *inputs.ravel().tolist())
        + struct.pack(f"<{B * T}i", *targets.ravel().tolist())
        + logits.astype("<f4").tobytes()
        + struct.pack("<f", 4.625)
        + grads.astype("<f4").tobytes()
    )
    assert path.read_bytes() == expected

    state = read_debug_state(path, CONFIG)
    assert isinstance(state, DebugState)
    assert (state.B, state.T) == (B, T)
    assert state.inputs.dtype == np.int32 and state.targets.dtype == np.int32
    np.testing.assert_array_equal(state.inputs, inputs)
    np.testing.assert_array_equal(state.targets, targets)
    assert state.logits.dtype == np.float32 and state.logits.shape == (B, T, 100)
    np.testing.assert_array_equal(state.logits, logits)
    assert state.loss == 4.625
    assert state.grads.dtype == np.float32 and state.grads.shape == (NUM_PARAMS,)
    np.testing.assert_array_equal(state.grads, grads)


def test_debug_state_size_mismatch(tmp_path):
    path = tmp_path / "state.bin"
    write_debug_state(path, CONFIG, *debug_arrays())
    expected_size = 1024 + 4 * (2 * 6 + 6 * 100 + 1 + NUM_PARAMS)
    assert path.stat().st_size == expected_size
    with open(path, "r+b") as f:
        f.truncate(expected_size - 4)
    assert_format_error(
        lambda p: read_debug_state(p, CONFIG), path, "file size",
        f"1024 + 4*(2*6 + 6*100 + 1 + {NUM_PARAMS}) = {expected_size} bytes", "truncated",
    )
    # The same file read with the wrong model config is caught by the size check too.
    write_debug_state(path, CONFIG, *debug_arrays())
    assert_format_error(lambda p: read_debug_state(p, CONFIG.with_vocab(120)), path, "file size")


def test_debug_state_bad_header(tmp_path):
    path = tmp_path / "state.bin"
    read = lambda p: read_debug_state(p, CONFIG)  # noqa: E731
    path.write_bytes(header_bytes("i", 20240327, 1, B, T))
    assert_format_error(read, path, "header version", "expected 2", "found 1")
    path.write_bytes(header_bytes("i", 20240327, 2, 0, T))
    assert_format_error(read, path, "header B", "positive", "found 0")
    path.write_bytes(header_bytes("i", 20240327, 2, 1, 17))
    assert_format_error(read, path, "header T", "at most max_seq_len (16)", "found 17")


def test_debug_state_token_ids_out_of_range(tmp_path):
    path = tmp_path / "state.bin"
    write_debug_state(path, CONFIG, *debug_arrays())
    raw = bytearray(path.read_bytes())
    struct.pack_into("<i", raw, 1024 + 4 * B * T, 100)  # first target
    path.write_bytes(bytes(raw))
    assert_format_error(lambda p: read_debug_state(p, CONFIG), path, "targets", "[0, 100)")


def test_write_debug_state_rejects_padded_logits(tmp_path):
    inputs, targets, logits, loss, grads = debug_arrays()
    padded = np.zeros((B, T, 128), dtype=np.float32)
    with pytest.raises(ValueError, match="slice padded logits"):
        write_debug_state(tmp_path / "s.bin", CONFIG, inputs, targets, padded, loss, grads)
    with pytest.raises(ValueError, match="grads_flat"):
        write_debug_state(tmp_path / "s.bin", CONFIG, inputs, targets, logits, loss, grads[:-1])
    assert not os.listdir(tmp_path)


# ----------------------------------------------------------------------------
# atomic writes


def test_write_model_leaves_no_temp_files(tmp_path):
    write_model(tmp_path / "model.bin", CONFIG, random_params())
    write_model(tmp_path / "model.bin", CONFIG, random_params(1), dtype="bfloat16")  # overwrite
    assert os.listdir(tmp_path) == ["model.bin"]
    assert read_model(tmp_path / "model.bin")[0] == CONFIG


def test_failed_write_model_leaves_existing_file_untouched(tmp_path):
    path = tmp_path / "model.bin"
    write_model(path, CONFIG, random_params())
    before = path.read_bytes()
    with pytest.raises(ValueError):
        write_model(path, CONFIG, np.zeros(NUM_PARAMS + 1, dtype=np.float32))
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["model.bin"]


def test_exception_midway_through_atomic_open_keeps_old_file(tmp_path):
    path = tmp_path / "data.bin"
    path.write_bytes(b"old contents")
    with pytest.raises(RuntimeError, match="disk on fire"):
        with atomic_open(path) as f:
            f.write(b"new partial contents")
            raise RuntimeError("disk on fire")
    assert path.read_bytes() == b"old contents"
    assert os.listdir(tmp_path) == ["data.bin"]


def test_atomic_write_bytes_accepts_bytes_arrays_and_chunks(tmp_path):
    path = tmp_path / "out.bin"
    atomic_write_bytes(path, b"abc")
    assert path.read_bytes() == b"abc"
    atomic_write_bytes(path, [b"x", bytearray(b"y"), np.array([1, 2], dtype="<u2"), np.arange(3, dtype="<i4")[::2]])
    assert path.read_bytes() == b"xy" + struct.pack("<2H", 1, 2) + struct.pack("<2i", 0, 2)
    assert os.listdir(tmp_path) == ["out.bin"]


def test_atomic_write_respects_umask_permissions(tmp_path):
    path = tmp_path / "out.bin"
    old_umask = os.umask(0o022)
    try:
        atomic_write_bytes(path, b"abc")
    finally:
        os.umask(old_umask)
    assert path.stat().st_mode & 0o777 == 0o644


# ----------------------------------------------------------------------------
# run state


def _run_state(n=10, step=7):
    from llmpy.io.formats import RunState

    rng = np.random.default_rng(3)
    return RunState(step=step, seed=42, data_epoch=1, data_shard_position=0, data_sample_index=5,
                    m=rng.standard_normal(n).astype(np.float32), v=rng.random(n).astype(np.float32))


def test_run_state_round_trip_and_layout(tmp_path):
    from llmpy.io.formats import read_run_state, write_run_state

    state = _run_state()
    path = tmp_path / "state.bin"
    write_run_state(path, state)
    raw = path.read_bytes()
    assert len(raw) == 1024 + 2 * 4 * 10
    assert struct.unpack("<9i", raw[:36]) == (20241122, 1, 7, 10, 0, 42, 1, 0, 5)
    back = read_run_state(path, 10)
    assert (back.step, back.seed, back.data_epoch, back.data_shard_position, back.data_sample_index) == (7, 42, 1, 0, 5)
    np.testing.assert_array_equal(back.m, state.m)
    np.testing.assert_array_equal(back.v, state.v)


def test_run_state_bad_files(tmp_path):
    from llmpy.io.formats import read_run_state, write_run_state

    path = tmp_path / "state.bin"
    write_run_state(path, _run_state())
    with pytest.raises(FormatError, match=r"state\.bin: header num_parameters: expected 11"):
        read_run_state(path, 11)
    path.write_bytes(path.read_bytes()[:-4])
    with pytest.raises(FormatError, match=r"state\.bin: file size: .*truncated"):
        read_run_state(path, 10)
    raw = bytearray((tmp_path / "state.bin").read_bytes())
    raw[0:4] = struct.pack("<i", 20240326)
    path.write_bytes(bytes(raw))
    with pytest.raises(FormatError, match=r"state\.bin: header magic: expected 20241122"):
        read_run_state(path, 10)
