"""The DataLoader: batches of (inputs, targets) from llm.c token shards (llmc/dataloader.h)."""

from __future__ import annotations

import glob

import numpy as np

from llmpy.io.formats import FormatError, read_shard, read_shard_header


class DataError(RuntimeError):
    """A dataset cannot be prepared or loaded; the message says which file and what to do."""


class DataLoader:
    """Batches of (inputs, targets), each (B, T) int32, from llm.c token shards (llmc/dataloader.h).

    A batch is a window of B*T+1 tokens: inputs = window[:-1], targets = window[1:]. Shards
    (sorted glob of `pattern`) are cut into global batches of B*T*world_size tokens; rank r takes
    the r-th B*T slice of each, so every rank sees the same number of batches per shard,
    (num_tokens - 1) // (B*T*world_size). After the last batch of a shard comes the next shard,
    after the last shard the first again (a new epoch).

    shuffle=True: every epoch, a seeded permutation of the shard order and of the windows inside
    each shard; window i of the permutation goes to rank i % world_size, so ranks never share one.
    It uses numpy's Generator seeded with (seed, epoch[, shard]), the same on every rank; it is
    not bit-identical with llm.c's mt19937 shuffle.
    """

    def __init__(
        self,
        pattern: str,
        B: int,
        T: int,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = False,
        seed: int = 42,
        vocab_size: int | None = None,
    ) -> None:
        for arg, value in (("B", B), ("T", T), ("world_size", world_size)):
            if not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"DataLoader: {arg} must be a positive integer, got {value!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"DataLoader: rank must be in [0, {world_size}), got {rank}")
        if seed < 0:
            raise ValueError(f"DataLoader: seed must be non-negative, got {seed}")
        self.pattern = str(pattern)
        self.B, self.T = int(B), int(T)
        self.rank, self.world_size = int(rank), int(world_size)
        self.shuffle, self.seed = bool(shuffle), int(seed)
        self.vocab_size = vocab_size

        self.files = sorted(glob.glob(self.pattern))
        if not self.files:
            raise DataError(
                f"no data shards match {self.pattern!r}; prepare a dataset first (llmpy prepare ...) "
                "or check the path"
            )
        # Check every header now (cheap), as llm.c does, so a bad shard fails at startup, not hours in.
        self.shard_num_tokens = []
        global_batch = self.B * self.T * self.world_size
        for path in self.files:
            try:
                ntok = read_shard_header(path)
            except FormatError as e:
                raise DataError(str(e)) from None
            if ntok < global_batch + 1:
                raise DataError(
                    f"{path}: shard too small: {ntok} tokens, but one batch needs B*T*world_size+1 = "
                    f"{self.B}*{self.T}*{self.world_size}+1 = {global_batch + 1} tokens; "
                    "use a smaller B or T, or more data"
                )
            self.shard_num_tokens.append(ntok)
        # -1: a window takes B*T+1 tokens but the next one starts only B*T later.
        self.shard_num_samples = [(n - 1) // global_batch for n in self.shard_num_tokens]
        self.num_tokens = sum(self.shard_num_tokens)
        self.num_batches = sum(self.shard_num_samples)  # per rank, per epoch
        self._vocab_checked: set[int] = set()
        self.reset()

    # -- state --------------------------------------------------------------

    def reset(self) -> None:
        """Back to the start of epoch 0 (the same batch sequence as after construction)."""
        self.epoch = 0
        self._start_epoch()

    def _start_epoch(self) -> None:
        if self.shuffle:
            self._shard_order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.files))
        else:
            self._shard_order = np.arange(len(self.files))
        self._load_shard(0)

    def _load_shard(self, position: int) -> None:
        self.current_shard_position = position  # index into this epoch's shard order
        shard = int(self._shard_order[position])
        self.current_shard = shard
        path = self.files[shard]
        try:
            self._tokens = read_shard(path, mmap=True)
        except FormatError as e:
            raise DataError(str(e)) from None
        if self.vocab_size is not None and shard not in self._vocab_checked:
            self._check_vocab(path, self._tokens)
            self._vocab_checked.add(shard)
        windows = self.shard_num_samples[shard] * self.world_size
        if self.shuffle:
            self._window_order = np.random.default_rng([self.seed, self.epoch, shard]).permutation(windows)
        else:
            self._window_order = None
        self.current_sample_idx = 0  # next sample (per-rank batch) to serve from this shard

    def _check_vocab(self, path: str, tokens: np.ndarray) -> None:
        # One vectorized pass per shard, on first load; a bad id would otherwise index past the embedding.
        if int(tokens.max()) >= self.vocab_size:
            position = int(np.argmax(tokens >= self.vocab_size))
            raise DataError(
                f"{path}: token id {int(tokens[position])} at position {position} is not below the model's "
                f"vocab_size {self.vocab_size}; the shard was made with a different tokenizer, "
                "prepare the data again with the GPT-2 tokenizer"
            )

    def position(self) -> tuple[int, int, int]:
        """(epoch, shard position in the epoch's order, next sample index): where `seek` resumes."""
        return self.epoch, self.current_shard_position, self.current_sample_idx

    def seek(self, epoch: int, shard_position: int, sample_index: int) -> None:
        """Continue from a `position()` of an earlier run with the same shards, B, T, ranks and seed."""
        if epoch < 0 or not 0 <= shard_position < len(self.files):
            raise DataError(f"cannot resume {self.pattern!r} at epoch {epoch}, shard position {shard_position}: "
                            f"there are {len(self.files)} shards")
        self.epoch = epoch
        self._start_epoch()
        if shard_position:
            self._load_shard(shard_position)
        if not 0 <= sample_index <= self.shard_num_samples[self.current_shard]:
            raise DataError(f"cannot resume {self.files[self.current_shard]} at sample {sample_index}: it has "
                            f"{self.shard_num_samples[self.current_shard]} batches (different B, T or data?)")
        self.current_sample_idx = sample_index

    # -- batches ------------------------------------------------------------

    def next_batch(self) -> tuple[np.ndarray, np.ndarray]:
        """Next (inputs, targets), both (B, T) int32 C-contiguous arrays of their own."""
        if self.current_sample_idx >= self.shard_num_samples[self.current_shard]:
            if self.current_shard_position + 1 < len(self.files):
                self._load_shard(self.current_shard_position + 1)
            else:
                self.epoch += 1
                self._start_epoch()
        k = self.current_sample_idx
        if self._window_order is None:
            window = k * self.world_size + self.rank
        else:
            window = int(self._window_order[k * self.world_size + self.rank])
        BT = self.B * self.T
        start = window * BT
        buf = np.asarray(self._tokens[start : start + BT + 1], dtype=np.int32)
        self.current_sample_idx += 1
        inputs = buf[:-1].reshape(self.B, self.T)
        targets = buf[1:].reshape(self.B, self.T).copy()  # own memory: writing one must not change the other
        return inputs, targets

    def __repr__(self) -> str:
        return (
            f"DataLoader({self.pattern!r}, B={self.B}, T={self.T}, rank={self.rank}, world_size={self.world_size}, "
            f"shuffle={self.shuffle}, shards={len(self.files)}, tokens={self.num_tokens}, batches/epoch={self.num_batches})"
        )
