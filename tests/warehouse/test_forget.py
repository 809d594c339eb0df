"""`callstream warehouse forget`: a caller's calls and chats leave every table, every Parquet file
(snapshots included) and the DuckDB file itself, while a reader keeps reading; the sink never loads
them again; a running sink is never written behind."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import duckdb
import orjson
import pytest

from callstream.fakecalls import CallFactory, Fleet
from tests.support.audit import assert_parquet_equals_duckdb
from tests.support.warehouse import build
from warehouse import ledger
from warehouse.forget import Selection, _erase, forgotten_keys, plan
from warehouse.migrations import migrate
from warehouse.personal_data import KEEP_ALL, PersonalData, hash_number
from warehouse.read import connect
from warehouse.schema import TABLES

KEY = "forget-test-key-0123456789"


def _marked(call: dict[str, Any], marker: str) -> dict[str, Any]:
    """The call with `marker` in every place that holds conversation content."""
    call["transcript"] = f"Agent: {marker} transcript"
    call["transcript_object"][0]["content"] = f"{marker} utterance"
    call["transcript_with_tool_calls"] = [
        *call["transcript_object"],
        {"role": "tool_call_invocation", "tool_call_id": "t1", "name": "lookup", "arguments": f'{{"q": "{marker}"}}'},
        {"role": "tool_call_result", "tool_call_id": "t1", "successful": True, "content": f"{marker} result"},
    ]
    call["recording_url"] = f"https://rec.example.com/{marker}.wav"
    call["call_analysis"]["call_summary"] = f"{marker} summary"
    return call


@pytest.fixture
def bodies() -> Callable[..., dict[str, Any]]:
    factory = CallFactory(Fleet(seed=61, agents=2), seed=61, turns=(2, 4))

    def make(marker: str | None = None, chat: bool = False, **call: Any) -> dict[str, Any]:
        if chat:
            body = factory.events("chat")[-1].payload
            if marker:
                body["chat"]["transcript"] = f"{marker} chat transcript"
                body["chat"]["message_with_tool_calls"][0]["content"] = f"{marker} message"
            return body
        body = factory.events("completed", **call)[-1].payload
        if marker:
            _marked(body["call"], marker)
        return body

    return make


@pytest.fixture
def paths(tmp_path: Path) -> tuple[Path, Path]:
    return tmp_path / "warehouse.duckdb", tmp_path / "parquet"


@pytest.fixture
def forget_cli(paths: tuple[Path, Path], tmp_path: Path) -> Callable[..., subprocess.CompletedProcess[str]]:
    db, parquet = paths

    def run(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
        base = {k: v for k, v in os.environ.items() if not k.startswith("CALLSTREAM_")}
        base.update(
            CALLSTREAM_WAREHOUSE=str(db),
            CALLSTREAM_PARQUET_DIR=str(parquet),
            CALLSTREAM_PARQUET_COMPRESSION="uncompressed",
            **env,
        )
        return subprocess.run(
            [sys.executable, "-m", "callstream", "warehouse", "forget", "--no-progress", *args],
            env=base,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
        )

    return run


def _every_byte(db: Path, parquet: Path) -> bytes:
    return b"".join(p.read_bytes() for p in [db, *sorted(parquet.rglob("*"))] if p.is_file())


def _digest(db: Path, parquet: Path) -> dict[str, str]:
    files = [db, *sorted(parquet.rglob("*"))]
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files if p.is_file()}


class _Reader(threading.Thread):
    """Queries every table through one `warehouse.read` connection, over and over, until stopped."""

    def __init__(self, parquet: Path) -> None:
        super().__init__(daemon=True)
        self.con = connect(parquet)
        self.stop = threading.Event()
        self.queries = 0
        self.errors: list[BaseException] = []

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                for t in TABLES:
                    self.con.execute(f"SELECT count(*), max(day) FROM {t.name}").fetchall()
                self.con.execute("SELECT count(*) FROM calls JOIN call_utterances USING (call_id)").fetchall()
                self.queries += 1
            except BaseException as exc:
                self.errors.append(exc)
                return


def test_forget_erases_a_call_and_a_chat_everywhere_while_a_reader_reads(bodies, paths, forget_cli):
    db, parquet = paths
    victim = bodies("VICTIM-q8Zt" * 3)
    victim_id = victim["call"]["call_id"]
    chat = bodies("CHATTER-p3Lm" * 3, chat=True)
    chat_id = chat["chat"]["chat_id"]
    kept = bodies("KEPT-w4Xy" * 3)
    changed = orjson.loads(orjson.dumps(victim))
    changed["call"]["call_status"] = "ended"  # a redelivery: the old row's part is rewritten by the next publish
    build(
        db,
        parquet,
        [
            [victim, kept, *(bodies() for _ in range(20))],
            [chat, *(bodies() for _ in range(20))],
            [changed, *(bodies() for _ in range(20))],
            [bodies(chat=True) for _ in range(5)],
        ],
    )
    everything = _every_byte(db, parquet)
    for marker in (b"VICTIM-q8Zt", b"CHATTER-p3Lm", b"KEPT-w4Xy"):
        assert marker in everything  # so that not finding it afterwards means something
    before = _digest(db, parquet)

    dry = forget_cli("--call-id", victim_id, "--chat-id", chat_id, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "would erase 1 calls and 1 chats" in dry.stdout
    assert _digest(db, parquet) == before

    reader = _Reader(parquet)
    calls_before = reader.con.execute("SELECT count(*) FROM calls").fetchall()[0][0]
    reader.start()
    try:
        done = forget_cli("--call-id", victim_id, "--chat-id", chat_id)
    finally:
        reader.stop.set()
        reader.join()
    assert done.returncode == 0, done.stderr
    assert "erased 1 calls and 1 chats" in done.stdout, done.stdout
    assert not reader.errors, reader.errors
    assert reader.queries > 0
    # The reader's own snapshot lost them too, and a fresh connection never sees them.
    for con in (reader.con, connect(parquet)):
        assert con.execute("SELECT count(*) FROM calls").fetchall() == [(calls_before - 1,)]
        for t in TABLES:
            key = t.parent_key
            assert con.execute(
                f"SELECT count(*) FROM {t.name} WHERE {key} IN (?, ?)", [victim_id, chat_id]
            ).fetchall() == [(0,)], t.name
    everything = _every_byte(db, parquet)
    assert b"VICTIM-q8Zt" not in everything
    assert b"CHATTER-p3Lm" not in everything
    assert b"KEPT-w4Xy" in everything
    assert not list(parquet.rglob("*.tmp"))
    assert_parquet_equals_duckdb(db, parquet)
    with duckdb.connect(str(db), read_only=True) as con:
        assert ledger.check(con) == []  # the sink's next start finds the ledger in agreement
        assert sorted(con.execute("SELECT family, key, files_done FROM _callstream_forgotten").fetchall()) == [
            ("calls", victim_id, True),
            ("chats", chat_id, True),
        ]


def test_forget_by_number_finds_numbers_as_sent_and_hashed(bodies, paths, forget_cli):
    db, parquet = paths
    number, other = "+14155550100", "+14155550199"
    inbound = [bodies(direction="inbound", from_number=number) for _ in range(2)]
    outbound = bodies(direction="outbound", to_number=number)
    rest = [bodies(direction="inbound", from_number=other) for _ in range(3)]
    build(db, parquet, [[*inbound, outbound, *rest]], PersonalData(phone_numbers="hash", key=KEY.encode()))
    with duckdb.connect(str(db), read_only=True) as con:
        stored = {r[0] for r in con.execute("SELECT from_number FROM calls").fetchall()}
    assert number not in stored and hash_number(number, KEY.encode()) in stored

    # Typed the way people write it; the key from the environment hashes it as the sink did.
    done = forget_cli("--number", "+1 (415) 555-0100", CALLSTREAM_PHONE_HASH_KEY=KEY)
    assert done.returncode == 0, done.stderr
    assert "erased 3 calls" in done.stdout, done.stdout
    assert "555" not in done.stdout + done.stderr  # the summary shows the number masked, not as given
    with duckdb.connect(str(db), read_only=True) as con:
        assert con.execute("SELECT count(*) FROM calls").fetchall() == [(3,)]
    assert connect(parquet).execute("SELECT count(*) FROM calls").fetchall() == [(3,)]

    # Numbers stored as sent match too, whatever the separators.
    again = forget_cli("--number", "+1-415-555-0199")
    assert again.returncode == 0 and "erased 0 calls" in again.stdout  # hashed, and no key given this time
    again = forget_cli("--number", "+1-415-555-0199", CALLSTREAM_PHONE_HASH_KEY=KEY)
    assert "erased 3 calls" in again.stdout, again.stdout


def test_masked_numbers_are_erased_only_when_asked_because_they_are_ambiguous(bodies, paths, forget_cli):
    db, parquet = paths
    caller, same_last_four = "+14155550100", "+12125550100"
    build(
        db,
        parquet,
        [[bodies(from_number=caller, direction="inbound"), bodies(from_number=same_last_four, direction="inbound")]],
        PersonalData(phone_numbers="mask"),
    )
    first = forget_cli("--number", caller, CALLSTREAM_STORE_PHONE_NUMBERS="mask")
    assert first.returncode == 0, first.stderr
    assert "erased 0 calls" in first.stdout
    assert "2 calls whose masked number ends in the same four digits, NOT erased" in first.stdout, first.stdout
    with duckdb.connect(str(db), read_only=True) as con:
        assert con.execute("SELECT count(*) FROM calls").fetchall() == [(2,)]
    both = forget_cli("--number", caller, "--include-masked")
    assert "erased 2 calls" in both.stdout, both.stdout
    assert connect(parquet).execute("SELECT count(*) FROM calls").fetchall() == [(0,)]


def test_an_interrupted_forget_is_finished_by_the_next_run(bodies, paths, forget_cli, caplog):
    db, parquet = paths
    victim = bodies("HALFWAY-r5Tu" * 3)
    build(db, parquet, [[victim, *(bodies() for _ in range(5))]])
    with duckdb.connect(str(db)) as con:  # what a forget killed after its transaction leaves
        migrate(con)
        plan(con, Selection(call_ids=(victim["call"]["call_id"],)), KEEP_ALL)
        _erase(con)
        assert forgotten_keys(con) == {"calls": frozenset({victim["call"]["call_id"]})}
    assert "did not finish" in caplog.text  # what the sink says at its start
    assert b"HALFWAY-r5Tu" in _every_byte(db, parquet)

    done = forget_cli()
    assert done.returncode == 0, done.stderr
    assert "finished an earlier, interrupted forget of 1" in done.stdout, done.stdout
    assert b"HALFWAY-r5Tu" not in _every_byte(db, parquet)
    with duckdb.connect(str(db), read_only=True) as con:
        assert con.execute("SELECT files_done FROM _callstream_forgotten").fetchall() == [(True,)]


def test_forget_says_in_one_line_what_is_wrong(paths, forget_cli, bodies):
    db, parquet = paths
    missing = forget_cli("--call-id", "c1")
    assert missing.returncode == 1 and "there is no warehouse" in missing.stderr
    assert "Traceback" not in missing.stderr
    build(db, parquet, [[bodies()]])
    nothing = forget_cli()
    assert nothing.returncode == 2 and "give --call-id, --chat-id or --number" in nothing.stderr
    not_a_number = forget_cli("--number", "call me maybe 12")
    assert not_a_number.returncode == 1 and "is not a phone number" in not_a_number.stderr
    hash_without_key = forget_cli("--call-id", "c1", CALLSTREAM_STORE_PHONE_NUMBERS="hash")
    assert hash_without_key.returncode == 1 and "CALLSTREAM_PHONE_HASH_KEY" in hash_without_key.stderr
    assert "Traceback" not in hash_without_key.stderr


# -- with the sink and a real broker ----------------------------------------------------------------


@pytest.mark.kafka
def test_the_sink_never_loads_a_forgotten_call_again(traffic, run_sink_once, warehouse_paths, service_env, tmp_path):
    db, parquet = warehouse_paths
    p = traffic(seed=62, turns=(2, 4))
    gone, kept = p.send(2)
    (chat,) = p.send(1, scenario="chat")
    p.flush()
    run_sink_once()
    env = {**service_env, "CALLSTREAM_PARQUET_COMPRESSION": "uncompressed"}
    proc = subprocess.run(
        [sys.executable, "-m", "callstream", "warehouse", "forget", "--call-id", gone, "--chat-id", chat],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    # Redelivered (a retry, a replay, a backfill): skipped by the sink, not loaded.
    p.send_raw("call_analyzed", gone, orjson.dumps({"event": "call_analyzed", "call": p.sent.calls[gone]}))
    p.send_raw("chat_analyzed", chat, orjson.dumps({"event": "chat_analyzed", "chat": p.sent.chats[chat]}))
    p.flush()
    out = run_sink_once()
    assert "load ledger" not in out, out[-3000:]
    assert "erased with `callstream warehouse forget`" in out, out[-3000:]
    with duckdb.connect(str(db), read_only=True) as con:
        assert con.execute("SELECT call_id FROM calls").fetchall() == [(kept,)]
        assert con.execute("SELECT count(*) FROM chats").fetchall() == [(0,)]
    assert_parquet_equals_duckdb(db, parquet)


@pytest.mark.kafka
def test_forget_refuses_while_the_sink_holds_the_file(start_service, sink_env, service_env, warehouse_paths, tmp_path):
    sink = start_service("sink", "sink", env=sink_env)
    deadline = time.monotonic() + 90
    while "sink: loading" not in sink.output():  # it holds the file from its first line on
        assert sink.alive() and time.monotonic() < deadline, sink.output()[-3000:]
        time.sleep(0.2)
    proc = subprocess.run(
        [sys.executable, "-m", "callstream", "warehouse", "forget", "--call-id", "c1"],
        env=service_env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1
    assert "stop the sink first" in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert sink.stop() == 0, sink.output()[-3000:]
