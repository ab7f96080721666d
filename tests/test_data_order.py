"""llm.c's training data order, derived here from a direct transcription of llmc/rand.h and llmc/dataloader.h
(pure Python, no product code), against llmpy's DataLoader; and `llmpy prepare text DIR`."""

import json

import numpy as np
import pytest

from llmpy.data.loader import DataLoader
from llmpy.io.formats import read_shard, write_shard


class MT19937:
    """llmc/rand.h: manual_seed, next_state, randint32 (PyTorch's mt19937)."""

    N, M = 624, 397

    def __init__(self, seed):
        self.state = [seed & 0xFFFFFFFF]
        for j in range(1, self.N):
            prev = self.state[j - 1]
            self.state.append((1812433253 * (prev ^ (prev >> 30)) + j) & 0xFFFFFFFF)
        self.left, self.next = 1, 0

    def next_state(self):
        s, N, M = self.state, self.N, self.M
        matrix = (0, 0x9908B0DF)
        self.left, self.next = N, 0
        for j in range(N - 1):
            y = (s[j] & 0x80000000) | (s[j + 1] & 0x7FFFFFFF)
            s[j] = s[(j + M) % N] ^ (y >> 1) ^ matrix[y & 1]
        y = (s[N - 1] & 0x80000000) | (s[0] & 0x7FFFFFFF)
        s[N - 1] = s[M - 1] ^ (y >> 1) ^ matrix[y & 1]

    def randint32(self):
        self.left -= 1
        if self.left <= 0:
            self.next_state()
        y = self.state[self.next]
        self.next += 1
        y ^= y >> 11
        y ^= (y << 7) & 0x9D2C5680
        y ^= (y << 15) & 0xEFC60000
        y ^= y >> 18
        return y


def random_permutation(data, rng):
    for i in range(len(data) - 1, 0, -1):
        j = rng.randint32() % (i + 1)
        data[i], data[j] = data[j], data[i]


def llmc_window_starts(shard_tokens, B, T, rank, world, count):
    """Token offsets of the first `count` batches a rank reads: dataloader_init(..., should_shuffle=1) and
    dataloader_next_batch, shards as (index in glob order, number of tokens)."""
    rng = MT19937(42 + rank)
    shard_indices = list(range(len(shard_tokens)))
    total = B * T * world
    starts, position = [], None

    def reset():
        random_permutation(shard_indices, rng)
        return load(0)

    def load(idx):
        samples = (shard_tokens[shard_indices[idx]] - 1) // total
        intra = list(range(samples))
        random_permutation(intra, rng)
        return idx, intra

    position = reset()
    sample = 0
    while len(starts) < count:
        idx, intra = position
        if sample >= len(intra):
            position = reset() if idx == len(shard_tokens) - 1 else load(idx + 1)
            sample = 0
            continue
        starts.append((shard_indices[idx], intra[sample] * total + rank * B * T))
        sample += 1
    return starts


def test_mt19937_transcription_matches_rand_h():
    # the values llmc/rand.h prints for manual_seed(137)
    rng = MT19937(137)
    assert [rng.randint32() for _ in range(5)] == [4053805790, 2173880614, 380293709, 1237255315, 2986595568]


@pytest.mark.parametrize("world", [1, 2])
def test_shuffled_loader_reads_llmc_windows(tmp_path, world):
    sizes = [1000, 523, 801]  # three shards: shard order and the batches inside each are permuted
    for i, n in enumerate(sizes):
        write_shard(tmp_path / f"d_{i:03d}.bin", np.arange(n) + 10_000 * i)
    B, T = 2, 4
    for rank in range(world):
        loader = DataLoader(str(tmp_path / "d_*.bin"), B, T, rank, world, shuffle=True, seed=42)
        count = 2 * loader.num_batches + 7  # two epochs and a bit: the shard order is permuted again
        for shard, start in llmc_window_starts(sizes, B, T, rank, world, count):
            x, y = loader.next_batch()
            expected = np.arange(start, start + B * T + 1) + 10_000 * shard
            np.testing.assert_array_equal(x.ravel(), expected[:-1])
            np.testing.assert_array_equal(y.ravel(), expected[1:])


def test_unshuffled_loader_is_sequential(tmp_path):
    write_shard(tmp_path / "d.bin", np.arange(100))
    loader = DataLoader(str(tmp_path / "d.bin"), 2, 4, shuffle=False)
    assert [int(loader.next_batch()[0][0, 0]) for _ in range(14)] == [8 * k for k in range(12)] + [0, 8]


def test_train_shuffles_by_default_and_no_shuffle_keeps_the_order(tmp_path):
    from llmpy.commands.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["train"]).shuffle is True
    assert parser.parse_args(["train", "--no-shuffle"]).shuffle is False


def test_prepare_text_folder_into_shards(tmp_path):
    from llmpy.data.prepare import prepare_folder
    from llmpy.io.tokenizer import Tokenizer

    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    texts = [f"Document {i}: " + " ".join(f"word{j}" for j in range(40 * (i + 1))) for i in range(6)]
    (corpus / "a.txt").write_text(texts[0])
    (corpus / "sub" / "b.txt").write_text(texts[1])
    (corpus / "c.jsonl").write_text("\n".join(json.dumps({"text": t, "id": k}) for k, t in enumerate(texts[2:])) + "\n")
    (corpus / "notes.md").write_text("ignored")
    prepared = prepare_folder(tmp_path / "out", corpus, name="mine", shard_size=1000, progress=False)
    tokenizer = Tokenizer.gpt2()
    # llm.c's fineweb.py order: files sorted, documents each preceded by <|endoftext|>
    ordered = [texts[0], *texts[2:], texts[1]]  # a.txt, c.jsonl, sub/b.txt
    expected = np.concatenate([[50256] + tokenizer.encode(t) for t in ordered])
    shards = sorted((tmp_path / "out").glob("mine_*.bin"), key=lambda p: p.name[-10:])
    assert [s.name for s in shards][:2] == ["mine_val_000000.bin", "mine_train_000001.bin"]  # as fineweb.py
    tokens = np.concatenate([read_shard(s) for s in shards])
    np.testing.assert_array_equal(tokens, expected)
    assert all(len(read_shard(s)) == 1000 for s in shards[:-1])
    assert len(shards) == -(-expected.size // 1000) and prepared.val_pattern.endswith("mine_val_[0-9]*.bin")
    assert prepared.num_val_tokens == 1000 and prepared.num_train_tokens == expected.size - 1000
    from llmpy.data.prepare import find_dataset

    assert find_dataset(tmp_path / "out") == prepared  # `llmpy train --data-dir` finds the shards


def test_prepare_text_folder_errors(tmp_path):
    from llmpy.data.loader import DataError
    from llmpy.data.prepare import prepare_folder

    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no .txt, .jsonl or .parquet"):
        prepare_folder(tmp_path / "out", tmp_path / "empty", progress=False)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.jsonl").write_text('{"text": "fine"}\n{"body": "no text field"}\n')
    with pytest.raises(DataError, match=r"x.jsonl: record 2: .*text"):
        prepare_folder(tmp_path / "out", tmp_path / "bad", progress=False)
