"""Training data: documents in, fixed-length token chunks out.

Sources (a list; each entry is one of):

- a local file: ``.txt`` / ``.md`` (one document per file), ``.jsonl`` / ``.json`` (one document per record, text in
  ``text_field``), ``.parquet`` (column ``text_field``; needs pyarrow);
- a local folder: every such file inside it (recursively, sorted), or a dataset saved with ``datasets``'
  ``save_to_disk``;
- ``builtin:pydoc`` (or ``builtin``) / ``builtin:stdlib``: offline corpora shipped with Python itself (for smoke
  runs), the same text the evaluation reads (:mod:`hf_rope_ext.text` defines them and reads every file type);
- anything else: a ``datasets`` dataset name for ``datasets.load_dataset`` (needs ``pip install datasets``).

Documents are tokenised once, joined with the end-of-sequence token and cached as one flat token stream
(``cache_dir/tokens-<hash>.pt``, keyed by the tokenizer and the sources' paths, sizes and modification times); packing
into chunks of any length is then a reshape.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .. import text

logger = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".md", ".text", ".rst")
RECORD_SUFFIXES = (".jsonl", ".json", ".parquet")
FILE_SUFFIXES = TEXT_SUFFIXES + RECORD_SUFFIXES
_CACHE_VERSION = 2  # 2: built-in corpora read as hf_rope_ext.text defines them (as the evaluation does)


def default_cache_dir() -> Path:
    """``$HF_ROPE_EXT_CACHE`` or ``~/.cache/hf_rope_ext/tokens``."""
    env = os.environ.get("HF_ROPE_EXT_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "hf_rope_ext" / "tokens"


# --------------------------------------------------------------------------------------------------------------------
# sources


@dataclass(frozen=True)
class Source:
    """One resolved data source."""

    kind: str
    """"file", "saved_dataset", "builtin" or "hub" (a ``datasets`` name)."""
    location: str
    """Absolute path, canonical built-in name (``builtin:pydoc``) or dataset name."""


_PREFIXED = re.compile(r"^[A-Za-z][\w.+-]+:(?!//)")
"""``word:rest`` (two letters or more, not ``C:\\`` or a URL): a source prefix; only ``builtin:`` exists."""


def resolve_sources(entries: list[str]) -> list[Source]:
    """Check every entry and expand folders; raises ``FileNotFoundError`` / ``ValueError`` with what to fix."""
    if not entries:
        raise ValueError("no data given: set data to one or more files, folders, dataset names or builtin:pydoc")
    sources: list[Source] = []
    for entry in entries:
        if not isinstance(entry, str) or not entry.strip():
            raise ValueError(f"data entries must be non-empty strings, got {entry!r}")
        builtin = text.builtin_source(entry)  # an unknown builtin:... name is refused, naming the valid ones
        if builtin is not None:
            sources.append(Source("builtin", builtin))
            continue
        path = Path(entry).expanduser()
        if path.is_dir():
            if text.is_saved_dataset(path):
                sources.append(Source("saved_dataset", str(path.resolve())))
                continue
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in FILE_SUFFIXES)
            if not files:
                raise FileNotFoundError(f"data folder {entry} holds no {', '.join(FILE_SUFFIXES)} files")
            sources.extend(Source("file", str(p.resolve())) for p in files)
        elif path.is_file():
            if path.suffix.lower() not in FILE_SUFFIXES:
                raise ValueError(f"data file {entry} has an unsupported type; supported: {', '.join(FILE_SUFFIXES)}")
            sources.append(Source("file", str(path.resolve())))
        elif path.suffix.lower() in FILE_SUFFIXES or entry.startswith((".", "/", "~")):
            raise FileNotFoundError(f"data file not found: {entry}")
        elif _PREFIXED.match(entry):  # dataset:NAME, hf:NAME, ...: a Hub id never holds a colon
            prefix, name = entry.split(":", 1)
            raise ValueError(
                f"data entry {entry!r}: {prefix + ':'!r} is not a prefix this recipe knows, and it is not a local "
                f"file or folder. Write a `datasets` name alone (data: [{name.strip() or 'NAME'}], read with "
                "datasets.load_dataset), a path, or builtin:pydoc / builtin:stdlib"
            )
        else:
            sources.append(Source("hub", entry))
    if any(s.kind in ("hub", "saved_dataset") for s in sources):
        if importlib.util.find_spec("datasets") is None:
            names = [s.location for s in sources if s.kind in ("hub", "saved_dataset")]
            raise ValueError(
                f"data {names} is not a local file or folder, so it is read with the `datasets` library, which is not "
                "installed: pip install datasets (or point data at local .txt/.jsonl/.parquet files)"
            )
    if any(s.kind == "file" and s.location.endswith(".parquet") for s in sources):
        if importlib.util.find_spec("pyarrow") is None:
            raise ValueError("reading .parquet data needs pyarrow: pip install pyarrow")
    return sources


def _dataset_documents(source: Source, text_field: str, config: str | None, split: str) -> Iterator[str]:
    import datasets

    if source.kind == "saved_dataset":
        ds = datasets.load_from_disk(source.location)
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise ValueError(f"{source.location}: no split {split!r} (splits: {', '.join(ds)}); set dataset_split")
            ds = ds[split]
    else:
        try:
            ds = datasets.load_dataset(source.location, config, split=split)
        except Exception as err:
            raise ValueError(
                f"could not load dataset {source.location!r} (config {config!r}, split {split!r}): {err}"
            ) from err
    yield from text.dataset_documents(ds, text_field, f"dataset {source.location}")


def iter_documents(
    sources: list[Source], text_field: str = "text", dataset_config: str | None = None, dataset_split: str = "train"
) -> Iterator[str]:
    """Every document of every source, in order."""
    for source in sources:
        if source.kind == "builtin":
            yield from text.builtin_documents(source.location)
        elif source.kind == "file":
            yield from text.file_documents(source.location, text_field, setting="text_field")
        else:
            yield from _dataset_documents(source, text_field, dataset_config, dataset_split)


# --------------------------------------------------------------------------------------------------------------------
# tokenisation + cache


def _tokenizer_fingerprint(tokenizer: Any) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        body = backend.to_str()
    else:
        body = json.dumps(sorted(tokenizer.get_vocab().items()))
    special = {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())}
    return hashlib.sha256((type(tokenizer).__name__ + body + json.dumps(special)).encode()).hexdigest()


def _source_fingerprint(source: Source) -> Any:
    if source.kind == "file":
        stat = Path(source.location).stat()
        return [source.kind, source.location, stat.st_size, stat.st_mtime_ns]
    if source.kind == "builtin":
        return [source.kind, source.location, sys.version]
    if source.kind == "saved_dataset":
        newest = max((p.stat().st_mtime_ns for p in Path(source.location).rglob("*") if p.is_file()), default=0)
        return [source.kind, source.location, newest]
    return [source.kind, source.location]


def cache_key(tokenizer: Any, sources: list[Source], **settings: Any) -> str:
    payload = {
        "version": _CACHE_VERSION,
        "tokenizer": _tokenizer_fingerprint(tokenizer),
        "sources": [_source_fingerprint(s) for s in sources],
        **settings,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:24]


def tokenize_documents(
    documents: Iterator[str],
    tokenizer: Any,
    *,
    separator_id: int | None,
    max_tokens: int | None = None,
    batch_docs: int = 64,
    desc: str = "tokenising",
) -> torch.Tensor:
    """One flat int64 stream ``[n_tokens]``: each document's tokens (no special tokens), then ``separator_id``."""
    pieces: list[torch.Tensor] = []
    total = 0
    batch: list[str] = []
    bar = tqdm(desc=desc, unit=" docs", disable=not logger.isEnabledFor(logging.INFO))

    def flush() -> bool:
        nonlocal total
        if not batch:
            return True
        encoded = tokenizer(batch, add_special_tokens=False)["input_ids"]
        for ids in encoded:
            if separator_id is not None:
                ids = [*ids, separator_id]
            pieces.append(torch.tensor(ids, dtype=torch.int64))
            total += len(ids)
        bar.update(len(batch))
        batch.clear()
        return max_tokens is None or total < max_tokens

    for doc in documents:
        if not doc:
            continue
        batch.append(doc)
        if len(batch) >= batch_docs and not flush():
            break
    else:
        flush()
    bar.close()
    stream = torch.cat(pieces) if pieces else torch.empty(0, dtype=torch.int64)
    return stream[:max_tokens] if max_tokens is not None else stream


def load_token_stream(
    entries: list[str],
    tokenizer: Any,
    *,
    cache_dir: str | os.PathLike | None = None,
    text_field: str = "text",
    dataset_config: str | None = None,
    dataset_split: str = "train",
    max_tokens: int | None = None,
) -> torch.Tensor:
    """Tokenised documents of ``entries`` as one flat stream ``[n_tokens]``, from the cache when possible.

    The end-of-sequence token (or the separator token for encoders) follows each document."""
    sources = resolve_sources(entries)
    separator = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    key = cache_key(
        tokenizer,
        sources,
        text_field=text_field,
        dataset_config=dataset_config,
        dataset_split=dataset_split,
        max_tokens=max_tokens,
        separator=separator,
    )
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = folder / f"tokens-{key}.pt"
    if path.is_file():
        logger.info("tokenised data from cache %s", path)
        return torch.load(path)
    documents = iter_documents(sources, text_field, dataset_config, dataset_split)
    stream = tokenize_documents(documents, tokenizer, separator_id=separator, max_tokens=max_tokens)
    if stream.numel() == 0:
        raise ValueError(f"data {entries} produced no tokens")
    folder.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    torch.save(stream, tmp)
    os.replace(tmp, path)  # atomic: a concurrent reader never sees half a file
    logger.info("tokenised %d tokens from %d source(s) -> cache %s", stream.numel(), len(sources), path)
    return stream


def pack(stream: torch.Tensor, seq_len: int, *, wrap: tuple[int, int] | None = None) -> torch.Tensor:
    """Cut a flat stream into ``[n_chunks, seq_len]`` (the remainder is dropped).

    ``wrap=(first_id, last_id)``: each chunk holds ``seq_len - 2`` stream tokens between these two (BERT's
    [CLS] ... [SEP])."""
    body = seq_len - 2 if wrap else seq_len
    if body < 1:
        raise ValueError(f"seq_len {seq_len} is too short")
    n = stream.numel() // body
    chunks = stream[: n * body].view(n, body)
    if wrap:
        first = torch.full((n, 1), wrap[0], dtype=stream.dtype)
        last = torch.full((n, 1), wrap[1], dtype=stream.dtype)
        chunks = torch.cat([first, chunks, last], dim=1)
    return chunks


# --------------------------------------------------------------------------------------------------------------------
# batches


def sample_indices(n_items: int, start: int, count: int, seed: int) -> list[int]:
    """Items ``start .. start + count - 1`` of an endless stream that visits all ``n_items`` once per epoch, in a new
    seeded random order each epoch. A pure function of its arguments: resuming at any position is exact."""
    if n_items < 1:
        raise ValueError("no training chunks")
    out: list[int] = []
    perms: dict[int, list[int]] = {}
    for i in range(start, start + count):
        epoch, pos = divmod(i, n_items)
        if epoch not in perms:
            g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            perms[epoch] = torch.randperm(n_items, generator=g).tolist()
        out.append(perms[epoch][pos])
    return out


def micro_batch_indices(
    n_items: int, *, step: int, micro: int, grad_accum: int, batch_size: int, world: int, rank: int, seed: int
) -> list[int]:
    """The chunk indices process ``rank`` trains on in micro-batch ``micro`` of optimizer step ``step``.

    Global order: step -> micro-batch -> process -> sample, so every process sees different chunks and the run is
    the same whatever checkpoint it resumed from."""
    global_micro = step * grad_accum + micro
    start = (global_micro * world + rank) * batch_size
    return sample_indices(n_items, start, batch_size, seed)


def mask_for_mlm(
    input_ids: torch.Tensor,
    *,
    mask_token_id: int,
    vocab_size: int,
    special_ids: list[int],
    probability: float = 0.15,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's masking (Devlin et al. 2018): choose ``probability`` of the non-special tokens; of those 80% become
    [MASK], 10% a random token, 10% stay. Returns ``(masked input_ids, labels)`` with labels -100 elsewhere."""
    labels = input_ids.clone()
    chosen = torch.rand(input_ids.shape, generator=generator) < probability
    for sid in special_ids:
        chosen &= input_ids != sid
    if not chosen.any():  # at least one prediction per batch
        chosen.view(-1)[int(torch.argmax((~torch.isin(input_ids, torch.tensor(special_ids))).view(-1).int()))] = True
    labels[~chosen] = -100
    ids = input_ids.clone()
    roll = torch.rand(input_ids.shape, generator=generator)
    ids[chosen & (roll < 0.8)] = mask_token_id
    random_tokens = torch.randint(vocab_size, input_ids.shape, generator=generator)
    replace = chosen & (roll >= 0.8) & (roll < 0.9)
    ids[replace] = random_tokens[replace]
    return ids, labels
