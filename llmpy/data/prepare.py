"""Dataset preparation, llm.c's way (its dev/data/): text -> GPT-2 tokens -> uint16 shards.

Tokenization follows llm.c's dev/data/tinyshakespeare.py: the text is cut into sections at
blank lines ("\\n\\n"), every section is preceded by <|endoftext|> (50256) and encoded with its
"\\n\\n" put back (except the last section of a document). The first 32,768 tokens are the
validation split, the rest the training split; each split is one llm.c token shard
(see llmpy.io.formats: int32 header [20240520, 1, num_tokens], then uint16 tokens).
"""

from __future__ import annotations

import ast
import contextlib
import glob
import itertools
import os
import re
import sysconfig
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from llmpy.core.config import GPT2_EOT_TOKEN
from llmpy.core.errors import OptionError
from llmpy.io.formats import FormatError, atomic_write_bytes, read_shard_header, special_file_kind, write_shard
from llmpy.data.loader import DataError
from llmpy.io.tokenizer import gpt2_encoding

TINYSHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
DOWNLOAD_TIMEOUT_S = 10.0
DEFAULT_VAL_TOKENS = 32768  # llm.c's validation split size
# The smallest useful split: one window of T=64 plus the one extra target token.
MIN_SPLIT_TOKENS = 65
DEFAULT_CORPUS_MAX_TOKENS = 3_000_000
# Search order of find_dataset.
KNOWN_DATASETS = ("tinyshakespeare", "text", "pydocs")

# Sections are encoded in batches of this many: bounds the Python lists alive at once.
_ENCODE_CHUNK = 4096


@dataclass(frozen=True)
class PreparedDataset:
    """A prepared dataset: glob patterns of its shards and their token counts."""

    name: str
    train_pattern: str
    val_pattern: str
    num_train_tokens: int
    num_val_tokens: int


# ----------------------------------------------------------------------------
# tokenization


def _document_sections(text: str) -> list[str]:
    """Sections of one document, each with its "\\n\\n" put back except the last."""
    parts = text.split("\n\n")
    return [p + "\n\n" for p in parts[:-1]] + [parts[-1]]


def tokenize_sections(sections: Iterable[str], max_tokens: int | None = None) -> np.ndarray:
    """uint16 tokens (N,): for each section, <|endoftext|> then its ordinary GPT-2 encoding.

    Sections already carry their trailing "\\n\\n" where one belongs. Stops once `max_tokens`
    tokens exist and truncates to exactly that many.
    """
    enc = gpt2_encoding()
    chunks: list[np.ndarray] = []
    total = 0

    def flush(batch: list[str]) -> None:
        nonlocal total
        flat: list[int] = []
        # encode_ordinary: text that looks like "<|endoftext|>" stays ordinary text, so only
        # the separators we insert are real EOT tokens.
        for ids in enc.encode_ordinary_batch(batch):
            flat.append(GPT2_EOT_TOKEN)
            flat.extend(ids)
        chunks.append(np.array(flat, dtype=np.uint16))
        total += len(flat)

    batch: list[str] = []
    for section in sections:
        batch.append(section)
        if len(batch) == _ENCODE_CHUNK:
            flush(batch)
            batch = []
            if max_tokens is not None and total >= max_tokens:
                break
    if batch:  # empty after a break: that batch was flushed
        flush(batch)
    tokens = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.uint16)
    return tokens[:max_tokens] if max_tokens is not None else tokens


def _read_text(path: str | os.PathLike, what: str = "input file") -> str:
    path = Path(path)
    with contextlib.suppress(OSError):  # a named pipe or device would block or never end: refuse it
        kind = special_file_kind(os.stat(path).st_mode)
        if kind is not None:
            raise DataError(f"{what} {path} is not a regular file ({kind})")
    try:
        # Text mode turns \r\n into \n (as llm.c's open(...).read() does), so blank lines split.
        with open(path, "r", encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        raise DataError(f"{what} {path} not found") from None
    except IsADirectoryError:
        raise DataError(f"{what} {path} is a directory, expected a text file") from None
    except UnicodeDecodeError as e:
        raise DataError(
            f"{what} {path} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}); "
            "convert it to UTF-8 first, e.g. `iconv -f latin1 -t utf-8`"
        ) from None
    except OSError as e:
        raise DataError(f"cannot read {what} {path}: {e.strerror or e}") from None


def _num_val_tokens(total: int, val_tokens: int | float, source: str) -> int:
    """Validation size: an int is capped at 10% of the corpus, a float is a fraction of it."""
    if isinstance(val_tokens, float):
        if not 0.0 < val_tokens < 1.0:
            raise ValueError(f"val_tokens as a fraction must be in (0, 1), got {val_tokens}")
        n_val = round(total * val_tokens)
    else:
        if val_tokens < 1:
            raise ValueError(f"val_tokens must be a positive number of tokens or a fraction, got {val_tokens}")
        # Small corpora: keep 90% for training instead of handing everything to validation.
        n_val = min(int(val_tokens), total // 10)
    n_val = max(n_val, MIN_SPLIT_TOKENS)
    if total - n_val < MIN_SPLIT_TOKENS:
        raise DataError(
            f"{source} is too small: {total} tokens, but validation ({n_val} tokens) and training each need "
            f"at least {MIN_SPLIT_TOKENS} tokens (one window of T=64 plus 1); "
            f"give it at least {n_val + MIN_SPLIT_TOKENS} tokens of text"
        )
    return n_val


def _shard_pattern(out_dir: Path, name: str, split: str) -> str:
    # Patterns are glob patterns: escape the directory in case it contains [ ] * ?.
    return os.path.join(glob.escape(str(out_dir)), f"{name}_{split}.bin")


def _make_out_dir(out_dir: str | os.PathLike) -> Path:
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create output directory {out}: {e.strerror or e}") from None
    return out


def _write_splits(out_dir: Path, name: str, tokens: np.ndarray, n_val: int) -> PreparedDataset:
    for split, part in (("val", tokens[:n_val]), ("train", tokens[n_val:])):
        path = out_dir / f"{name}_{split}.bin"
        try:
            write_shard(path, part)
        except OSError as e:
            raise DataError(f"cannot write {path}: {e.strerror or e}") from None
    return PreparedDataset(
        name=name,
        train_pattern=_shard_pattern(out_dir, name, "train"),
        val_pattern=_shard_pattern(out_dir, name, "val"),
        num_train_tokens=int(tokens.size - n_val),
        num_val_tokens=int(n_val),
    )


# ----------------------------------------------------------------------------
# TinyShakespeare


def _download_help(out_dir: Path) -> str:
    return (
        f"On a machine with internet access fetch {TINYSHAKESPEARE_URL} "
        f"(e.g. `curl -L -o input.txt {TINYSHAKESPEARE_URL}`), copy it here and run:\n"
        f"    llmpy prepare tinyshakespeare --input /path/to/input.txt\n"
        f"or place it at {out_dir / 'input.txt'} and run `llmpy prepare tinyshakespeare` again."
    )


def _download_tinyshakespeare(dest: Path) -> None:
    _download(TINYSHAKESPEARE_URL, dest, "TinyShakespeare", _download_help(dest.parent))


def _download(url: str, dest: Path, what: str, help_text: str) -> None:
    """Fetch a UTF-8 text file to `dest` (atomically); offline, a DataError saying what to fetch by hand."""
    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:
            data = response.read()
        if not data:
            raise ValueError("the server sent an empty file")
        data.decode("utf-8")  # refuse to save an error page in some other encoding
    except Exception as e:  # offline, DNS, timeout, HTTP error, truncated body: all mean "fetch it by hand"
        reason = getattr(e, "reason", None) or e
        raise DataError(f"could not download {what} from {url}: {reason} (no network?).\n{help_text}") from None
    try:
        atomic_write_bytes(dest, data)
    except OSError as e:
        raise DataError(f"cannot write {dest}: {e.strerror or e}") from None


def prepare_tinyshakespeare(out_dir: str | os.PathLike, input_path: str | os.PathLike | None = None) -> PreparedDataset:
    """Tokenize TinyShakespeare into out_dir/tinyshakespeare_{val,train}.bin (val = first 32,768 tokens).

    Without `input_path`, uses out_dir/input.txt, downloading it first if it is not there
    (raises DataError saying what to fetch when offline).
    """
    out = _make_out_dir(out_dir)
    if input_path is None:
        input_path = out / "input.txt"
        if not input_path.exists():
            _download_tinyshakespeare(input_path)
    text = _read_text(input_path, "TinyShakespeare input")
    tokens = tokenize_sections(_document_sections(text))
    n_val = _num_val_tokens(tokens.size, DEFAULT_VAL_TOKENS, f"TinyShakespeare input {input_path}")
    return _write_splits(out, "tinyshakespeare", tokens, n_val)


# ----------------------------------------------------------------------------
# the user's own text files


def prepare_text(
    out_dir: str | os.PathLike,
    files: Sequence[str | os.PathLike],
    name: str = "text",
    val_tokens: int | float = DEFAULT_VAL_TOKENS,
) -> PreparedDataset:
    """Tokenize UTF-8 text files (in the given order) into out_dir/{name}_{val,train}.bin.

    Each file is a document: its sections get TinyShakespeare's treatment and its last
    section gets no "\\n\\n". val_tokens: a count (capped at 10% of the corpus) or a fraction.
    """
    if isinstance(files, (str, os.PathLike)):
        files = [files]
    if not files:
        raise DataError("prepare_text: no input files given")
    if not name or os.sep in name or (os.altsep and os.altsep in name) or glob.has_magic(name):
        raise ValueError(f"dataset name must be a plain file-name prefix, got {name!r}")
    texts = []
    for path in files:
        text = _read_text(path)
        if not text:
            raise DataError(f"input file {path} is empty")
        texts.append(text)
    out = _make_out_dir(out_dir)
    tokens = tokenize_sections(section for text in texts for section in _document_sections(text))
    source = f"the corpus of {len(texts)} file(s) ({', '.join(str(p) for p in files[:3])}{', ...' if len(files) > 3 else ''})"
    n_val = _num_val_tokens(tokens.size, val_tokens, source)
    return _write_splits(out, name, tokens, n_val)


# ----------------------------------------------------------------------------
# default offline corpus: docstrings of the Python standard library

# Tests and the IDLE GUI are code-heavy; installed third-party packages would make the
# corpus depend on the environment instead of just the Python version.
_SKIP_DIRS = {"test", "tests", "idle_test", "idlelib", "site-packages", "dist-packages", "__pycache__"}
_DOC_NODES = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def _stdlib_files(root: Path) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        # Sorting in place fixes os.walk's order, which otherwise follows the file system.
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        for filename in sorted(filenames):
            if filename.endswith(".py"):
                yield Path(dirpath) / filename


def _file_docstrings(path: Path) -> Iterator[str]:
    """Module, class and function docstrings of one file, in source order (nothing if it does not parse)."""
    try:
        source = path.read_bytes()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # invalid escape sequences etc. in old modules
            tree = ast.parse(source, filename=str(path))  # bytes: honours PEP 263 coding lines
    except (OSError, SyntaxError, ValueError, UnicodeDecodeError, RecursionError, MemoryError):
        return
    # Explicit stack instead of recursion: long expressions nest deeper than the recursion limit.
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, _DOC_NODES):
            doc = ast.get_docstring(node, clean=True)
            if doc and doc.strip():
                yield doc.strip()
        stack.extend(reversed(list(ast.iter_child_nodes(node))))


def _pydoc_topics() -> Iterator[str]:
    """The language-reference help texts of pydoc_data.topics (part of the standard library)."""
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions strip it
        return
    for key in sorted(topics):
        if topics[key].strip():
            yield topics[key].strip()


def _joined_sections(docs: Iterable[str]) -> Iterator[str]:
    """Sections of "\\n\\n".join(docs), lazily; docs are stripped so joins add no extra splits."""
    previous: str | None = None
    for doc in docs:
        if previous is not None:
            yield from (p + "\n\n" for p in previous.split("\n\n"))
        previous = doc
    if previous is not None:
        yield from _document_sections(previous)


def prepare_default_corpus(
    out_dir: str | os.PathLike,
    max_tokens: int = DEFAULT_CORPUS_MAX_TOKENS,
    val_tokens: int | float = DEFAULT_VAL_TOKENS,
) -> PreparedDataset:
    """Offline corpus "pydocs": Python standard-library docstrings -> out_dir/pydocs_{val,train}.bin.

    Docstrings of every stdlib .py file (sorted walk; tests, idlelib, site-packages skipped),
    then the pydoc_data help topics, joined with blank lines and tokenized like TinyShakespeare;
    at most `max_tokens` tokens. Identical output for the same Python version.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise DataError(f"Python standard library folder {root} not found; cannot build the default corpus")
    docs = (doc for path in _stdlib_files(root) for doc in _file_docstrings(path))
    sections = _joined_sections(itertools.chain(docs, _pydoc_topics()))
    tokens = tokenize_sections(sections, max_tokens=max_tokens)
    n_val = _num_val_tokens(tokens.size, val_tokens, f"the standard-library docstring corpus from {root}")
    return _write_splits(_make_out_dir(out_dir), "pydocs", tokens, n_val)


# ----------------------------------------------------------------------------
# finding prepared datasets


def _prepared(data_dir: Path, name: str) -> PreparedDataset | None:
    """NAME_{train,val}.bin, else the shards NAME_{train,val}_NNNNNN.bin of `prepare text FOLDER`."""
    single = [data_dir / f"{name}_{split}.bin" for split in ("train", "val")]
    if all(path.is_file() for path in single):
        patterns, shards = [_shard_pattern(data_dir, name, split) for split in ("train", "val")], [[p] for p in single]
    else:
        patterns = _sharded_patterns(data_dir, name)
        shards = [sorted(glob.glob(pattern)) for pattern in patterns]
    if not all(shards):
        return None
    try:
        num_train, num_val = (sum(read_shard_header(path) for path in paths) for paths in shards)
    except FormatError as e:
        raise DataError(f"{e}; delete it and prepare the dataset again (llmpy prepare ...)") from None
    return PreparedDataset(name, patterns[0], patterns[1], num_train, num_val)


def _sharded_patterns(out_dir: Path, name: str) -> list[str]:
    return [os.path.join(glob.escape(str(out_dir)), f"{name}_{split}_[0-9]*.bin") for split in ("train", "val")]


_TRAIN_FILE = re.compile(r"^(.+)_train(?:_\d+)?\.bin$")


def find_dataset(data_dir: str | os.PathLike) -> PreparedDataset | None:
    """The prepared dataset in data_dir: tinyshakespeare, else text, else pydocs, else any other
    NAME_train.bin / NAME_val.bin pair or NAME_{train,val}_NNNNNN.bin shards (alphabetical); None if there is none."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        return None
    others = sorted({m.group(1) for p in data_dir.glob("*_train*.bin") if (m := _TRAIN_FILE.match(p.name))})
    for name in list(KNOWN_DATASETS) + [n for n in others if n and n not in KNOWN_DATASETS]:
        found = _prepared(data_dir, name)
        if found is not None:
            return found
    return None


# ----------------------------------------------------------------------------
# a folder of documents, sharded as llm.c's fineweb.py / tinystories.py shard

DOCUMENT_SUFFIXES = (".txt", ".jsonl", ".parquet")
DEFAULT_SHARD_TOKENS = 100_000_000  # fineweb.py's shard size


def _folder_files(folder: Path) -> list[Path]:
    """The folder's .txt / .jsonl / .parquet files, recursively, sorted by path (a fixed order)."""
    if not folder.is_dir():
        raise DataError(f"input folder {folder} not found or not a folder")
    files = sorted((p for p in folder.rglob("*") if p.suffix in DOCUMENT_SUFFIXES and p.is_file()),
                   key=lambda p: p.relative_to(folder).as_posix())
    if not files:
        raise DataError(f"input folder {folder} holds no .txt, .jsonl or .parquet files")
    return files


def _jsonl_records(path: Path) -> Iterator[dict]:
    """The JSON objects of a .jsonl file, one a line (blank lines skipped)."""
    import json

    try:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except ValueError as e:
                    raise DataError(f"{path}: line {number}: not JSON ({e})") from None
                if not isinstance(record, dict):
                    raise DataError(f"{path}: line {number}: not a JSON object")
                yield record
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at offset {e.start})") from None
    except FileNotFoundError:
        raise DataError(f"input file {path} not found") from None
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None


def _jsonl_documents(path: Path, field: str) -> Iterator[str]:
    for number, record in enumerate(_jsonl_records(path), 1):
        text = record.get(field)
        if not isinstance(text, str):
            raise DataError(f"{path}: record {number}: no {field!r} field with a string")
        yield text


def _parquet_documents(path: Path, field: str) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading .parquet files needs pyarrow: pip install pyarrow") from None
    try:
        table = pq.ParquetFile(path)
        if field not in table.schema_arrow.names:
            raise DataError(f"{path}: no {field!r} column (columns: {', '.join(table.schema_arrow.names)})")
        for batch in table.iter_batches(columns=[field]):
            yield from (text for text in batch.column(0).to_pylist() if text is not None)
    except (OSError, ValueError) as e:  # pyarrow's errors derive from these
        raise DataError(f"{path}: cannot read the parquet file ({e})") from None


def folder_documents(files: Sequence[Path], field: str = "text") -> Iterator[str]:
    """Every document of the files in order: a .txt file is one, a .jsonl line or a parquet row one each."""
    for path in files:
        if path.suffix == ".txt":
            yield _read_text(path)
        elif path.suffix == ".jsonl":
            yield from _jsonl_documents(path, field)
        else:
            yield from _parquet_documents(path, field)


class _ShardWriter:
    """Tokens into shards of exactly `size` tokens (the last one shorter): shard 0 is validation, the rest
    training, named as fineweb.py names them (NAME_val_000000.bin, NAME_train_000001.bin, ...)."""

    def __init__(self, out: Path, name: str, size: int):
        self.out, self.name, self.size = out, name, size
        self.buffer = np.empty(size, dtype=np.uint16)
        self.filled, self.index, self.written = 0, 0, []

    def add(self, tokens: np.ndarray) -> None:
        while tokens.size:
            take = min(tokens.size, self.size - self.filled)
            self.buffer[self.filled:self.filled + take] = tokens[:take]
            self.filled += take
            tokens = tokens[take:]
            if self.filled == self.size:
                self.flush()

    def flush(self) -> None:
        if not self.filled:
            return
        split = "val" if self.index == 0 else "train"
        path = self.out / f"{self.name}_{split}_{self.index:06d}.bin"
        try:
            write_shard(path, self.buffer[:self.filled])
        except OSError as e:
            raise DataError(f"cannot write {path}: {e.strerror or e}") from None
        self.written.append(self.filled)
        self.index, self.filled = self.index + 1, 0


def prepare_folder(out_dir: str | os.PathLike, folder: str | os.PathLike, name: str = "text",
                   shard_size: int = DEFAULT_SHARD_TOKENS, progress: bool = True) -> PreparedDataset:
    """Tokenize every document of `folder` (see `folder_documents`) as fineweb.py does (<|endoftext|>, then
    the document's ordinary GPT-2 encoding) into shards of `shard_size` tokens in out_dir, with a progress
    bar (tokens) when `progress` and stderr is a terminal."""
    from tqdm import tqdm

    if shard_size < MIN_SPLIT_TOKENS:
        raise OptionError("shard_size", shard_size, f"is too small: a shard needs at least {MIN_SPLIT_TOKENS} tokens")
    if not name or os.sep in name or glob.has_magic(name):
        raise ValueError(f"dataset name must be a plain file-name prefix, got {name!r}")
    files = _folder_files(Path(folder))
    writer = _ShardWriter(_make_out_dir(out_dir), name, shard_size)
    encoding = gpt2_encoding()
    with tqdm(unit="tok", unit_scale=True, desc=f"{name}: {len(files)} files", disable=None if progress else True,
              leave=False) as bar:
        for document in folder_documents(files):
            tokens = np.array([GPT2_EOT_TOKEN, *encoding.encode_ordinary(document)], dtype=np.uint16)
            writer.add(tokens)
            bar.update(tokens.size)
    writer.flush()
    if len(writer.written) < 2:
        raise DataError(f"{folder}: {sum(writer.written)} tokens make one shard of at most {shard_size} tokens, "
                        "the validation shard; training needs a second one: give a smaller shard size")
    train, val = _sharded_patterns(Path(out_dir), name)
    return PreparedDataset(name, train, val, sum(writer.written[1:]), writer.written[0])


# ----------------------------------------------------------------------------
# HellaSwag, as llm.c's dev/data/hellaswag.py renders it into its eval file

HELLASWAG_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"


def hellaswag_examples(path: Path) -> list:
    """EvalExamples of a HellaSwag jsonl: the context `ctx` encoded, each ending encoded with a leading space."""
    from llmpy.io.evalfile import EvalExample

    encoding = gpt2_encoding()
    examples = []
    for number, text in enumerate(_jsonl_records(path), 1):
        try:
            label, ctx, endings = int(text["label"]), text["ctx"], text["endings"]
            completions = [encoding.encode_ordinary(" " + end) for end in endings]
            examples.append(EvalExample(label, encoding.encode_ordinary(ctx), completions))
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"{path}: example {number}: not a HellaSwag record with label, ctx and endings ({e})") from None
    if not examples:
        raise DataError(f"{path}: no examples")
    return examples


def prepare_hellaswag(out_dir: str | os.PathLike, input_path: str | os.PathLike | None = None) -> tuple[Path, int]:
    """out_dir/hellaswag_val.bin (llm.c's eval file) from the HellaSwag validation jsonl; without `input_path`
    out_dir/hellaswag_val.jsonl, downloaded first when it is not there. Returns (path, number of examples)."""
    from llmpy.io.evalfile import write_eval_file

    out = _make_out_dir(out_dir)
    if input_path is None:
        input_path = out / "hellaswag_val.jsonl"
        if not input_path.exists():
            _download(HELLASWAG_URL, input_path, "HellaSwag",
                      f"On a machine with internet access fetch {HELLASWAG_URL}, copy it here and run:\n"
                      "    llmpy prepare hellaswag --input /path/to/hellaswag_val.jsonl")
    examples = hellaswag_examples(Path(input_path))
    target = out / "hellaswag_val.bin"
    try:
        write_eval_file(target, examples)
    except ValueError as e:
        raise DataError(f"{input_path}: {e}") from None
    except OSError as e:
        raise DataError(f"cannot write {target}: {e.strerror or e}") from None
    return target, len(examples)
