"""Random access to the token stream of each source, read straight from the shards.

A source's *stream* is its training shards concatenated in a seeded order that changes every
epoch, each document followed by one EOS token (the shards store documents without BOS/EOS).
Epochs follow one another, so the stream is infinite. `SourceStream.read(start, length)`
returns any window of it: the layout comes from the manifest's per-shard token and document
counts, and the tokens from memory-mapped slices of the tar files (a tar member's data sits
at a fixed byte offset, and a `.npy` header is padded to 64 bytes, so a block's token array
is a plain aligned array inside the tar). Only the headers of a tar are parsed, once, when a
shard is first touched.

No Ray, no torch: numpy and the shard format module.
"""

from __future__ import annotations

import bisect
import io
import tarfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.lib import format as npy_format

from data_pipeline.shards import ShardFormatError, ShardRecord, decode_array

# Decoded blocks (tokens with EOS inserted, int32) kept per stream: enough for a shuffle window
# of samples spread over many blocks without decoding a block twice (16 MiB).
BLOCK_CACHE_TOKENS = 1 << 22


@dataclass(frozen=True)
class Block:
    """One tar sample: where its token array starts in the file, and its documents."""

    data_offset: int  # byte offset of the tokens array's data inside the tar
    n_tokens: int
    lengths: np.ndarray  # tokens per document

    @property
    def stream_length(self) -> int:
        return self.n_tokens + len(self.lengths)  # one EOS per document


class ShardIndex:
    """The blocks of one shard, found by reading its tar headers (the data is not read)."""

    def __init__(self, path: Path, record: ShardRecord, vocab_size: int | None = None) -> None:
        self.path = path
        self.record = record
        self.vocab_size = vocab_size  # ids at or above it: bytes damaged since the build
        self.dtype = np.dtype(record.dtype)
        self.blocks = self._scan()
        tokens = sum(block.n_tokens for block in self.blocks)
        documents = sum(len(block.lengths) for block in self.blocks)
        if (tokens, documents) != (record.tokens, record.documents):
            raise ShardFormatError(
                f"{path}: holds {tokens} tokens in {documents} documents, the manifest says "
                f"{record.tokens} in {record.documents}"
            )
        self.starts = np.cumsum([0] + [block.stream_length for block in self.blocks])
        self._data: np.ndarray | None = None

    def _scan(self) -> list[Block]:
        pending: dict[str, dict[str, object]] = {}
        blocks: list[Block] = []
        try:
            with tarfile.open(self.path, "r:") as archive:
                for member in archive:
                    key, _, suffix = member.name.partition(".")
                    entry = pending.setdefault(key, {})
                    if suffix == "tokens.npy":
                        entry["tokens"] = self._array_location(archive, member)
                    elif suffix == "lengths.npy":
                        handle = archive.extractfile(member)
                        data = handle.read() if handle else b""
                        entry["lengths"] = decode_array(data, f"{self.path}:{member.name}")
                    else:
                        raise ShardFormatError(f"{self.path}: unexpected member {member.name}")
                    if "tokens" in entry and "lengths" in entry:
                        offset, count = entry["tokens"]  # type: ignore[misc]
                        lengths = np.asarray(entry["lengths"], dtype=np.int64)
                        if int(lengths.sum()) != count:
                            raise ShardFormatError(
                                f"{self.path}: sample {key} lengths do not add up to its tokens"
                            )
                        blocks.append(Block(offset, count, lengths))
                        del pending[key]
        except (tarfile.TarError, OSError, EOFError) as error:
            raise ShardFormatError(
                f"{self.path}: unreadable or truncated shard ({error})"
            ) from error
        if pending:
            raise ShardFormatError(f"{self.path}: incomplete samples {sorted(pending)}")
        return blocks

    def _array_location(self, archive: tarfile.TarFile, member: tarfile.TarInfo) -> tuple[int, int]:
        """(byte offset of the array data, element count) of a 1-D `.npy` member."""
        handle = archive.fileobj
        assert handle is not None
        handle.seek(member.offset_data)
        header = io.BytesIO(handle.read(min(member.size, 4096)))
        try:
            version = npy_format.read_magic(header)
            read_header = (
                npy_format.read_array_header_1_0
                if version == (1, 0)
                else npy_format.read_array_header_2_0
            )
            shape, fortran, dtype = read_header(header)
        except Exception as error:  # numpy parses the header as a Python literal: a damaged one
            # raises ValueError, SyntaxError or tokenize.TokenError, among others
            raise ShardFormatError(
                f"{self.path}:{member.name}: not a numpy array ({type(error).__name__})"
            ) from error
        if len(shape) != 1 or dtype != self.dtype or fortran:
            raise ShardFormatError(
                f"{self.path}:{member.name}: expected a 1-D {self.dtype} array, got {dtype} {shape}"
            )
        size = shape[0] * dtype.itemsize
        if header.tell() + size != member.size:
            raise ShardFormatError(f"{self.path}:{member.name}: truncated array")
        return member.offset_data + header.tell(), shape[0]

    def block_stream(self, index: int, eos: int) -> np.ndarray:
        """Block `index` as stream tokens: its documents, each followed by EOS (int32)."""
        if self._data is None:
            self._data = np.memmap(self.path, dtype=np.uint8, mode="r")
        block = self.blocks[index]
        raw = self._data[
            block.data_offset : block.data_offset + block.n_tokens * self.dtype.itemsize
        ]
        if raw.size != block.n_tokens * self.dtype.itemsize:
            raise ShardFormatError(f"{self.path}: truncated shard (block {index})")
        tokens = raw.view(self.dtype).astype(np.int32)
        if self.vocab_size is not None and tokens.size and int(tokens.max()) >= self.vocab_size:
            # flipped bytes the manifest's sizes cannot see (data.verify=shard compares sha256s
            # before training): an id past the embedding table, or garbage trained on
            raise ShardFormatError(
                f"{self.path}: block {index} holds token id {int(tokens.max())}, beyond the "
                f"tokenizer's {self.vocab_size} (a damaged shard; data.verify=shard finds it "
                "before training)"
            )
        ends = np.cumsum(block.lengths)  # where each document ends
        return np.insert(tokens, ends, eos)


class SourceStream:
    """The infinite token stream of one source (see the module docstring)."""

    def __init__(
        self,
        out_dir: Path,
        name: str,
        shards: list[ShardRecord],
        eos: int,
        seed: int,
        vocab_size: int | None = None,
    ) -> None:
        if not shards:
            raise ShardFormatError(f"source {name!r} has no training shards")
        self.out_dir = Path(out_dir)
        self.name = name
        self.shards = shards
        self.eos = eos
        self.seed = seed
        self.vocab_size = vocab_size
        self.shard_lengths = np.array([s.tokens + s.documents for s in shards], dtype=np.int64)
        self.epoch_length = int(self.shard_lengths.sum())
        self._orders: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._indexes: dict[int, ShardIndex] = {}
        self._blocks: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._cached_tokens = 0
        # stream position -> (end, tokens) of the cached blocks, for reads that hit one
        self._spans: OrderedDict[int, tuple[int, np.ndarray]] = OrderedDict()
        self._span_starts: list[int] = []

    def index(self, shard: int) -> ShardIndex:
        if shard not in self._indexes:
            record = self.shards[shard]
            self._indexes[shard] = ShardIndex(self.out_dir / record.path, record,
                                              self.vocab_size)  # fmt: skip
        return self._indexes[shard]

    def order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(shard order, stream start of each position in that order) for one epoch."""
        if epoch not in self._orders:
            rng = np.random.default_rng([self.seed, _stable_hash(self.name), epoch])
            order = rng.permutation(len(self.shards))
            starts = np.concatenate([[0], np.cumsum(self.shard_lengths[order])])
            self._orders[epoch] = (order, starts)
            while len(self._orders) > 4:
                self._orders.popitem(last=False)
        return self._orders[epoch]

    def read(self, start: int, length: int) -> np.ndarray:
        """Stream tokens [start, start + length) (int32; a view when they lie in one block)."""
        # the common case: inside one block read before (samples of a shuffle window come
        # from a few consecutive blocks)
        slot = bisect.bisect_right(self._span_starts, start) - 1
        if slot >= 0:
            span_start = self._span_starts[slot]
            span_end, tokens = self._spans[span_start]
            if start + length <= span_end:
                return tokens[start - span_start : start - span_start + length]
        parts = []
        position, end = start, start + length
        while position < end:
            epoch, offset = divmod(position, self.epoch_length)
            order, starts = self.order(epoch)
            slot = int(np.searchsorted(starts, offset, side="right")) - 1
            shard = int(order[slot])
            within = offset - int(starts[slot])
            take = min(end - position, int(self.shard_lengths[shard]) - within)
            parts.append(self._read_shard(shard, within, take, position - within))
            position += take
        return np.concatenate(parts) if len(parts) > 1 else parts[0]

    def _read_shard(self, shard: int, start: int, length: int, shard_start: int) -> np.ndarray:
        """Tokens [start, start + length) of a shard that begins at stream position
        `shard_start` in the current epoch."""
        index = self.index(shard)
        parts = []
        block = int(np.searchsorted(index.starts, start, side="right")) - 1
        position, end = start, start + length
        while position < end:
            tokens = self._block(shard, block)
            block_start = int(index.starts[block])
            offset = position - block_start
            absolute = shard_start + block_start  # where the block sits in the whole stream
            if absolute not in self._spans:
                self._spans[absolute] = (absolute + tokens.size, tokens)
                while len(self._spans) > len(self._blocks):
                    self._spans.popitem(last=False)
                self._span_starts = sorted(self._spans)
            piece = tokens[offset : offset + end - position]
            parts.append(piece)
            position += piece.size
            block += 1
        return np.concatenate(parts) if len(parts) > 1 else parts[0]

    def _block(self, shard: int, block: int) -> np.ndarray:
        key = (shard, block)
        tokens = self._blocks.get(key)
        if tokens is None:
            tokens = self.index(shard).block_stream(block, self.eos)
            self._blocks[key] = tokens
            self._cached_tokens += tokens.size
            while self._cached_tokens > BLOCK_CACHE_TOKENS and len(self._blocks) > 1:
                self._cached_tokens -= self._blocks.popitem(last=False)[1].size
        else:
            self._blocks.move_to_end(key)
        return tokens


def _stable_hash(text: str) -> int:
    """A process-independent 32-bit hash (Python's `hash` of a str is salted per process)."""
    import zlib

    return zlib.crc32(text.encode())
