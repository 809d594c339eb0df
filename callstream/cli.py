"""The `callstream` command: kafka, gateway, worker, sink, simulate and up.

Every expected failure of any command (a `CallstreamError`, an invalid setting, an operating-system
error such as a file that cannot be made) becomes one line and exit status 1 in `Main.invoke`, so
the commands themselves need no try/except; with the log level DEBUG the traceback is logged first.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from pathlib import Path
from typing import Any

import click
from pydantic import ValidationError

from callstream.config import warn_unknown_variables
from callstream.localkafka import LocalKafka
from callstream.ports import require_free
from kernel.errors import CallstreamError
from kernel.logs import setup_logging
from kernel.settings import LOG_LEVELS, LogSettings, config_problem, effective_log_level

log = logging.getLogger("callstream")

EXPECTED = (CallstreamError, ValidationError, OSError)


def _one_line(exc: BaseException) -> click.ClickException:
    """The error line for an expected failure; its traceback and any further lines go to the DEBUG log."""
    log.debug("the failure below, for the record", exc_info=exc)
    if isinstance(exc, ValidationError):
        text = config_problem(exc)
    elif isinstance(exc, OSError) and not isinstance(exc, CallstreamError):
        text = f"{exc} (CALLSTREAM_LOG_LEVEL=DEBUG shows where)"
    else:
        text = str(exc).strip() or type(exc).__name__
    first, _, details = text.partition("\n")
    if details:
        log.debug("%s", details)
    return click.ClickException(first)


class Command(click.Command):
    def invoke(self, ctx: click.Context) -> object:
        # Every command, also one that reads no other setting: a `.env` that cannot be read or an
        # unknown log level is an error before the command does anything. (After parsing, so that
        # --help works whatever the configuration.)
        LogSettings()
        return super().invoke(ctx)


class Group(click.Group):
    command_class = Command


class Main(Group):
    """The command group: it turns every expected failure of a command into one line."""

    group_class = Group

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except click.ClickException as exc:
            if isinstance(exc.__cause__, EXPECTED):
                raise _one_line(exc.__cause__) from exc.__cause__
            raise
        except EXPECTED as exc:
            raise _one_line(exc) from exc


@click.group(cls=Main, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="callstream", prog_name="callstream")
@click.option(
    "--log-level",
    type=click.Choice(LOG_LEVELS, case_sensitive=False),
    default=None,
    help="Default CALLSTREAM_LOG_LEVEL or INFO; DEBUG also shows the traceback of a failure.",
)
@click.pass_context
def main(ctx: click.Context, log_level: str | None) -> None:
    """callstream: Retell AI / UponAI call webhooks into Kafka, live metrics and a DuckDB warehouse.

    First run: `callstream up` starts a local Kafka, the gateway, the worker and the sink, and
    sends simulated calls through them. Every command reads CALLSTREAM_* variables and `.env`
    (the environment wins).
    """
    level = (log_level or effective_log_level()).upper()
    ctx.obj = {"log_level": level}
    setup_logging(level)
    warn_unknown_variables()


# -- kafka --------------------------------------------------------------------------------------


@main.group()
def kafka() -> None:
    """A local single-node Apache Kafka (KRaft) without Docker, fetched once with Maven."""


def _local(port: int | None, home: str | None) -> LocalKafka:
    return LocalKafka.configured(port=port, home=Path(home) if home is not None else None)


_port = click.option(
    "--port", type=int, default=None, help="Broker port (default: from CALLSTREAM_KAFKA_BOOTSTRAP, 9092)."
)
_home = click.option(
    "--home", default=None, help="Folder for jars, data and logs (default CALLSTREAM_KAFKA_HOME or ./.kafka)."
)


@kafka.command("start")
@_port
@_home
@click.option("--wait", default=90.0, show_default=True, help="Seconds to wait for the broker to answer.")
def kafka_start(port: int | None, home: str | None, wait: float) -> None:
    """Start the broker (fetching it on first use) and wait until it answers. Idempotent."""
    _local(port, home).start(wait=wait, say=click.echo)


@kafka.command("stop")
@_port
@_home
def kafka_stop(port: int | None, home: str | None) -> None:
    """Stop the broker that `kafka start` started, and wait until its JVM is gone."""
    _local(port, home).stop(say=click.echo)


@kafka.command("status")
@_port
@_home
def kafka_status(port: int | None, home: str | None) -> None:
    """Say whether the broker runs; exit status 1 when it does not answer."""
    k = _local(port, home)
    click.echo(k.status())
    sys.exit(0 if k.running() else 1)


# -- services -----------------------------------------------------------------------------------


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--workers", default=1, show_default=True, type=int, help="Processes; one per core is the fastest.")
@click.pass_context
def gateway(ctx: click.Context, host: str, port: int, workers: int) -> None:
    """The webhook receiver: POST /webhook, GET /healthz, /readyz, /metrics (OpenAPI at /docs)."""
    import uvicorn

    from gateway.settings import GatewaySettings

    cfg = GatewaySettings()
    require_free(host, port, "the gateway", "--port")
    click.echo(
        f"gateway: http://{host}:{port}/webhook -> kafka {cfg.kafka_bootstrap} (prefix {cfg.topic_prefix})", err=True
    )
    if workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        import atexit
        import shutil
        import tempfile

        # One /metrics for all workers: each writes its samples here, any of them sums them.
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="callstream-gateway-metrics-")
        atexit.register(shutil.rmtree, os.environ["PROMETHEUS_MULTIPROC_DIR"], True)
    uvicorn.run(
        "gateway.app:create_app",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_level=ctx.obj["log_level"].lower(),
        access_log=False,
        http="httptools",
        loop="uvloop",
        timeout_graceful_shutdown=10,
        # The gateway reads X-Forwarded-For itself, and only from CALLSTREAM_TRUSTED_PROXIES; uvicorn's
        # own handling would trust any loopback peer and let a forged header pass the allowlist.
        proxy_headers=False,
    )


@main.command()
@click.option("--web-host", default=None, help="Dashboard host (default CALLSTREAM_WEB_HOST or 127.0.0.1).")
@click.option("--web-port", default=None, type=int, help="Dashboard port (default CALLSTREAM_WEB_PORT or 6066).")
@click.pass_context
def worker(ctx: click.Context, web_host: str | None, web_port: int | None) -> None:
    """The Faust app: live metrics, alerts and the live dashboard (default http://127.0.0.1:6066/).

    JSON at /api/metrics, Prometheus at /metrics, GET /healthz (alive) and /readyz (503 and why until
    its partitions are assigned and recovered). It creates missing topics and waits for Kafka and
    them. Alert rules: the shipped defaults, overridden by the TOML file CALLSTREAM_ALERTS_CONFIG
    names; alerts go to <prefix>.alerts and are POSTed to CALLSTREAM_ALERT_WEBHOOK_URL when set.
    Workers with the same topic prefix share the partitions.
    """
    from streams.settings import WorkerSettings
    from streams.worker import Worker

    overrides: dict[str, object] = {
        k: v for k, v in {"web_host": web_host, "web_port": web_port}.items() if v is not None
    }
    cfg = WorkerSettings.model_validate(overrides)
    require_free(cfg.web_host, cfg.web_port, "the worker's dashboard", "--web-port or CALLSTREAM_WEB_PORT")
    worker = Worker(cfg)
    click.echo(f"worker: dashboard http://{cfg.web_host}:{cfg.web_port}/ ; kafka {cfg.kafka_bootstrap}", err=True)
    worker.run(loglevel=ctx.obj["log_level"])


@main.command()
@click.option("--until-caught-up", is_flag=True, help="Load what the topics hold now, then exit (batch mode).")
def sink(until_caught_up: bool) -> None:
    """The warehouse loader: analyzed calls and chats into DuckDB and Parquet, exactly once.

    Loads <prefix>.call_analyzed and <prefix>.chat_analyzed into CALLSTREAM_WAREHOUSE (DuckDB) and
    CALLSTREAM_PARQUET_DIR (hive-partitioned by day), and publishes consistent Parquet snapshots:
    while it runs, read with `from warehouse.read import connect` (never the DuckDB file).
    Unloadable records go to <prefix>.dead_letter with the reason. With CALLSTREAM_LAKE_WAREHOUSE and
    CALLSTREAM_LAKE_CATALOG set it loads the Iceberg lake instead (sinks of one prefix share the partitions).
    """
    from callstream.cli_lake import run_lake_sink_if_configured
    from warehouse.settings import SinkSettings
    from warehouse.sink import run_sink

    if run_lake_sink_if_configured(until_caught_up):
        return
    stats = run_sink(SinkSettings(), until_caught_up=until_caught_up)
    click.echo(f"sink: {stats.records} records, {stats.rows} rows, {stats.dead_letters} dead letters", err=True)


def _register_lake() -> None:
    from callstream.cli_lake import register

    register(main)


def _register_warehouse() -> None:
    from callstream.cli_warehouse import register

    register(main)


_register_lake()
_register_warehouse()


def _first_key() -> str | None:
    raw = os.environ.get("CALLSTREAM_API_KEYS") or os.environ.get("RETELL_API_KEY")
    if not raw:
        from gateway.settings import GatewaySettings

        try:
            cfg = GatewaySettings()
        except ValidationError:
            return None
        keys = cfg.keys()
        return keys[0].decode() if keys else None
    return raw.split(",")[0].strip() or None


@main.command()
@click.option("--url", default="http://127.0.0.1:8000/webhook", show_default=True, help="The gateway's webhook URL.")
@click.option(
    "--key", default=None, help="API key to sign with (default: the first of CALLSTREAM_API_KEYS or RETELL_API_KEY)."
)
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@click.option(
    "--calls",
    default=200,
    show_default=True,
    type=click.IntRange(min=1),
    help="Calls and chats to simulate (ignored with --duration).",
)
@click.option(
    "--duration",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Run for this many seconds instead of a fixed number of calls.",
)
@click.option(
    "--rate",
    default=200.0,
    show_default=True,
    type=click.FloatRange(min=0),
    help="Planned deliveries per second (0: as fast as possible).",
)
@click.option(
    "--concurrency",
    default=64,
    show_default=True,
    type=click.IntRange(min=1),
    help="Deliveries in flight at once (over all sender processes).",
)
@click.option(
    "--duplicates",
    "duplicate_rate",
    default=0.03,
    show_default=True,
    type=click.FloatRange(0, 1),
    help="Share of events delivered twice (the sender's retries).",
)
@click.option(
    "--reorder",
    "reorder_rate",
    default=0.02,
    show_default=True,
    type=click.FloatRange(0, 1),
    help="Share of calls with two neighbouring events swapped.",
)
@click.option("--agents", default=5, show_default=True, type=click.IntRange(min=1), help="Distinct agents.")
@click.option("--seed", type=int, default=None, help="Repeat the traffic of an earlier run (default: a fresh seed).")
@click.option(
    "--processes",
    default=1,
    show_default=True,
    type=click.IntRange(min=1),
    help="Sender processes (more for higher rates).",
)
def simulate(url: str, key: str | None, no_progress: bool, **knobs: Any) -> None:
    """Realistic, signed webhook traffic against a gateway, at a given rate.

    Deliveries are made and signed ahead of time, and sender processes write them at their planned
    time: the summary gives the server's latency (request written to response read), the asked and
    achieved rate, and the sender's own scheduling lag when it fell behind. Each run sends new calls
    unless --seed repeats an earlier run's.
    """
    from tqdm import tqdm

    from callstream.simulate import SimulationPlan, fresh_seed, run

    if knobs["seed"] is None:
        knobs["seed"] = fresh_seed()
    plan = SimulationPlan(**knobs)
    key = key or _first_key()
    if not key:
        click.echo("simulate: no API key (CALLSTREAM_API_KEYS / RETELL_API_KEY / --key); sending unsigned", err=True)
    click.echo(f"simulate: seed {plan.seed} (--seed {plan.seed} sends the same calls again)", err=True)
    with tqdm(unit="req", disable=no_progress, file=sys.stderr, desc="simulate") as bar:
        try:
            res = asyncio.run(run(url, key, plan, progress=bar.update))
        except CallstreamError as exc:
            raise click.ClickException(str(exc)) from exc
    click.echo(res.summary())
    if res.failed:
        sys.exit(1)


@main.command()
@click.option("--calls", default=300, show_default=True, help="Simulated calls to send once everything runs.")
@click.option("--rate", default=100.0, show_default=True, help="Deliveries per second for the simulation.")
@click.option("--gateway-port", default=8000, show_default=True)
@click.option(
    "--web-port", default=None, type=int, help="The worker's dashboard port (default CALLSTREAM_WEB_PORT or 6066)."
)
@click.option(
    "--exit-after-summary", is_flag=True, help="Stop everything after the summary instead of waiting for Ctrl-C."
)
@click.option("--seed", type=int, default=None, help="Repeat the calls of an earlier run (default: a fresh seed).")
@click.pass_context
def up(
    ctx: click.Context,
    calls: int,
    rate: float,
    gateway_port: int,
    web_port: int | None,
    exit_after_summary: bool,
    seed: int | None,
) -> None:
    """Everything on one machine for a first run: Kafka, gateway, worker, sink, and simulated calls.

    Ctrl-C (or SIGTERM, or the terminal going away) stops all of it, including the broker if `up`
    started it, even when its output goes to a pipe that is gone by then.
    """
    from callstream.up import Stack
    from streams.settings import WorkerSettings

    web_port = web_port or WorkerSettings().web_port
    stack = Stack(
        calls=calls, rate=rate, gateway_port=gateway_port, web_port=web_port, log_level=ctx.obj["log_level"], seed=seed
    )
    stack.run(wait_forever=not exit_after_summary)
