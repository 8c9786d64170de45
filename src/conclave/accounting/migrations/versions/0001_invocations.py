"""invocations: the ledger table, range-partitioned by month on started_at

Revision ID: 0001
Revises:
Create Date: 2025-01-01

Partitions are not created here: the ledger creates the current month and the
next few on open, and any other month on demand before inserting into it.
The primary key must contain the partition key, hence (id, started_at).
Columns named after OpenTelemetry GenAI attributes use the dot-to-underscore
form (see ``conclave.accounting.ledger``).
"""

from __future__ import annotations

from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE invocations (
            id uuid NOT NULL,
            started_at timestamptz NOT NULL,
            ended_at timestamptz NOT NULL,
            gen_ai_operation_name text NOT NULL,
            gen_ai_provider_name text,
            gen_ai_request_model text,
            gen_ai_response_model text,
            gen_ai_response_id text,
            gen_ai_request_max_tokens integer,
            gen_ai_response_finish_reasons text[] NOT NULL DEFAULT '{}',
            tier smallint,
            privacy boolean NOT NULL,
            gen_ai_usage_input_tokens bigint NOT NULL,
            gen_ai_usage_output_tokens bigint NOT NULL,
            gen_ai_usage_cache_read_input_tokens bigint NOT NULL,
            gen_ai_usage_cache_creation_input_tokens bigint NOT NULL,
            tokens_estimated boolean NOT NULL,
            cost_micros bigint NOT NULL,
            latency_ms bigint,
            ttft_ms bigint,
            outcome text NOT NULL,
            error_type text,
            api_key_id text,
            user_id text,
            team text,
            run_id text,
            workflow_id text,
            experiment text,
            variant text,
            http_route text,
            attributes jsonb NOT NULL DEFAULT '{}'::jsonb,
            PRIMARY KEY (id, started_at)
        ) PARTITION BY RANGE (started_at)
        """
    )
    op.execute("CREATE INDEX invocations_started_at ON invocations (started_at)")
    op.execute("CREATE INDEX invocations_api_key ON invocations (api_key_id, started_at)")
    op.execute("CREATE INDEX invocations_run ON invocations (run_id)")


def downgrade() -> None:
    op.execute("DROP TABLE invocations CASCADE")
