"""The DataLoader: batches of (inputs, targets) from llm.c token shards (llmc/dataloader.h)."""

from __future__ import annotations

import glob

import numpy as np

from llmpy.io.formats import FormatError, read_shard, read_shard_header


class DataError(RuntimeError):
    """A dataset cannot be prepared or loaded; the message says which file and what to do."""


class Mt19937Shuffle:
    """llm.c's `random_permutation` (llmc/rand.h) on its mt19937 stream, seeded as its `manual_seed`.

    numpy's legacy RandomState seeds an integer with the same init_genrand recurrence, and its uint32 draws
    over the full range are the generator's raw 32-bit outputs, llm.c's `randint32`.
    """

    def __init__(self, seed: int):
        self._rng = np.random.RandomState(seed)

    def permute(self, order: np.ndarray) -> None:
        """Fisher-Yates in place, from the last element down: j = randint32 % (i + 1), swap i and j."""
        n = len(order)
        if n < 2:
            return
        draws = self._rng.randint(0, 2**32, size=n - 1, dtype=np.uint32).astype(np.int64)
        picks = (draws % np.arange(n, 1, -1)).tolist()  # for i = n-1 .. 1
        items = order.tolist()
        for i, j in zip(range(n - 1, 0, -1), picks):
            items[i], items[j] = items[j], items[i]
        order[:] = items


class DataLoader:
    """Batches of (inputs, targets), each (B, T) int32, from llm.c token shards (llmc/dataloader.h).

    A batch is a window of B*T+1 tokens: inputs = window[:-1], targets = window[1:]. Shards
    (sorted glob of `pattern`) are cut into global batches of B*T*world_size tokens; rank r takes
    the r-th B*T slice of each, so every rank sees the same number of batches per shard,
    (num_tokens - 1) // (B*T*world_size). After the last batch of a shard comes the next shard,
    after the last shard the first again (a new epoch).

    shuffle=True: llm.c's order (its `dataloader.h` with should_shuffle=1): each rank draws from its own
    mt19937 seeded with seed + rank (llm.c: 42 + rank); every epoch permutes the shard order (the previous
    epoch's order, in place) and, as each shard is loaded, the order of its global batches; rank r reads
    its own B*T slice of global batch g (window g * world_size + r), so ranks never share a window.
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
        self._shuffle = Mt19937Shuffle(self.seed + self.rank) if self.shuffle else None
        self._shard_order = np.arange(len(self.files))
        self._start_epoch()

    def _start_epoch(self) -> None:
        if self._shuffle is not None:  # llm.c's dataloader_reset: the order so far, permuted again
            self._shuffle.permute(self._shard_order)
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
        self._batch_order = None
        if self._shuffle is not None:  # llm.c's prepare_intra_shard_indices_
            self._batch_order = np.arange(self.shard_num_samples[shard])
            self._shuffle.permute(self._batch_order)
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
        self.reset()  # the shuffle's draws are a stream: replay them up to the position
        while self.epoch < epoch or self.current_shard_position < shard_position:
            self._next_shard()
        if not 0 <= sample_index <= self.shard_num_samples[self.current_shard]:
            raise DataError(f"cannot resume {self.files[self.current_shard]} at sample {sample_index}: it has "
                            f"{self.shard_num_samples[self.current_shard]} batches (different B, T or data?)")
        self.current_sample_idx = sample_index

    # -- batches ------------------------------------------------------------

    def next_batch(self) -> tuple[np.ndarray, np.ndarray]:
        """Next (inputs, targets), both (B, T) int32 C-contiguous arrays of their own."""
        if self.current_sample_idx >= self.shard_num_samples[self.current_shard]:
            self._next_shard()
        k = self.current_sample_idx
        batch = k if self._batch_order is None else int(self._batch_order[k])
        window = batch * self.world_size + self.rank
        BT = self.B * self.T
        start = window * BT
        buf = np.asarray(self._tokens[start : start + BT + 1], dtype=np.int32)
        self.current_sample_idx += 1
        inputs = buf[:-1].reshape(self.B, self.T)
        targets = buf[1:].reshape(self.B, self.T).copy()  # own memory: writing one must not change the other
        return inputs, targets

    def _next_shard(self) -> None:
        """The next shard of the epoch's order, or the first of the next epoch."""
        if self.current_shard_position + 1 < len(self.files):
            self._load_shard(self.current_shard_position + 1)
        else:
            self.epoch += 1
            self._start_epoch()

    def __repr__(self) -> str:
        return (
            f"DataLoader({self.pattern!r}, B={self.B}, T={self.T}, rank={self.rank}, world_size={self.world_size}, "
            f"shuffle={self.shuffle}, shards={len(self.files)}, tokens={self.num_tokens}, batches/epoch={self.num_batches})"
        )
