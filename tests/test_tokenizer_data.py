"""Tokenizer (offline GPT-2, llm.c tokenizer files), dataset preparation and the DataLoader."""

from __future__ import annotations

import numpy as np
import pytest

import llmpy.data.prepare as data
from llmpy.core.config import GPT2_EOT_TOKEN, GPT2_VOCAB_SIZE
from llmpy.data.loader import DataError, DataLoader
from llmpy.data.prepare import find_dataset, prepare_default_corpus, prepare_text, prepare_tinyshakespeare
from llmpy.io.formats import read_shard, read_tokenizer, write_shard
from llmpy.io.tokenizer import Tokenizer, TokenizerError, gpt2_encoding, write_gpt2_tokenizer_file

# ----------------------------------------------------------------------------
# tokenizer

# GPT-2 ids known independently of this code (OpenAI's encoder.json / published examples).
KNOWN_IDS = {
    "Hello world": [15496, 995],
    "hello world": [31373, 995],
    " the": [262],
    "The": [464],
    "\n\n": [628],
    "!": [0],
    ",": [11],
    ".": [13],
    " and": [290],
    " of": [286],
    # Special-token text is ordinary text to encode(): "<", "|", "end", "of", "text", "|", ">".
    "<|endoftext|>": [27, 91, 437, 1659, 5239, 91, 29],
}


@pytest.mark.parametrize("text", sorted(KNOWN_IDS))
def test_gpt2_known_ids(text):
    tok = Tokenizer.gpt2()
    assert tok.encode(text) == KNOWN_IDS[text]
    assert gpt2_encoding().encode_ordinary(text) == KNOWN_IDS[text]
    assert tok.decode(KNOWN_IDS[text]) == text


def test_gpt2_encoding_properties():
    enc = gpt2_encoding()
    assert enc is gpt2_encoding()  # cached
    assert enc.name == "gpt2"
    assert enc.n_vocab == GPT2_VOCAB_SIZE == 50257
    assert enc.eot_token == GPT2_EOT_TOKEN == 50256
    assert enc.encode("<|endoftext|>", allowed_special="all") == [50256]
    # Same regex as tiktoken's own GPT-2 definition (importing it fetches nothing).
    from tiktoken_ext.openai_public import r50k_pat_str

    assert enc._pat_str == r50k_pat_str
    tok = Tokenizer.gpt2()
    assert tok.eot_token == 50256 and tok.vocab_size == 50257
    assert tok.token_bytes(50256) == b"<|endoftext|>"
    assert tok.token_bytes(15496) == b"Hello"
    assert tok.token_bytes(262) == b" the"


def test_gpt2_encoding_is_built_without_tiktoken_loaders(monkeypatch):
    import tiktoken.load

    def no_network(*args, **kwargs):
        raise AssertionError("tiktoken's file loader was called")

    monkeypatch.setattr(tiktoken.load, "read_file", no_network)
    monkeypatch.setattr(tiktoken.load, "read_file_cached", no_network)
    gpt2_encoding.cache_clear()
    try:
        assert gpt2_encoding().encode_ordinary("Hello world") == [15496, 995]
    finally:
        gpt2_encoding.cache_clear()


@pytest.mark.parametrize(
    "text",
    ["", "Hello, world!\n\nA second paragraph.", "  leading spaces\ttabs\r\n", "héllo wörld ünïcode", "emoji 🙂👍🏽 and 中文字符", "x" * 1000],
)
def test_gpt2_round_trip(text):
    tok = Tokenizer.gpt2()
    assert tok.decode(tok.encode(text)) == text


def test_decode_partial_utf8_and_bad_ids():
    tok = Tokenizer.gpt2()
    ids = tok.encode("🙂")
    assert len(ids) > 1  # a 4-byte character spans several byte tokens
    assert tok.decode(ids[:1]) == "\ufffd"  # a partial character decodes to the replacement character
    with pytest.raises(ValueError, match="50257"):
        tok.decode([50257])
    with pytest.raises(ValueError, match="-1"):
        tok.token_bytes(-1)


def test_tokenizer_file_round_trip(tmp_path):
    path = tmp_path / "gpt2_tokenizer.bin"
    write_gpt2_tokenizer_file(path)
    header = np.fromfile(path, dtype="<u4", count=4)
    assert header.tolist() == [20240328, 2, 50257, 50256]
    tokens, eot = read_tokenizer(path)
    enc = gpt2_encoding()
    assert eot == 50256
    assert len(tokens) == 50257
    assert tokens == [enc.decode_single_token_bytes(i) for i in range(50257)]

    from_file = Tokenizer.from_file(path)
    gpt2 = Tokenizer.gpt2()
    assert from_file.vocab_size == 50257 and from_file.eot_token == 50256
    ids = gpt2.encode("Decode me: ünïcode, 🙂 and <|endoftext|> text.") + [50256]
    assert from_file.decode(ids) == gpt2.decode(ids)
    assert from_file.decode(ids[:-1] + gpt2.encode("🙂")[:1]).endswith("\ufffd")
    assert from_file.token_bytes(995) == b" world"
    with pytest.raises(TokenizerError, match="merges"):
        from_file.encode("hello")


# ----------------------------------------------------------------------------
# dataset preparation


def expected_tokens(documents: list[str]) -> list[int]:
    """Independent recomputation of llm.c's tokenization: per document, split at blank lines;
    each section: EOT, then the section with "\\n\\n" re-added unless it is the document's last."""
    enc = gpt2_encoding()
    out: list[int] = []
    for doc in documents:
        sections = doc.split("\n\n")
        for i, section in enumerate(sections):
            out.append(50256)
            out.extend(enc.encode_ordinary(section + "\n\n" if i < len(sections) - 1 else section))
    return out


def make_text(paragraphs: int, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    words = "the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing".split()
    paras = []
    for p in range(paragraphs):
        n = int(rng.integers(5, 30))
        line = " ".join(words[int(i)] for i in rng.integers(0, len(words), n))
        paras.append(f"SPEAKER {p}:\n{line.capitalize()}.")
    # A triple newline and trailing newline, as real files have.
    return "\n\n".join(paras[:3]) + "\n\n\n" + "\n\n".join(paras[3:]) + "\n"


def test_prepare_text_matches_recomputation(tmp_path):
    docs = [make_text(120, seed=1), make_text(80, seed=2)]
    files = []
    for i, doc in enumerate(docs):
        files.append(tmp_path / f"in{i}.txt")
        files[-1].write_text(doc, encoding="utf-8")
    ds = prepare_text(tmp_path / "out", files)
    expected = np.array(expected_tokens(docs))
    total = expected.size
    assert total > 3000
    assert ds.name == "text"
    assert ds.num_val_tokens == total // 10  # small corpus: 10% instead of 32,768
    assert ds.num_train_tokens == total - total // 10
    val, train = read_shard(tmp_path / "out" / "text_val.bin"), read_shard(tmp_path / "out" / "text_train.bin")
    np.testing.assert_array_equal(np.concatenate([val, train]), expected)
    assert val.size == ds.num_val_tokens and train.size == ds.num_train_tokens
    assert val[0] == 50256

    # A fraction for the validation split, and a custom name.
    ds2 = prepare_text(tmp_path / "out", files, name="mine", val_tokens=0.25)
    assert ds2.num_val_tokens == round(total * 0.25)
    assert find_dataset(tmp_path / "out").name == "text"


def test_prepare_text_errors(tmp_path):
    with pytest.raises(DataError, match="not found") as e:
        prepare_text(tmp_path / "out", [tmp_path / "missing.txt"])
    assert "missing.txt" in str(e.value)
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9 au lait".encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8") as e:
        prepare_text(tmp_path / "out", [bad])
    assert "latin1.txt" in str(e.value)
    small = tmp_path / "small.txt"
    small.write_text("Just a few words.\n\nNot enough for two windows.", encoding="utf-8")
    with pytest.raises(DataError, match="too small") as e:
        prepare_text(tmp_path / "out", [small])
    assert f"{len(expected_tokens([small.read_text()]))} tokens" in str(e.value)
    with pytest.raises(DataError, match="no input files"):
        prepare_text(tmp_path / "out", [])


def test_prepare_tinyshakespeare_from_input(tmp_path):
    text = make_text(300, seed=3)
    src = tmp_path / "input.txt"
    src.write_text(text, encoding="utf-8")
    ds = prepare_tinyshakespeare(tmp_path / "ts", input_path=src)
    expected = np.array(expected_tokens([text]))
    assert ds.name == "tinyshakespeare"
    assert ds.num_val_tokens == min(32768, expected.size // 10)
    val = read_shard(tmp_path / "ts" / "tinyshakespeare_val.bin")
    train = read_shard(tmp_path / "ts" / "tinyshakespeare_train.bin")
    np.testing.assert_array_equal(np.concatenate([val, train]), expected)
    assert find_dataset(tmp_path / "ts") == ds


def test_prepare_tinyshakespeare_uses_existing_input_without_download(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "TINYSHAKESPEARE_URL", "http://127.0.0.1:9/input.txt")
    out = tmp_path / "ts"
    out.mkdir()
    (out / "input.txt").write_text(make_text(100, seed=4), encoding="utf-8")
    ds = prepare_tinyshakespeare(out)
    assert ds.num_train_tokens > 0


def test_prepare_tinyshakespeare_offline_error(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "TINYSHAKESPEARE_URL", "http://127.0.0.1:9/input.txt")
    monkeypatch.setattr(data, "DOWNLOAD_TIMEOUT_S", 2.0)
    with pytest.raises(DataError) as e:
        prepare_tinyshakespeare(tmp_path / "ts")
    message = str(e.value)
    assert "--input" in message
    assert "llmpy prepare tinyshakespeare --input /path/to/input.txt" in message
    assert "http://127.0.0.1:9/input.txt" in message
    assert not (tmp_path / "ts" / "input.txt").exists()


def test_default_corpus_deterministic(tmp_path):
    # Reduced cap keeps the test quick; the full default build takes a few seconds.
    a = prepare_default_corpus(tmp_path / "a", max_tokens=120_000)
    prepare_default_corpus(tmp_path / "b", max_tokens=120_000)
    assert a.name == "pydocs"
    assert a.num_train_tokens + a.num_val_tokens == 120_000
    assert a.num_val_tokens == 12_000
    for split in ("train", "val"):
        assert (tmp_path / "a" / f"pydocs_{split}.bin").read_bytes() == (tmp_path / "b" / f"pydocs_{split}.bin").read_bytes()
    val = read_shard(tmp_path / "a" / "pydocs_val.bin")
    assert val[0] == 50256 and int(val.max()) < 50257
    assert find_dataset(tmp_path / "a").name == "pydocs"


def test_find_dataset_order(tmp_path):
    assert find_dataset(tmp_path / "nothing") is None
    assert find_dataset(tmp_path) is None
    for name in ("zzz", "pydocs", "text", "tinyshakespeare"):
        write_shard(tmp_path / f"{name}_train.bin", np.arange(100))
        write_shard(tmp_path / f"{name}_val.bin", np.arange(70))
        assert find_dataset(tmp_path).name == name
    ds = find_dataset(tmp_path)
    assert (ds.num_train_tokens, ds.num_val_tokens) == (100, 70)


# ----------------------------------------------------------------------------
# DataLoader


def windows(loader: DataLoader, n: int) -> list[int]:
    """First token of each of the next n batches, checking inputs/targets on the way."""
    firsts = []
    for _ in range(n):
        x, y = loader.next_batch()
        assert x.shape == y.shape == (loader.B, loader.T)
        assert x.dtype == y.dtype == np.int32
        assert x.flags.c_contiguous and y.flags.c_contiguous
        firsts.append(int(x[0, 0]))
    return firsts


def test_dataloader_ranks_and_wraparound(tmp_path):
    # B=2, T=4: windows of 9 tokens, moving 8 per rank, 16 per global batch.
    write_shard(tmp_path / "d_000.bin", np.arange(0, 50))  # (50-1)//16 = 3 batches per rank
    write_shard(tmp_path / "d_001.bin", np.arange(1000, 1040))  # (40-1)//16 = 2 batches per rank
    pattern = str(tmp_path / "d_*.bin")
    r0 = DataLoader(pattern, B=2, T=4, rank=0, world_size=2)
    r1 = DataLoader(pattern, B=2, T=4, rank=1, world_size=2)
    assert r0.num_batches == r1.num_batches == 5
    assert r0.num_tokens == 90

    x, y = r0.next_batch()
    np.testing.assert_array_equal(x, [[0, 1, 2, 3], [4, 5, 6, 7]])
    np.testing.assert_array_equal(y, [[1, 2, 3, 4], [5, 6, 7, 8]])
    x, y = r1.next_batch()
    np.testing.assert_array_equal(x, [[8, 9, 10, 11], [12, 13, 14, 15]])
    np.testing.assert_array_equal(y, [[9, 10, 11, 12], [13, 14, 15, 16]])

    # Rest of the epoch, then the wrap back to the first shard.
    assert windows(r0, 6) == [16, 32, 1000, 1016, 0, 16]
    assert windows(r1, 6) == [24, 40, 1008, 1024, 8, 24]
    r1.reset()
    assert windows(r1, 3) == [8, 24, 40]
    x, y = r1.next_batch()
    np.testing.assert_array_equal(x.ravel(), np.arange(1008, 1016))

    # Writing into inputs does not change targets.
    x, y = r0.next_batch()
    x[:] = -1
    assert (y >= 0).all()


def test_dataloader_last_window_ends_at_shard_end(tmp_path):
    write_shard(tmp_path / "s.bin", np.arange(0, 49))  # (49-1)//16 = 3: the last rank-1 window is 40..48
    loader = DataLoader(str(tmp_path / "s.bin"), B=2, T=4, rank=1, world_size=2)
    for _ in range(3):
        x, y = loader.next_batch()
    assert int(x[0, 0]) == 40 and int(y[-1, -1]) == 48
    assert windows(loader, 1) == [8]  # then back to the start


def test_dataloader_shuffle_covers_every_window_once(tmp_path):
    write_shard(tmp_path / "d_000.bin", np.arange(0, 1000))  # 999//16 = 62 batches per rank, 124 windows
    write_shard(tmp_path / "d_001.bin", np.arange(2000, 2500))  # 499//16 = 31 per rank, 62 windows
    pattern = str(tmp_path / "d_*.bin")
    all_windows = [s * 1000 + 8 * w for s, count in ((0, 124), (2, 62)) for w in range(count)]

    def epoch_windows(seed):
        loaders = [DataLoader(pattern, 2, 4, rank=r, world_size=2, shuffle=True, seed=seed) for r in range(2)]
        assert all(l.num_batches == 93 for l in loaders)
        firsts = [windows(l, 2 * l.num_batches) for l in loaders]
        return tuple(f[:93] for f in firsts), tuple(f[93:] for f in firsts)

    (e0_r0, e0_r1), (e1_r0, e1_r1) = epoch_windows(seed=42)
    for ranks in ((e0_r0, e0_r1), (e1_r0, e1_r1)):
        served = ranks[0] + ranks[1]
        assert sorted(served) == sorted(all_windows)  # each window exactly once per epoch, ranks disjoint
    unshuffled = windows(DataLoader(pattern, 2, 4, rank=0, world_size=2), 93)
    assert e0_r0 != unshuffled
    assert e0_r0 != e1_r0  # reshuffled for the next epoch

    # Deterministic per seed, different across seeds; reset() replays epoch 0.
    assert epoch_windows(seed=42)[0] == (e0_r0, e0_r1)
    assert epoch_windows(seed=7)[0][0] != e0_r0
    loader = DataLoader(pattern, 2, 4, rank=0, world_size=2, shuffle=True, seed=42)
    windows(loader, 10)
    loader.reset()
    assert windows(loader, 93) == e0_r0


def test_dataloader_bad_token_id(tmp_path):
    tokens = np.arange(100) + 50200
    tokens[17] = 50300
    write_shard(tmp_path / "bad.bin", tokens)
    with pytest.raises(DataError) as e:
        DataLoader(str(tmp_path / "bad.bin"), 2, 4, vocab_size=50257)
    message = str(e.value)
    assert "bad.bin" in message and "50300" in message and "position 17" in message and "50257" in message
    DataLoader(str(tmp_path / "bad.bin"), 2, 4)  # no vocab_size: no check

    # A later shard is checked when the loader first reaches it.
    write_shard(tmp_path / "a_0.bin", np.arange(20))
    write_shard(tmp_path / "a_1.bin", tokens)
    loader = DataLoader(str(tmp_path / "a_*.bin"), 2, 4, vocab_size=50257)
    loader.next_batch()
    loader.next_batch()
    with pytest.raises(DataError, match="a_1.bin"):
        loader.next_batch()


def test_dataloader_errors(tmp_path):
    with pytest.raises(DataError, match="no data shards match") as e:
        DataLoader(str(tmp_path / "nothing_*.bin"), 2, 4)
    assert "nothing_*.bin" in str(e.value)

    write_shard(tmp_path / "small.bin", np.arange(16))
    with pytest.raises(DataError) as e:
        DataLoader(str(tmp_path / "small.bin"), 2, 4, rank=0, world_size=2)
    message = str(e.value)
    assert "small.bin" in message and "16 tokens" in message and "17" in message
    DataLoader(str(tmp_path / "small.bin"), 2, 4)  # world_size 1 needs only 9

    (tmp_path / "junk.bin").write_bytes(b"\0" * 2000)
    with pytest.raises(DataError, match="junk.bin"):
        DataLoader(str(tmp_path / "junk.bin"), 2, 4)

    with pytest.raises(ValueError, match="rank"):
        DataLoader(str(tmp_path / "small.bin"), 2, 4, rank=2, world_size=2)


def test_dataloader_on_prepared_dataset_in_odd_directory(tmp_path):
    # Glob characters in the directory name must not break the prepared patterns.
    src = tmp_path / "in.txt"
    src.write_text(make_text(200, seed=5), encoding="utf-8")
    ds = prepare_text(tmp_path / "run [1]", [src])
    loader = DataLoader(ds.train_pattern, B=2, T=8, vocab_size=GPT2_VOCAB_SIZE)
    assert loader.num_tokens == ds.num_train_tokens
    x, y = loader.next_batch()
    train = read_shard(tmp_path / "run [1]" / "text_train.bin")
    np.testing.assert_array_equal(x.ravel(), train[:16])
    np.testing.assert_array_equal(y.ravel(), train[1:17])


@pytest.mark.parametrize("shuffle", [False, True])
def test_dataloader_seek_resumes_the_same_sequence(tmp_path, shuffle):
    write_shard(tmp_path / "d_000.bin", np.arange(0, 1000))
    write_shard(tmp_path / "d_001.bin", np.arange(2000, 2500))
    pattern = str(tmp_path / "d_*.bin")
    # stop at several places: inside the first shard, at a shard boundary, in the next epoch
    for consumed in (5, 62, 93, 130):
        original = DataLoader(pattern, 2, 4, shuffle=shuffle, seed=3)
        windows(original, consumed)
        position = original.position()
        expected = windows(original, 40)
        resumed = DataLoader(pattern, 2, 4, shuffle=shuffle, seed=3)
        resumed.seek(*position)
        assert windows(resumed, 40) == expected, consumed
    with pytest.raises(DataError, match="cannot resume"):
        DataLoader(pattern, 2, 4).seek(0, 5, 0)
    with pytest.raises(DataError, match="cannot resume"):
        DataLoader(pattern, 2, 4).seek(0, 0, 10_000)
