"""The keyword side of the hybrid index: BM25 with ``bm25s``, filters as a mask.

Why bm25s and not Qdrant sparse vectors with ``Modifier.IDF``: measured by
``bench/rag_keyword_side.py`` on both dev sets (the table is in
:mod:`conclave.rag.index`).  Both score BM25 over the same tokens, so quality
is identical; but Qdrant's embedded local mode (the default
deployment) scores a sparse query with a Python loop over every stored
point, so its latency grows by milliseconds per thousand chunks, while bm25s
scores a CSC matrix with numpy.  bm25s has no incremental update, so the side
is rebuilt from stored token ids on each sync (no re-tokenising, a few seconds
at 100k chunks), which is cheaper than what it saves on every query.

Tokens: lower-cased words of two or more characters, English stop words
removed, Snowball-stemmed when PyStemmer is installed; identifiers are also
split at underscores and camelCase humps (``get_terminal_size`` gives
``get_terminal_size``, ``get``, ``terminal``, ``size``) so code and prose meet.
The tokenizer's name is stored with the index: one built with another
tokenizer is rebuilt from the chunk texts rather than queried with
mismatched tokens.

Filters restrict BM25 *before* ranking: the filter becomes a 0/1 weight per
chunk, multiplied into the scores, and only positive scores are ranked.  The
conditions are the ones :meth:`conclave.rag.types.Filter.matches` defines,
evaluated over per-document columns (source, content type, language, tags,
modified time) and an inverted list of heading-path prefixes.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from conclave.rag.types import Chunk, Filter

__all__ = ["DocRow", "KeywordSide", "Tokenizer", "heading_key"]

FORMAT = 1
_WORD = re.compile(r"(?u)\b\w\w+\b")
_HUMP = re.compile(r"[A-Z]?[a-z]+|[A-Z]+(?![a-z])|\d+")


def heading_key(path: Sequence[str]) -> str:
    """One string per heading-path prefix: JSON, so no separator can collide with a title."""
    return json.dumps(list(path), ensure_ascii=False, separators=(",", ":"))


class Tokenizer:
    """Words for BM25; see the module docstring."""

    def __init__(self) -> None:
        from bm25s.stopwords import STOPWORDS_EN

        self.stopwords = frozenset(STOPWORDS_EN)
        try:
            import Stemmer

            self._stemmer: Any = Stemmer.Stemmer("english")
            self.name = "words-en-snowball-v1"
        except ImportError:  # pragma: no cover - PyStemmer is a dependency
            self._stemmer = None
            self.name = "words-en-v1"
        self._stem = lru_cache(maxsize=200_000)(self._stem_one)

    def _stem_one(self, word: str) -> str:
        return self._stemmer.stemWord(word) if self._stemmer is not None else word

    def __call__(self, text: str) -> list[str]:
        out: list[str] = []
        for raw in _WORD.findall(text):
            parts = [raw]
            if "_" in raw or (not raw.islower() and not raw.isupper()):
                pieces = [p for seg in raw.split("_") for p in _HUMP.findall(seg)]
                if len(pieces) > 1:
                    parts += pieces
            for part in parts:
                word = part.lower()
                if len(word) < 2 or word in self.stopwords:
                    continue
                out.append(self._stem(word))
        return out


@dataclass
class DocRow:
    """The per-document columns a filter reads."""

    doc_id: str
    source: str
    content_type: str
    language: str | None
    tags: list[str]
    #: epoch seconds (naive datetimes taken as UTC), None when unknown
    modified: float | None

    def to_json(self) -> list[Any]:
        return [self.doc_id, self.source, self.content_type, self.language, self.tags,
                self.modified]

    @classmethod
    def from_json(cls, row: list[Any]) -> DocRow:
        return cls(*row)


def epoch(dt: Any) -> float | None:
    """A datetime as epoch seconds; naive ones are read as UTC (on both retrieval sides)."""
    if dt is None:
        return None
    from datetime import UTC

    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()


def doc_row(chunk: Chunk) -> DocRow:
    m = chunk.metadata
    return DocRow(chunk.doc_id, m.source, m.content_type, m.language, list(m.tags),
                  epoch(m.modified))


def row_matches(f: Filter, row: DocRow, sources: set[str] | None) -> bool:
    """The document-level conditions of ``f`` (everything but the heading prefix)."""
    if f.modified_after is not None and (row.modified is None
                                         or row.modified < epoch(f.modified_after)):
        return False
    if f.modified_before is not None and (row.modified is None
                                          or row.modified >= epoch(f.modified_before)):
        return False
    if f.tags_any and not set(f.tags_any) & set(row.tags):
        return False
    if f.content_types and row.content_type not in f.content_types:
        return False
    if f.languages and row.language not in f.languages:
        return False
    if f.path_prefix:
        return row.source in sources if sources is not None else row.source.startswith(
            f.path_prefix)
    return True


@dataclass
class KeywordSide:
    """An immutable BM25 index over the live chunks; :meth:`rebuilt` makes the next one."""

    tokenizer_name: str
    chunk_ids: list[str] = field(default_factory=list)
    #: position -> row in ``docs``
    doc_of: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int32))
    docs: list[DocRow] = field(default_factory=list)
    #: heading keys of each position (all prefixes of its heading path)
    headings: list[list[str]] = field(default_factory=list)
    #: token ids of all positions, flat, and where each position starts
    tokens: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int32))
    offsets: np.ndarray = field(default_factory=lambda: np.zeros(1, dtype=np.int64))
    vocab: dict[str, int] = field(default_factory=dict)
    k1: float = 1.2
    b: float = 0.75

    def __post_init__(self) -> None:
        self._pos = {cid: i for i, cid in enumerate(self.chunk_ids)}
        self._heading_index: dict[str, np.ndarray] = {}
        lists: dict[str, list[int]] = {}
        for i, keys in enumerate(self.headings):
            for key in keys:
                lists.setdefault(key, []).append(i)
        self._heading_index = {k: np.asarray(v, dtype=np.int64) for k, v in lists.items()}
        self._bm25 = self._build() if self.chunk_ids and self.vocab else None
        self._idf = self._idfs()

    def __len__(self) -> int:
        return len(self.chunk_ids)

    # -- building ------------------------------------------------------------------------

    def _build(self) -> Any:
        import bm25s

        token_lists = [part.tolist() for part in np.split(self.tokens, self.offsets[1:-1])]
        bm25 = bm25s.BM25(k1=self.k1, b=self.b)
        bm25.index((token_lists, dict(self.vocab)), create_empty_token=False,
                   show_progress=False)
        return bm25

    def _idfs(self) -> np.ndarray:
        """BM25 (Lucene) IDF of every vocabulary id, as bm25s computes it."""
        n, v = len(self.chunk_ids), len(self.vocab)
        if not n or not v:
            return np.zeros(v, dtype=np.float64)
        lengths = np.diff(self.offsets)
        owner = np.repeat(np.arange(n, dtype=np.int64), lengths)
        pairs = np.unique(owner * v + self.tokens.astype(np.int64))
        df = np.bincount(pairs % v, minlength=v).astype(np.float64)
        return np.log(1 + (n - df + 0.5) / (df + 0.5))

    def max_score(self, query_tokens: Sequence[str]) -> float:
        """An upper bound of any chunk's BM25 score for the query: the sum of its terms' IDF.

        Each term adds at most its IDF (the Lucene term-frequency part stays below 1).
        A term no chunk holds counts with the IDF of an unseen term, so a query asking
        for words the corpus lacks can never look fully matched.
        """
        n = len(self.chunk_ids)
        unseen = float(np.log(1 + (n + 0.5) / 0.5)) if n else 0.0
        total = 0.0
        for t in dict.fromkeys(query_tokens):
            i = self.vocab.get(t)
            total += float(self._idf[i]) if i is not None else unseen
        return total

    def rebuilt(self, *, remove: Iterable[str], add: Sequence[Chunk],
                tokenizer: Tokenizer) -> KeywordSide:
        """A new side without ``remove`` and with ``add`` (tokenised here); self is unchanged."""
        if tokenizer.name != self.tokenizer_name:
            raise ValueError("rebuild with the tokenizer the side was built with")
        gone = set(remove) | {c.id for c in add}
        keep = np.fromiter((cid not in gone for cid in self.chunk_ids), dtype=bool,
                           count=len(self.chunk_ids))
        rows: list[DocRow] = []
        row_of_doc: dict[str, int] = {}

        def row_index(row: DocRow) -> int:
            idx = row_of_doc.get(row.doc_id)
            if idx is None:
                idx = row_of_doc[row.doc_id] = len(rows)
                rows.append(row)
            else:
                rows[idx] = row  # the newest metadata of a document wins
            return idx

        kept = np.flatnonzero(keep)
        chunk_ids = [self.chunk_ids[i] for i in kept]
        doc_of = [row_index(self.docs[int(self.doc_of[i])]) for i in kept]
        headings = [self.headings[i] for i in kept]
        lengths = np.diff(self.offsets)
        old_flat = self.tokens[np.repeat(keep, lengths)] if len(self.tokens) else self.tokens
        kept_lengths = lengths[kept]
        # New chunks: tokenise, extending the old vocabulary.
        vocab = dict(self.vocab)
        new_flat: list[int] = []
        new_lengths: list[int] = []
        for c in add:
            chunk_ids.append(c.id)
            doc_of.append(row_index(doc_row(c)))
            headings.append([heading_key(c.heading_path[:n])
                             for n in range(1, len(c.heading_path) + 1)])
            toks = tokenizer(c.text)
            new_flat.extend(vocab.setdefault(t, len(vocab)) for t in toks)
            new_lengths.append(len(toks))
        flat = np.concatenate([old_flat.astype(np.int64),
                               np.asarray(new_flat, dtype=np.int64)])
        # Compact the vocabulary to the tokens still used (bm25s wants ids 0..n-1).
        used = np.unique(flat)
        remap = np.full(len(vocab), -1, dtype=np.int64)
        remap[used] = np.arange(len(used))
        compact = {t: int(remap[i]) for t, i in vocab.items() if remap[i] >= 0}
        all_lengths = np.concatenate([kept_lengths, np.asarray(new_lengths, dtype=np.int64)])
        offsets = np.zeros(len(all_lengths) + 1, dtype=np.int64)
        np.cumsum(all_lengths, out=offsets[1:])
        return KeywordSide(
            tokenizer_name=self.tokenizer_name, chunk_ids=chunk_ids,
            doc_of=np.asarray(doc_of, dtype=np.int32), docs=rows, headings=headings,
            tokens=remap[flat].astype(np.int32), offsets=offsets,
            vocab=compact, k1=self.k1, b=self.b,
        )

    # -- querying ------------------------------------------------------------------------

    def mask(self, f: Filter | None, sources: set[str] | None = None) -> np.ndarray | None:
        """1.0 for chunks the filter admits, 0.0 elsewhere; None when there is no filter."""
        if f is None or f.is_empty():
            return None
        rows = np.fromiter((row_matches(f, r, sources) for r in self.docs), dtype=bool,
                           count=len(self.docs))
        allowed = rows[self.doc_of] if len(self.doc_of) else np.zeros(0, dtype=bool)
        if f.heading_prefix:
            under = np.zeros(len(self.chunk_ids), dtype=bool)
            idx = self._heading_index.get(heading_key(f.heading_prefix))
            if idx is not None:
                under[idx] = True
            allowed &= under
        return allowed.astype(np.float32)

    def search(self, query_tokens: Sequence[str], k: int,
               weight_mask: np.ndarray | None = None) -> list[tuple[str, float]]:
        """Top ``k`` chunks with a positive BM25 score, best first (ties by chunk id)."""
        if self._bm25 is None or k <= 0:
            return []
        ids = [self.vocab[t] for t in dict.fromkeys(query_tokens) if t in self.vocab]
        if not ids:
            return []
        if weight_mask is not None and not weight_mask.any():
            return []
        scores = self._bm25.get_scores(ids, weight_mask=weight_mask)
        hits = np.flatnonzero(scores > 0)
        if len(hits) > k:
            top = hits[np.argpartition(-scores[hits], k - 1)[:k]]
            # keep every id tied with the k-th so the id tie-break is applied fairly
            cut = scores[top].min()
            hits = hits[scores[hits] >= cut]
        ranked = sorted(((self.chunk_ids[i], float(scores[i])) for i in hits),
                        key=lambda kv: (-kv[1], kv[0]))
        return ranked[:k]

    def scores(self, query_tokens: Sequence[str], chunk_ids: Sequence[str]) -> list[float]:
        """The BM25 score of each given chunk for the query (0 for unknown chunks)."""
        ids = [self.vocab[t] for t in dict.fromkeys(query_tokens) if t in self.vocab]
        if self._bm25 is None or not ids:
            return [0.0] * len(chunk_ids)
        everything = self._bm25.get_scores(ids)
        return [float(everything[self._pos[c]]) if c in self._pos else 0.0 for c in chunk_ids]

    # -- persistence ---------------------------------------------------------------------

    def save(self, directory: Path) -> None:
        """Write into a fresh ``directory`` (the caller renames it into place)."""
        if directory.exists():
            shutil.rmtree(directory)
        directory.mkdir(parents=True)
        np.save(directory / "tokens.npy", self.tokens)
        np.save(directory / "offsets.npy", self.offsets)
        np.save(directory / "doc_of.npy", self.doc_of)
        meta = {
            "format": FORMAT, "tokenizer": self.tokenizer_name, "k1": self.k1, "b": self.b,
            "chunk_ids": self.chunk_ids, "headings": self.headings,
            "docs": [r.to_json() for r in self.docs], "vocab": self.vocab,
        }
        with (directory / "meta.json").open("w") as f:
            json.dump(meta, f, ensure_ascii=False, separators=(",", ":"))
            f.flush()
            import os

            os.fsync(f.fileno())

    @classmethod
    def load(cls, directory: Path) -> KeywordSide:
        meta = json.loads((directory / "meta.json").read_text())
        if meta.get("format") != FORMAT:
            raise ValueError(f"keyword index format {meta.get('format')!r}")
        side = cls(
            tokenizer_name=meta["tokenizer"], chunk_ids=meta["chunk_ids"],
            doc_of=np.load(directory / "doc_of.npy"),
            docs=[DocRow.from_json(r) for r in meta["docs"]], headings=meta["headings"],
            tokens=np.load(directory / "tokens.npy"), offsets=np.load(directory / "offsets.npy"),
            vocab=meta["vocab"], k1=meta["k1"], b=meta["b"],
        )
        n = len(side.chunk_ids)
        if len(side.doc_of) != n or len(side.offsets) != n + 1 or len(side.headings) != n:
            raise ValueError("keyword index arrays disagree in length")
        return side
