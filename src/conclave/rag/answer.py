"""Grounded answers with numbered citations, through the gateway.

The retrieved passages are numbered and put before the question; the model is
asked to answer from them only and cite them as ``[n]``.  The same messages
serve chat models (system + user) and base models, which the OpenAI-compatible
provider renders as a completion prompt (instructions, sources, then
``Question: ...\\nAnswer:``), the form a small base model answers best.

Citations are the sources the answer cites by number; when the model cites
nothing (small models often don't), the passages it was given are returned as
its basis, marked ``cited=False``, so a reader can still check the answer.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from pydantic import BaseModel, Field

from conclave.gateway import Gateway
from conclave.llm.types import ChatRequest, ChatResponse, Message, Usage
from conclave.rag.types import Hit

INSTRUCTIONS = (
    "Answer the question using only the numbered sources below. Cite the sources you use "
    "with their numbers in brackets, like [1]. If the sources do not contain the answer, "
    "say that you don't know."
)
_CITE = re.compile(r"\[(\d{1,3})\]")


class Citation(BaseModel):
    n: int
    source: str
    heading: str | None = None
    page: int | None = None
    score: float
    chunk_id: str
    start: int
    end: int
    snippet: str
    #: the answer text cites this number (False: given to the model, not cited)
    cited: bool = True


class Answer(BaseModel):
    answer: str
    citations: list[Citation] = Field(default_factory=list)
    usage: Usage = Field(default_factory=Usage)
    cost_usd: float = 0.0
    model: str = ""
    tier: int = 0
    latency_ms: float = 0.0
    routing_note: str | None = None


def _heading(hit: Hit) -> str | None:
    return " > ".join(hit.chunk.heading_path) or hit.chunk.metadata.title


def build_messages(question: str, hits: Sequence[Hit], max_chars: int = 6000) -> list[Message]:
    """Instructions and numbered sources as the system message, the question as the user's.

    Passages are cut to share ``max_chars`` so the prompt fits a small context window.
    """
    per = max(200, max_chars // max(1, len(hits)))
    blocks = []
    for i, hit in enumerate(hits, 1):
        where = hit.chunk.metadata.source
        head = _heading(hit)
        page = f", page {hit.chunk.page}" if hit.chunk.page else ""
        text = " ".join(hit.chunk.text.split())[:per]
        blocks.append(f"[{i}] ({where}{', ' + head if head else ''}{page}) {text}")
    system = INSTRUCTIONS + "\n\nSources:\n" + "\n".join(blocks)
    return [Message.system(system), Message.user(question)]


def citations(text: str, hits: Sequence[Hit]) -> list[Citation]:
    numbers = [int(m) for m in _CITE.findall(text) if 1 <= int(m) <= len(hits)]
    cited = list(dict.fromkeys(numbers))
    chosen = cited or list(range(1, len(hits) + 1))
    out = []
    for n in chosen:
        h = hits[n - 1]
        out.append(Citation(
            n=n, source=h.chunk.metadata.source, heading=_heading(h), page=h.chunk.page,
            score=h.score, chunk_id=h.chunk.id, start=h.chunk.start, end=h.chunk.end,
            snippet=" ".join(h.chunk.text.split())[:240], cited=bool(cited)))
    return out


async def answer(gateway: Gateway, question: str, hits: Sequence[Hit], *,
                 model: str | None = None, tier: int | None = None,
                 max_tokens: int = 256, privacy: bool | None = None,
                 metadata: dict[str, str] | None = None) -> Answer:
    """Answer ``question`` from ``hits``; no hits means an honest "no sources" answer."""
    if not hits:
        return Answer(answer="No indexed passage matches the question (or the filter), so "
                      "there is nothing to answer from.")
    request = ChatRequest(messages=build_messages(question, hits), model=model, tier=tier,
                          max_tokens=max_tokens, privacy=privacy,
                          metadata={"operation": "rag_answer", **(metadata or {})})
    resp: ChatResponse = await gateway.complete(request)
    text = resp.text.strip()
    return Answer(answer=text, citations=citations(text, hits), usage=resp.usage,
                  cost_usd=resp.cost_usd, model=resp.model, tier=resp.tier,
                  latency_ms=resp.latency_ms, routing_note=resp.routing_note)
