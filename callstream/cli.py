"""The `callstream` command: kafka, gateway, worker, sink, simulate and up.

Every expected failure of any command (a `CallstreamError`, an invalid setting, an operating-system
error such as a file that cannot be made) becomes one line and exit status 1 in `Main.invoke`, so
the commands themselves need no try/except; with the log level DEBUG the traceback is logged first.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
from pathlib import Path
from typing import Any

import click
from pydantic import ValidationError

from callstream.config import warn_unknown_variables
from callstream.localcluster import LocalCluster, configured
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
    """A local Apache Kafka (KRaft) without Docker, fetched once with Maven: one broker, or a
    cluster of several with --brokers (each node broker and controller, data and ports of its own)."""


def _local(port: int | None, home: str | None, brokers: int | None = None) -> LocalKafka | LocalCluster:
    return configured(brokers=brokers, port=port, home=Path(home) if home is not None else None)


_port = click.option(
    "--port",
    type=int,
    default=None,
    help="Broker port, of the first node in a cluster (default: from CALLSTREAM_KAFKA_BOOTSTRAP, 9092).",
)
_home = click.option(
    "--home", default=None, help="Folder for jars, data and logs (default CALLSTREAM_KAFKA_HOME or ./.kafka)."
)


@kafka.command("start")
@_port
@_home
@click.option(
    "--brokers",
    type=click.IntRange(min=1),
    default=None,
    help="Nodes in the cluster (default: as many as CALLSTREAM_KAFKA_BOOTSTRAP lists, so 1). With 3 or more, "
    "topics get 3 replicas and min.insync.replicas 2. On one host the nodes take ports 9092, 9094, ... "
    "(each controller the next port) unless CALLSTREAM_KAFKA_BOOTSTRAP lists as many servers.",
)
@click.option("--wait", default=90.0, show_default=True, help="Seconds to wait for the broker (or cluster) to answer.")
def kafka_start(port: int | None, home: str | None, brokers: int | None, wait: float) -> None:
    """Start the broker or cluster (fetching Kafka on first use) and wait until it answers. Idempotent."""
    _local(port, home, brokers).start(wait=wait, say=click.echo)


@kafka.command("stop")
@_port
@_home
def kafka_stop(port: int | None, home: str | None) -> None:
    """Stop the broker, or every node of the cluster, that `kafka start` started, and wait until the JVMs are gone."""
    _local(port, home).stop(say=click.echo)


@kafka.command("status")
@_port
@_home
def kafka_status(port: int | None, home: str | None) -> None:
    """Say whether the broker (every node of the cluster) runs; exit status 1 when one does not answer."""
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
    its partitions are assigned and recovered). With CALLSTREAM_DASHBOARD_TOKENS set, all but the
    probes want one (Authorization: Bearer, or the cookie /login sets); without tokens it listens on
    loopback only, unless CALLSTREAM_DASHBOARD_PUBLIC=true. It creates missing topics and waits for
    Kafka and them. Alert rules: the shipped defaults, overridden by the TOML file
    CALLSTREAM_ALERTS_CONFIG names; alerts go to <prefix>.alerts and to each rule's routes (slack:
    CALLSTREAM_ALERT_WEBHOOK_URL, pagerduty: CALLSTREAM_PAGERDUTY_ROUTING_KEY, json:
    CALLSTREAM_ALERT_JSON_URL). Workers with the same topic prefix share the partitions.
    """
    from streams.settings import WorkerSettings
    from streams.worker import Worker, use_uvloop

    overrides: dict[str, object] = {
        k: v for k, v in {"web_host": web_host, "web_port": web_port}.items() if v is not None
    }
    cfg = WorkerSettings.model_validate(overrides)
    require_free(cfg.web_host, cfg.web_port, "the worker's dashboard", "--web-port or CALLSTREAM_WEB_PORT")
    use_uvloop()
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
    Unloadable records go to <prefix>.dead_letter with the reason. CALLSTREAM_SINK_METRICS_PORT serves
    Prometheus /metrics (consumer lag, records loaded). With CALLSTREAM_LAKE_WAREHOUSE and
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


# -- replay and backfill -------------------------------------------------------------------------


@main.group()
def replay() -> None:
    """Route the events of <prefix>.dead_letter or <prefix>.unknown again, after a fix or a catalogue update."""


_dry_run = click.option("--dry-run", is_flag=True, help="Say where the events would go; write and commit nothing.")
_no_progress = click.option("--no-progress", is_flag=True, help="No progress bar.")
_batch = click.option(
    "--batch-size", default=500, show_default=True, type=click.IntRange(min=1), help="Events per Kafka transaction."
)


_from_beginning = click.option(
    "--from-beginning",
    is_flag=True,
    help="Read the whole topic again, not from where the last run stopped: events that did not route then get "
    "another chance, and those an earlier run wrote are written again (the sink keeps one row per call, the "
    "worker counts a call's event once).",
)


def _replay(source: str, dry_run: bool, no_progress: bool, batch_size: int, from_beginning: bool) -> None:
    import signal

    from tqdm import tqdm

    from callstream.replay import Replay
    from kernel.settings import CommonSettings

    run = Replay(CommonSettings(), source, batch_size=batch_size, dry_run=dry_run, from_beginning=from_beginning)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: run.stop.set())
    with tqdm(unit="event", desc=f"replay {source}", disable=no_progress, file=sys.stderr, delay=0.5) as bar:
        stats = run.run(progress=bar.update, on_total=lambda n: bar.reset(total=n))
    for line in stats.summary(run.source, dry_run):
        click.echo(line)


_REPLAY_HELP = """

    Each event is routed as the gateway routes a delivery (same validation, event names and keys).
    What now routes to an event topic is written there with the gateway's key and headers and a
    `replayed_from` header; what still does not route stays where it is (a later run passes it by,
    unless --from-beginning). An event with `replayed_from` is never replayed again. Idempotent: a
    run starts where the last one stopped
    (consumer group callstream-replay-<prefix>-<source>) and writes each batch in one Kafka
    transaction with those offsets, so a second run, or a run after a crash, writes nothing twice.
    Ctrl-C stops after the current batch.
"""


@replay.command(
    "dead-letter",
    help="Route <prefix>.dead_letter again: bodies the gateway could not route, and "
    "records the sink could not load (those go back to their event topic, right after a fix to the loader)."
    + _REPLAY_HELP,
)
@_dry_run
@_no_progress
@_batch
@_from_beginning
def replay_dead_letter(dry_run: bool, no_progress: bool, batch_size: int, from_beginning: bool) -> None:
    _replay("dead-letter", dry_run, no_progress, batch_size, from_beginning)


@replay.command(
    "unknown",
    help="Route <prefix>.unknown again: events of types the catalogue did not know "
    "when they came (after a catalogue update, those it knows now go to their own topic)." + _REPLAY_HELP,
)
@_dry_run
@_no_progress
@_batch
@_from_beginning
def replay_unknown(dry_run: bool, no_progress: bool, batch_size: int, from_beginning: bool) -> None:
    _replay("unknown", dry_run, no_progress, batch_size, from_beginning)


@main.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--dry-run", is_flag=True, help="Read and check the files and count the calls; send nothing.")
@click.option("--strict", is_flag=True, help="Stop at the first malformed record instead of skipping it.")
@_no_progress
def backfill(files: tuple[Path, ...], dry_run: bool, strict: bool, no_progress: bool) -> None:
    """Load past calls: Retell list-calls output into the pipeline as call_analyzed events.

    Each FILE is a JSON array of call objects (what POST /v2/list-calls answers) or JSON Lines (a
    call object per line), either of them gzipped (.gz); files of any size are streamed. Each call
    goes to <prefix>.call_analyzed as {"event": "call_analyzed", "call": ...}, keyed by its call_id,
    with the gateway's headers (received_at: the call's end) and backfilled_at. Calls not ended yet
    (registered, ongoing) are skipped: their own webhook is still to come.

    A malformed record (not JSON, not a call object, no call_id) is reported with its file and
    line and skipped, and the run ends with exit status 1 after sending the rest; --strict stops at
    the first one instead. In a JSON array a syntax error also skips the rest of that file.
    Running it twice, or over calls that live traffic delivered too, loads and counts nothing
    twice (the sink keeps one row per call, the worker counts a call's call_analyzed once).
    """
    from tqdm import tqdm

    from callstream.backfill import Backfill, total_bytes
    from kernel.settings import CommonSettings

    paths = list(files)
    run = Backfill(CommonSettings(), dry_run=dry_run, strict=strict)
    with tqdm(
        total=total_bytes(paths),
        unit="B",
        unit_scale=True,
        desc="backfill",
        disable=no_progress,
        file=sys.stderr,
        delay=0.5,
    ) as bar:
        stats = run.run(paths, progress=bar.update, say=lambda line: bar.write(line, file=sys.stderr))
    click.echo(stats.summary(run.topic, dry_run))
    if stats.bad:
        raise click.ClickException(f"{len(stats.bad)} malformed records were skipped (listed above)")


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
@click.option(
    "--record",
    type=click.Path(dir_okay=False, writable=True),
    default=None,
    help="Write a line per acknowledged (2xx) delivery to this file: unix ms, event, call or chat id and the "
    "body's BLAKE2b-64 digest, tab-separated.",
)
def simulate(url: str, key: str | None, no_progress: bool, record: str | None, **knobs: Any) -> None:
    """Realistic, signed webhook traffic against a gateway, at a given rate.

    Deliveries are made and signed ahead of time, and sender processes write them at their planned
    time: the summary gives the server's latency (request written to response read), the asked and
    achieved rate, and the sender's own scheduling lag when it fell behind. Each run sends new calls
    unless --seed repeats an earlier run's. --record keeps what was acknowledged, to check it against
    what was stored.
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
    with contextlib.ExitStack() as stack:
        bar = stack.enter_context(tqdm(unit="req", disable=no_progress, file=sys.stderr, desc="simulate"))
        out = stack.enter_context(open(record, "w", encoding="utf-8")) if record else None
        try:
            res = asyncio.run(run(url, key, plan, progress=bar.update, record=out.writelines if out else None))
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
