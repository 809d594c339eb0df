"""Reporting views, defined once: created in the DuckDB file and in every `warehouse.read` connection."""

from __future__ import annotations

import duckdb

from warehouse.db import run

# name -> SELECT over the base tables (calls, call_tool_calls, ...), whatever backs them.
VIEWS: dict[str, str] = {
    # One row per day and agent: volume, outcome rates, duration, cost and the sentiment mix.
    "daily_agent_stats": """
        SELECT
          day,
          agent_id,
          count(*) AS calls,
          count(*) FILTER (WHERE call_status <> 'not_connected') AS connected_calls,
          round(count(*) FILTER (WHERE call_status <> 'not_connected') / count(*), 4) AS connected_rate,
          round(count(*) FILTER (WHERE call_successful) / count(*), 4) AS success_rate,
          round(avg(duration_ms) FILTER (WHERE call_status <> 'not_connected') / 1000, 2) AS avg_duration_s,
          round(quantile_cont(duration_ms, 0.95) FILTER (WHERE call_status <> 'not_connected') / 1000, 2)
            AS p95_duration_s,
          round(sum(combined_cost), 4) AS total_cost,
          round(avg(combined_cost), 4) AS avg_cost,
          count(*) FILTER (WHERE user_sentiment = 'Positive') AS sentiment_positive,
          count(*) FILTER (WHERE user_sentiment = 'Neutral') AS sentiment_neutral,
          count(*) FILTER (WHERE user_sentiment = 'Negative') AS sentiment_negative,
          count(*) FILTER (WHERE user_sentiment IS NULL OR user_sentiment NOT IN ('Positive', 'Neutral', 'Negative'))
            AS sentiment_unknown
        FROM calls
        GROUP BY day, agent_id
    """,
    "disconnection_reasons_daily": """
        SELECT
          day,
          coalesce(disconnection_reason, 'unknown') AS disconnection_reason,
          count(*) AS calls,
          round(count(*) / sum(count(*)) OVER (PARTITION BY day), 4) AS share_of_day
        FROM calls
        GROUP BY day, coalesce(disconnection_reason, 'unknown')
    """,
    # A transfer is bridged when the call ended by being transferred, cancelled when the transfer failed.
    "transfer_outcomes": """
        SELECT
          day,
          agent_id,
          CASE WHEN disconnection_reason = 'call_transfer' THEN 'bridged'
               WHEN disconnection_reason = 'transfer_cancelled' THEN 'cancelled'
               ELSE 'other' END AS outcome,
          count(*) AS calls,
          count(DISTINCT transfer_destination) AS destinations,
          round(avg(duration_ms) / 1000, 2) AS avg_duration_s
        FROM calls
        WHERE transfer_destination IS NOT NULL
           OR disconnection_reason IN ('call_transfer', 'transfer_cancelled')
        GROUP BY day, agent_id, outcome
    """,
    # Callers per day and agent (the person: the calling number inbound, the called number outbound),
    # and how many called more than once. Counts only: no view shows a number. Hashed numbers count
    # the same as numbers kept as sent; masked ones keep four digits, so different callers can merge.
    "daily_callers": """
        WITH per_caller AS (
          SELECT day, agent_id, count(*) AS calls
          FROM calls
          WHERE (CASE WHEN direction = 'outbound' THEN to_number ELSE from_number END) IS NOT NULL
          GROUP BY day, agent_id, CASE WHEN direction = 'outbound' THEN to_number ELSE from_number END
        )
        SELECT
          day,
          agent_id,
          count(*) AS callers,
          count(*) FILTER (WHERE calls > 1) AS repeat_callers,
          sum(calls) AS calls_with_number
        FROM per_caller
        GROUP BY day, agent_id
    """,
    "tool_call_success": """
        SELECT
          t.day,
          t.name,
          count(*) AS tool_calls,
          count(*) FILTER (WHERE t.successful) AS successful,
          count(*) FILTER (WHERE NOT t.successful) AS failed,
          count(*) FILTER (WHERE t.successful IS NULL) AS no_result,
          round(count(*) FILTER (WHERE t.successful) / nullif(count(t.successful), 0), 4) AS success_rate
        FROM call_tool_calls t
        GROUP BY t.day, t.name
    """,
}


def create_views(con: duckdb.DuckDBPyConnection) -> None:
    for name, sql in VIEWS.items():
        run(con, f"CREATE OR REPLACE VIEW {name} AS {sql}")
