"""The shipped corpus, byte-level tokens, and a resumable packed-batch iterator.

Documents (the corpus's blank-line separated paragraphs) become
[BOS] + bytes + [EOS] and are concatenated into one token stream, cut into rows
of seq_len + 1 tokens. Each row gives tokens = row[:-1], targets = row[1:],
segment ids (a new id at every BOS, so packed documents do not attend to each
other), positions that restart per document, and PAD targets where a target
belongs to the next document. Row order is a seeded permutation per epoch, and
the iterator's whole state is its position: restoring it neither repeats nor
skips a batch.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import pathlib

import numpy as np

from pallax.model.config import BOS, EOS, PAD

# Public domain (see pallax/model/corpus/README.md).
CORPUS = pathlib.Path(__file__).parent / "corpus" / "jargon-4.4.7-excerpt.txt.gz"


@functools.cache
def load_corpus() -> bytes:
    return gzip.decompress(CORPUS.read_bytes())


def encode(text: bytes | str) -> np.ndarray:
    data = text.encode() if isinstance(text, str) else text
    return np.frombuffer(data, np.uint8).astype(np.int32)


def decode(tokens) -> str:
    data = bytes(int(t) for t in np.asarray(tokens).reshape(-1) if 0 <= int(t) < 256)
    return data.decode("utf-8", errors="replace")


def token_stream(corpus: bytes) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, document index) of the whole corpus."""
    docs = [d.strip() for d in corpus.split(b"\n\n") if d.strip()]
    tokens = np.concatenate([np.concatenate([[BOS], encode(d), [EOS]]) for d in docs])
    lengths = np.array([len(d) + 2 for d in docs])
    return tokens.astype(np.int32), np.repeat(np.arange(len(docs)), lengths).astype(np.int32)


@dataclasses.dataclass(frozen=True)
class PackedRows:
    """All rows of the corpus at one sequence length."""

    tokens: np.ndarray  # [R, L + 1]
    documents: np.ndarray  # [R, L + 1]

    @classmethod
    def build(cls, seq_len: int, corpus: bytes | None = None) -> PackedRows:
        tokens, docs = token_stream(load_corpus() if corpus is None else corpus)
        rows = len(tokens) // (seq_len + 1)
        if rows == 0:
            raise ValueError(f"corpus of {len(tokens)} tokens is shorter than seq_len + 1")
        cut = rows * (seq_len + 1)
        return cls(tokens[:cut].reshape(rows, -1), docs[:cut].reshape(rows, -1))

    def batch(self, row_ids: np.ndarray) -> dict[str, np.ndarray]:
        tokens, docs = self.tokens[row_ids], self.documents[row_ids]
        inputs, targets = tokens[:, :-1], tokens[:, 1:].copy()
        same_doc = docs[:, 1:] == docs[:, :-1]
        targets[~same_doc] = PAD
        # Segment ids restart at 0 in each row; positions restart at each document.
        segment = docs[:, :-1] - docs[:, :1]
        starts = np.concatenate(
            [np.ones((len(row_ids), 1), bool), segment[:, 1:] != segment[:, :-1]], axis=1
        )
        index = np.arange(inputs.shape[1])[None, :]
        last_start = np.maximum.accumulate(np.where(starts, index, 0), axis=1)
        return {
            "tokens": inputs,
            "targets": targets,
            "segment_ids": segment.astype(np.int32),
            "positions": (index - last_start).astype(np.int32),
        }


@dataclasses.dataclass
class DataIterator:
    """Batches of ``batch_size`` rows; ``position`` (batches served) is the whole state."""

    rows: PackedRows
    batch_size: int
    seed: int = 0
    position: int = 0

    def __post_init__(self):
        if self.batch_size > len(self.rows.tokens):
            raise ValueError(
                f"batch_size={self.batch_size} exceeds the {len(self.rows.tokens)} "
                "rows of the corpus at this sequence length"
            )

    @property
    def batches_per_epoch(self) -> int:
        return len(self.rows.tokens) // self.batch_size

    def __next__(self) -> dict[str, np.ndarray]:
        epoch, index = divmod(self.position, self.batches_per_epoch)
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.rows.tokens))
        self.position += 1
        return self.rows.batch(order[index * self.batch_size : (index + 1) * self.batch_size])

    def __iter__(self):
        return self

    def state(self) -> dict[str, int]:
        return {"position": self.position, "seed": self.seed}

    def restore(self, state: dict[str, int]) -> None:
        self.position, self.seed = int(state["position"]), int(state["seed"])
