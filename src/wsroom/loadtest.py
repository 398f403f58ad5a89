"""A load test for wsroom servers: ``wsroom loadtest URL`` or ``python -m wsroom.loadtest URL``.

It simulates many players with the Python client (`wsroom.client.Client`), in one
process on AnyIO (asyncio): each client connects (spread over ``--ramp`` seconds), sends
``--rate`` messages per second of ``--event`` with ``--data``, may drop its connection
abruptly (``--drop``) to exercise resume, and checks everything it receives:

- **latency**: every message sent carries a probe string, ``lt:<run>:<client>:<seq>:<ns>``
  (the sender's ``time.monotonic_ns()``), in place of ``{probe}`` in ``--data``. The server
  must broadcast it back (the example game's ``chat`` does); when a message of
  ``--echo-event`` carrying a probe of this run reaches a client, send-to-delivery latency
  is recorded, once per receiving client.
- **gaps**: per client and stream, offsets must follow each other across reconnects
  (`Client.messages` is one sequence); a hole or a duplicate is a gap. A `Snapshot`, or a
  position the server announced (a ``welcome`` that did not recover the stream, a
  ``stream`` frame), starts the stream again and is not a gap.
- **resumes** by result (from each ``welcome`` after the first): ``recovered``,
  ``not_recovered`` (some stream was not replayed: a snapshot follows if the app has a
  hook), ``new_session``.
- **errors**: ``error`` frames, requests without an answer, closes with a code after
  which the client does not reconnect, clients that never connected.

It knows no application: what a client needs to take part (its ``auth``, a game to sit
at...) comes from the options (``--auth``, ``--auth-file``) or from a *scenario*, a
plug-in named on the command line (``--scenario module:callable`` or
``--scenario path/to/file.py:callable``): a callable that gets the `Options` and returns
the options of the run (sync or async), usually with ``auths`` set, one per client, and
``labels`` for the report. The example game's seating is such a scenario, in
``examples/fastapi_game/loadtest_scenario.py`` (``--game`` is the shortcut to it). The
clients are plain `wsroom.client.Client` objects, observed through their public
``on_frame`` and ``on_disconnect`` callbacks and cut with `Client.drop`; the gap check
is `wsroom._core.cursor.StreamCursor`, the one the client and the server use.

See docs/loadtest.md.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import inspect
import json
import math
import os
import random
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlsplit

import anyio
from anyio.abc import TaskGroup

from wsroom._core.cursor import Step, StreamCursor
from wsroom.client import Client, ClientClosed, Message, RequestError, Snapshot

__all__ = ["Histogram", "Options", "SetupError", "format_report", "main", "parse_args",
           "report", "run"]

PROBE = "{probe}"
CLIENT = "{client}"

_Scenario = Callable[["Options"], "Options | Awaitable[Options]"]
"""A scenario plug-in: gets the options, returns those of the run (sync or async)."""

_GAME_SCENARIO = "examples/fastapi_game/loadtest_scenario.py:scenario"
"""What ``--game`` stands for (a file of a clone of wsroom)."""


# ------------------------------------------------------------------------ options


@dataclass
class Options:
    """What to run (see `parse_args` for the meaning of most fields).

    ``auths`` are the clients' ``hello`` auths, used in turn (``{client}`` in a string is
    replaced with the client's number). ``scenario`` is a plug-in called before the run:
    it gets these options and returns those of the run (e.g. with ``auths`` set, and
    ``labels``: entries added to the report, such as ``{"game": "8ZAEF9"}``); it may be
    async, and raises `SetupError` when the setup fails. ``game`` is the shortcut to the
    example game's scenario (``examples/fastapi_game/loadtest_scenario.py``, from a clone
    of wsroom).
    """

    url: str
    clients: int = 100
    rate: float = 1.0
    duration: float = 10.0
    ramp: float = 0.0
    event: str = "chat"
    data: Any = field(default_factory=lambda: {"text": PROBE})
    echo_event: str | None = None
    fire_and_forget: bool = False
    auths: list[Any] | None = None
    game: bool = False
    scenario: _Scenario | None = None
    labels: dict[str, Any] = field(default_factory=dict)
    drop: float = 0.0
    drain: float = 3.0
    timeout: float = 10.0
    max_errors: int = 0
    headers: list[tuple[str, str]] = field(default_factory=list)
    forwarded_for: bool = False
    json_path: Path | None = None
    quiet: bool = False
    seed: int | None = None

    @property
    def echo(self) -> str:
        return self.echo_event or self.event


def _positive(kind: type[int] | type[float], minimum: float = 0.0,
              inclusive: bool = False) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not math.isfinite(value) or value < minimum or (value == minimum
                                                           and not inclusive):
            bound = f">= {minimum:g}" if inclusive else f"> {minimum:g}"
            raise argparse.ArgumentTypeError(f"must be {bound}, got {text}")
        return value
    return convert


def _json(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON ({exc}): {text!r}") from None


def _header(text: str) -> tuple[str, str]:
    name, sep, value = text.partition(":")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"expected 'Name: value', got {text!r}")
    return name.strip(), value.strip()


def _probability(text: str) -> float:
    value = _positive(float, 0.0, inclusive=True)(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return float(value)


def _parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Load-test a wsroom server: simulate many clients, measure "
                    "broadcast latency, check that no message is lost or duplicated "
                    "across drops and resumes.",
        epilog="Exit status: 0 if no gap and at most --max-errors errors, 1 otherwise, "
               "2 on bad arguments or setup failure, 130 if interrupted. "
               "Do not load-test a production server without telling its users.")
    parser.add_argument("url", help="the server's WebSocket URL (ws:// only), e.g. "
                                    "ws://127.0.0.1:8000/ws")
    parser.add_argument("--clients", "-n", type=_positive(int, 1, inclusive=True),
                        default=100, help="simulated clients (default 100)")
    parser.add_argument("--rate", "-r", type=_positive(float), default=1.0,
                        help="messages per second PER CLIENT (default 1; the total is "
                             "clients x rate)")
    parser.add_argument("--duration", "-d", type=_positive(float), default=10.0,
                        help="seconds of sending after the ramp (default 10)")
    parser.add_argument("--ramp", type=_positive(float, inclusive=True), default=0.0,
                        help="seconds over which the clients connect (default 0: all "
                             "at once); clients send as soon as they are connected")
    parser.add_argument("--event", default="chat",
                        help="the event each client sends (default chat)")
    parser.add_argument("--data", type=_json, default={"text": PROBE},
                        help="JSON data of each message; {probe} in a string is "
                             "replaced with the latency probe, {client} with the "
                             "client's number (default {\"text\": \"{probe}\"}; without "
                             "{probe}, an object gets a \"probe\" key)")
    parser.add_argument("--echo-event", metavar="NAME",
                        help="the event the server broadcasts back with the probe "
                             "(default: the same as --event)")
    parser.add_argument("--fire-and-forget", action="store_true",
                        help="send without a ref (no reply awaited); default: request "
                             "and wait for the reply")
    auth = parser.add_mutually_exclusive_group()
    auth.add_argument("--auth", type=_json, metavar="JSON",
                      help="the hello's auth for every client ({client} is replaced "
                           "with the client's number)")
    auth.add_argument("--auth-file", type=Path, metavar="PATH",
                      help="one JSON auth per line, used in turn by the clients")
    auth.add_argument("--game", action="store_true",
                      help="the example game: create a game and one seat per client "
                           "through its HTTP API (same host and port as URL); short for "
                           f"--scenario {_GAME_SCENARIO} (from a clone of wsroom)")
    parser.add_argument("--scenario", metavar="MODULE:CALLABLE",
                        help="a plug-in that sets the clients up: MODULE is an importable "
                             "module (the current directory is on the path) or a .py "
                             "file, CALLABLE (default: scenario) gets the options and "
                             "returns those of the run, e.g. with one auth per client")
    parser.add_argument("--drop", type=_probability, default=0.0, metavar="P",
                        help="probability per second that a connected client drops its "
                             "connection abruptly (TCP RST) and resumes (default 0)")
    parser.add_argument("--drain", type=_positive(float, inclusive=True), default=3.0,
                        help="seconds at most to wait for deliveries after the last "
                             "send (default 3)")
    parser.add_argument("--timeout", type=_positive(float), default=10.0,
                        help="seconds to wait for a reply (default 10)")
    parser.add_argument("--max-errors", type=_positive(int, 0, inclusive=True), default=0,
                        help="errors tolerated before the exit status is 1 (default 0)")
    parser.add_argument("--header", "-H", type=_header, action="append", default=[],
                        metavar="'NAME: VALUE'", help="an extra upgrade request header "
                                                      "(repeatable)")
    parser.add_argument("--forwarded-for", action="store_true",
                        help="give each client its own X-Forwarded-For address "
                             "(10.x.y.z), so that per-address caps apply per client; "
                             "only for servers that trust this machine as a proxy")
    parser.add_argument("--json", type=Path, metavar="PATH", dest="json_path",
                        help="write the final report as JSON to PATH")
    parser.add_argument("--quiet", "-q", action="store_true",
                        help="no progress line (the final report is still printed)")
    parser.add_argument("--seed", type=int, help="seed of the random choices (drops)")
    return parser


def parse_args(argv: Sequence[str], prog: str = "wsroom loadtest") -> Options:
    """Parse the command line into `Options` (exits with status 2 and a message on
    a mistake, like any argparse program)."""
    parser = _parser(prog)
    ns = parser.parse_args(list(argv))
    parts = urlsplit(ns.url)
    if parts.scheme != "ws" or not parts.hostname:
        parser.error(f"URL must be ws://host[:port]/path (the client has no TLS), "
                     f"got {ns.url!r}")
    data = ns.data
    if not _contains_probe(data) and not isinstance(data, dict):
        parser.error("--data must contain \"{probe}\" in a string, or be a JSON object "
                     "(a \"probe\" key is added)")
    auths: list[Any] | None = None
    if ns.auth is not None:
        auths = [ns.auth]
    elif ns.auth_file is not None:
        try:
            lines = ns.auth_file.read_text().splitlines()
        except OSError as exc:
            parser.error(f"--auth-file: {exc.strerror}: {ns.auth_file}")
        auths = []
        for number, line in enumerate(lines, 1):
            if line.strip():
                try:
                    auths.append(json.loads(line))
                except ValueError:
                    parser.error(f"--auth-file: line {number} is not valid JSON")
        if not auths:
            parser.error(f"--auth-file: no auth in {ns.auth_file}")
    scenario: _Scenario | None = None
    if ns.scenario is not None and ns.game:
        parser.error("--scenario: not allowed with --game (its shortcut)")
    if ns.scenario is not None or ns.game:
        try:
            scenario = _load_scenario(ns.scenario or _GAME_SCENARIO, game=ns.game)
        except SetupError as exc:
            parser.error(f"{'--game' if ns.game else '--scenario'}: {exc}")
    return Options(
        url=ns.url, clients=ns.clients, rate=ns.rate, duration=ns.duration, ramp=ns.ramp,
        event=ns.event, data=data, echo_event=ns.echo_event,
        fire_and_forget=ns.fire_and_forget, auths=auths, game=ns.game,
        scenario=scenario, drop=ns.drop,
        drain=ns.drain, timeout=ns.timeout, max_errors=ns.max_errors, headers=ns.header,
        forwarded_for=ns.forwarded_for, json_path=ns.json_path, quiet=ns.quiet,
        seed=ns.seed)


def _load_scenario(spec: str, *, game: bool = False) -> _Scenario:
    """The callable named by ``MODULE:CALLABLE`` (``:scenario`` when omitted), where
    MODULE is a dotted module name (importable, or from the current directory) or the
    path of a ``.py`` file. With `game`, a relative file is also looked for in the clone
    that holds this wsroom (an editable install).

    Raises:
        SetupError: if it cannot be loaded, or is not callable.
    """
    module_name, _, attribute = spec.rpartition(":")
    if not module_name or "/" in attribute or attribute.endswith(".py"):
        module_name, attribute = spec, "scenario"  # no ":", or a Windows-like path
    if module_name.endswith(".py") or os.sep in module_name or "/" in module_name:
        path = Path(module_name)
        if game and not path.is_absolute() and not path.is_file():
            clone = Path(__file__).resolve().parents[2]  # src/wsroom/loadtest.py
            if (clone / path).is_file():
                path = clone / path
        if not path.is_file():
            raise SetupError(f"no such file: {module_name}" + (
                " (the example game's scenario comes with a clone of wsroom: run from "
                "the clone, or use --scenario PATH)" if game else ""))
        name = f"wsroom_loadtest_scenario_{abs(hash(str(path.resolve()))):x}"
        module_spec = importlib.util.spec_from_file_location(name, path)
        if module_spec is None or module_spec.loader is None:
            raise SetupError(f"cannot load {path}")
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module
        try:
            module_spec.loader.exec_module(module)
        except Exception as exc:
            del sys.modules[name]
            raise SetupError(f"{path}: {type(exc).__name__}: {exc}") from exc
    else:
        added = os.getcwd() not in sys.path
        if added:
            sys.path.insert(0, os.getcwd())
        try:
            module = importlib.import_module(module_name)
        except Exception as exc:
            raise SetupError(f"cannot import {module_name}: {type(exc).__name__}: "
                             f"{exc}") from exc
        finally:
            if added:
                with contextlib.suppress(ValueError):
                    sys.path.remove(os.getcwd())
    found = getattr(module, attribute, None)
    if not callable(found):
        raise SetupError(f"{module_name} has no callable {attribute!r}")
    scenario: _Scenario = found
    return scenario


def _contains_probe(value: Any) -> bool:
    if isinstance(value, str):
        return PROBE in value
    if isinstance(value, dict):
        return any(_contains_probe(item) for item in value.values())
    if isinstance(value, list):
        return any(_contains_probe(item) for item in value)
    return False


def _fill(value: Any, replacements: dict[str, str]) -> Any:
    """`value` with every placeholder in its strings replaced."""
    if isinstance(value, str):
        if "{" in value:
            for key, text in replacements.items():
                value = value.replace(key, text)
        return value
    if isinstance(value, dict):
        return {key: _fill(item, replacements) for key, item in value.items()}
    if isinstance(value, list):
        return [_fill(item, replacements) for item in value]
    return value


def _find_probe(value: Any, prefix: str, depth: int = 0) -> str | None:
    """The first string in `value` that contains `prefix`, from `prefix` on."""
    if isinstance(value, str):
        at = value.find(prefix)
        return None if at < 0 else value[at:]
    if depth < 6:
        if isinstance(value, dict):
            value = value.values()
        elif not isinstance(value, list):
            return None
        for item in value:
            found = _find_probe(item, prefix, depth + 1)
            if found is not None:
                return found
    return None


# -------------------------------------------------------------------- measuring


class Histogram:
    """Durations in log-spaced buckets (about 1% wide): constant memory and time per
    sample, quantiles at any moment, exact count, mean and max."""

    __slots__ = ("buckets", "count", "max", "total")
    _PER_E = 100.0  # buckets per factor e
    _SIZE = 2200  # up to e**22 microseconds (about 1000 s)

    def __init__(self) -> None:
        self.buckets = [0] * self._SIZE
        self.count = 0
        self.total = 0.0
        self.max = 0.0

    def record(self, seconds: float) -> None:
        seconds = max(seconds, 0.0)
        index = int(math.log1p(seconds * 1e6) * self._PER_E)
        self.buckets[min(index, self._SIZE - 1)] += 1
        self.count += 1
        self.total += seconds
        self.max = max(self.max, seconds)

    def quantile(self, q: float) -> float | None:
        """The `q` quantile in seconds (within about 1%), or None without samples."""
        if not self.count:
            return None
        rank = max(1, math.ceil(q * self.count))
        seen = 0
        for index, number in enumerate(self.buckets):
            seen += number
            if seen >= rank:
                return min(math.expm1((index + 0.5) / self._PER_E) / 1e6, self.max)
        return self.max  # pragma: no cover - the counts add up to `count`

    def summary(self) -> dict[str, Any]:
        """Count, then mean, p50, p95, p99 and max in milliseconds (None if empty)."""
        def ms(value: float | None) -> float | None:
            return None if value is None else round(value * 1000, 3)
        return {"count": self.count,
                "mean": ms(self.total / self.count if self.count else None),
                "p50": ms(self.quantile(0.50)), "p95": ms(self.quantile(0.95)),
                "p99": ms(self.quantile(0.99)), "max": ms(self.max if self.count else None)}


@dataclass
class Stats:
    """Counters of one run (shared by all clients: one event loop, no locks)."""

    connected: int = 0
    ever_connected: int = 0
    connected_at_end: int = 0
    sent: int = 0
    skipped: int = 0
    replies: int = 0
    lost_requests: int = 0
    in_flight: int = 0
    deliveries: int = 0
    other_messages: int = 0
    snapshots: int = 0
    holes: int = 0
    missing: int = 0
    duplicates: int = 0
    drops: int = 0
    resumes: Counter[str] = field(default_factory=Counter)
    closes: Counter[str] = field(default_factory=Counter)
    failed_attempts: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    latency: Histogram = field(default_factory=Histogram)
    replay_latency: Histogram = field(default_factory=Histogram)
    reply_latency: Histogram = field(default_factory=Histogram)
    loop_lag: Histogram = field(default_factory=Histogram)

    @property
    def gaps(self) -> int:
        return self.holes + self.duplicates


class _Run:
    """The phases of a run, shared by its tasks."""

    def __init__(self, options: Options) -> None:
        self.options = options
        self.stats = Stats()
        self.prefix = f"lt:{random.getrandbits(32):08x}:"
        self.rng = random.Random(options.seed)
        self.started = time.monotonic()
        self.send_until = math.inf
        self.sending_stopped: float | None = None
        self.finished: float | None = None
        self.stop_sending = anyio.Event()
        self.closing = anyio.Event()
        self.interrupted = False

    def elapsed(self) -> float:
        return (self.finished or time.monotonic()) - self.started

    def send_window(self) -> float:
        return max((self.sending_stopped or time.monotonic()) - self.started, 1e-9)


class _Watch:
    """One simulated client: a plain `Client`, and what the run learns of it through
    the client's public callbacks (its connections, welcomes, the positions the server
    announced, stray error frames)."""

    def __init__(self, run: _Run, number: int, url: str, **kwargs: Any) -> None:
        self.run = run
        self.number = number
        self.client = Client(url, on_frame=self._frame, on_disconnect=self._disconnected,
                             **kwargs)
        self.announced: dict[str, set[tuple[str, int]]] = {}
        """Per stream, the positions the server set (welcomes, ``stream`` frames): a
        message right after one of them is not a gap."""
        self.lossy: set[str] = set()
        """Streams the server said may skip offsets (``drop_oldest``, ``coalesce``)."""
        self.dropping = False
        self.up = False
        """Welcomed on the current connection."""
        self.resumed_ns = 0
        """When the last welcome of a resume came (``time.monotonic_ns()``)."""

    async def drop(self) -> None:
        """Reset the connection (TCP RST, no close frame): the client resumes."""
        if self.up and not self.dropping:
            self.dropping = True
            await self.client.drop()

    def _announce(self, stream: str, position: dict[str, Any], lossy: bool) -> None:
        self.announced.setdefault(stream, set()).add(
            (str(position["epoch"]), int(position["offset"])))
        if lossy:
            self.lossy.add(stream)
        else:
            self.lossy.discard(stream)

    def _frame(self, frame: dict[str, Any]) -> None:
        """Every frame, before the client handles it (its attributes are still those
        of before the frame)."""
        stats, kind = self.run.stats, frame.get("type")
        if kind == "welcome":
            streams = frame.get("streams", {})
            if self.client.connects:
                if frame.get("session") != self.client.session:
                    result = "new_session"
                elif all(position.get("recovered") for position in streams.values()):
                    result = "recovered"
                else:
                    result = "not_recovered"
                stats.resumes[result] += 1
                self.resumed_ns = time.monotonic_ns()
            else:
                stats.ever_connected += 1
            self.lossy.clear()  # the session's streams are exactly these
            for name, position in streams.items():
                self._announce(name, position, bool(position.get("lossy")))
            if not self.up:
                self.up = True
                stats.connected += 1
        elif kind == "stream":
            self._announce(str(frame["stream"]), frame, bool(frame.get("lossy")))
        elif kind == "left":
            self.lossy.discard(str(frame["stream"]))
        elif kind == "snapshot":
            if self.client.connects > 1:  # not the snapshots of a first connection
                stats.snapshots += 1
        elif kind == "error" and frame.get("ref") is None:
            stats.errors[f"error frame {frame.get('code')}"] += 1  # answers no request

    def _disconnected(self, code: int, reason: str) -> None:
        stats = self.run.stats
        was_up, self.up = self.up, False
        if was_up:
            stats.connected -= 1
        if self.dropping:
            stats.drops += 1
            self.dropping = False
        elif self.run.closing.is_set():
            pass
        elif was_up:
            stats.closes[f"{code} {reason}".strip()] += 1
        elif reason.startswith("HTTP ") or reason == "connect failed":
            stats.failed_attempts[reason] += 1  # the upgrade was refused, or TCP failed
        else:
            stats.failed_attempts[f"{code} {reason}".strip() + " before the welcome"] += 1


# ---------------------------------------------------------------------- clients


def _forwarded_address(number: int) -> str:
    return f"10.{(number >> 16) & 255}.{(number >> 8) & 255}.{number & 255}"


async def _client(run: _Run, number: int, auth: Any) -> None:
    options = run.options
    delay = options.ramp * number / options.clients
    if delay > 0:
        with anyio.move_on_after(delay):
            await run.closing.wait()
    if run.closing.is_set():
        return  # stopped during the ramp
    headers = list(options.headers)
    if options.forwarded_for:
        headers.append(("X-Forwarded-For", _forwarded_address(number + 1)))
    watch = _Watch(run, number, options.url, auth=auth, headers=headers,
                   rng=random.Random(run.rng.random()))
    client = watch.client
    async with client, anyio.create_task_group() as tg:
        tg.start_soon(_consume, run, watch)
        tg.start_soon(_send, run, watch, tg)
        if options.drop > 0:
            tg.start_soon(_drop, run, watch)
        await run.closing.wait()
        if not watch.up and client.closed is None and client.connects == 0:
            run.stats.errors["never connected"] += 1
        tg.cancel_scope.cancel()


def _check(watch: _Watch, audit: StreamCursor, item: Message) -> bool:
    """Whether `item` is the next message of its stream as `messages()` hands it out
    (the client deduplicates and resumes: this checks that it did); counts gaps."""
    stats, stream = watch.run.stats, item.stream
    known = audit.get(stream)
    step = audit.advance(stream, item.epoch, item.offset)
    if step is Step.DUPLICATE:
        stats.duplicates += 1
        return False
    if step is Step.NEW and known is not None:
        return True
    # The first message of a stream, a hole or another epoch: fine only right after a
    # position the server announced, or in a room that may skip offsets.
    if ((item.epoch, item.offset - 1) not in watch.announced.get(stream, ())
            and stream not in watch.lossy):
        stats.holes += 1
        if step is Step.HOLE and known is not None:
            stats.missing += item.offset - known[1] - 1
    audit.set(stream, item.epoch, item.offset)
    return True


async def _consume(run: _Run, watch: _Watch) -> None:
    stats, client = run.stats, watch.client
    prefix, echo = run.prefix, run.options.echo
    audit = StreamCursor()  # what the application was handed, per stream
    async for item in client.messages():
        if isinstance(item, Snapshot):
            audit.set(item.stream, item.epoch, item.offset)
            continue
        if not _check(watch, audit, item):
            continue
        probe = _find_probe(item.data, prefix) if item.event == echo else None
        if probe is None:
            stats.other_messages += 1
            continue
        try:
            sent_ns = int(probe.split(":", 5)[4].split()[0])
        except (IndexError, ValueError):
            stats.other_messages += 1
            continue
        stats.deliveries += 1
        latency = (time.monotonic_ns() - sent_ns) / 1e9
        if sent_ns < watch.resumed_ns:  # missed while disconnected: replayed
            stats.replay_latency.record(latency)
        else:
            stats.latency.record(latency)
    closed = client.closed
    if closed is not None and not run.closing.is_set():
        run.stats.errors[f"closed {closed.code} {closed.reason}".strip()] += 1


async def _send(run: _Run, watch: _Watch, tg: TaskGroup) -> None:
    options, stats, client = run.options, run.stats, watch.client
    interval = 1.0 / options.rate
    try:
        await client.wait_connected()
    except ClientClosed:
        return
    template = options.data
    add_key = not _contains_probe(template)
    sequence = 0
    tick = anyio.current_time() + run.rng.uniform(0, interval)
    while not run.stop_sending.is_set():
        await anyio.sleep_until(tick)
        now = anyio.current_time()
        tick += interval
        if tick < now:  # late (a busy loop, a blocked send): skip, do not burst
            stats.skipped += int((now - tick) / interval) + 1
            tick = now + interval
        if run.stop_sending.is_set() or time.monotonic() >= run.send_until:
            return
        if not client.connected:
            if client.closed is not None:
                return  # stopped for good (the consumer counts it)
            stats.skipped += 1
            continue
        sequence += 1
        probe = f"{run.prefix}{watch.number}:{sequence}:{time.monotonic_ns()}"
        if add_key:
            data = {**_fill(template, {CLIENT: str(watch.number)}), "probe": probe}
        else:
            data = _fill(template, {PROBE: probe, CLIENT: str(watch.number)})
        stats.sent += 1
        if options.fire_and_forget:
            try:
                with anyio.move_on_after(options.timeout):
                    await client.send(options.event, data)
            except ClientClosed:
                return
        else:
            tg.start_soon(_request, run, client, data)


async def _request(run: _Run, client: Client, data: Any) -> None:
    stats = run.stats
    stats.in_flight += 1
    started = time.monotonic()
    try:
        await client.request(run.options.event, data, timeout=run.options.timeout)
    except RequestError as exc:
        if exc.code == "connection_lost":
            stats.lost_requests += 1
        else:
            stats.errors[f"error frame {exc.code}"] += 1
    except TimeoutError:
        stats.errors["no reply (timeout)"] += 1
    except ClientClosed:
        pass  # counted by the consumer
    else:
        stats.replies += 1
        stats.reply_latency.record(time.monotonic() - started)
    finally:
        stats.in_flight -= 1


async def _drop(run: _Run, watch: _Watch) -> None:
    probability = run.options.drop
    await anyio.sleep(run.rng.uniform(0, 1))
    while not run.stop_sending.is_set():
        if watch.up and run.rng.random() < probability:
            await watch.drop()
        await anyio.sleep(1)


# ------------------------------------------------------------------- the run


async def _monitor_loop(run: _Run) -> None:
    """The load generator's own event loop lag: if it is high, the latencies measured
    include the generator's delay, not only the server's."""
    while True:
        before = anyio.current_time()
        await anyio.sleep(0.1)
        run.stats.loop_lag.record(anyio.current_time() - before - 0.1)


def _progress_line(run: _Run) -> str:
    stats = run.stats
    p99 = stats.latency.quantile(0.99)
    p99_text = "-" if p99 is None else _ms(p99)
    return (f"{run.elapsed():6.1f}s  connected {stats.connected}/{run.options.clients}  "
            f"sent {stats.sent}  received {stats.deliveries}  p99 {p99_text}  "
            f"resumes {sum(stats.resumes.values())}  gaps {stats.gaps}  "
            f"errors {sum(stats.errors.values())}")


async def _progress(run: _Run, stream: TextIO) -> None:
    tty = stream.isatty()
    every = 0.5 if tty else 5.0
    width = 0
    stopped = False
    while True:
        with anyio.move_on_after(every):
            if not stopped and not tty:  # a line when the sending ends, too
                await run.stop_sending.wait()
                stopped = True
            else:
                await anyio.sleep(every)
        line = _progress_line(run) + ("  (sending done)" if stopped and not tty else "")
        if tty:
            stream.write("\r" + line.ljust(width))
            width = len(line)
        else:
            stream.write(line + "\n")
        stream.flush()


def _clear_progress(stream: TextIO, quiet: bool) -> None:
    if not quiet and stream.isatty():
        stream.write("\n")
        stream.flush()


async def _signals(run: _Run, cancel: anyio.CancelScope) -> None:
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for _ in signals:
            if run.interrupted:  # the second Ctrl-C: do not wait for the goodbyes
                cancel.cancel()
                return
            run.interrupted = True
            run.stop_sending.set()
            run.closing.set()


class SetupError(Exception):
    """The run could not start: its scenario could not be loaded, or failed (the
    example game's HTTP API answered with an error, for example)."""


async def _set_up(options: Options) -> Options:
    """The options of the run: those the scenario returns, if there is one."""
    scenario = options.scenario
    if scenario is None and options.game:
        scenario = _load_scenario(_GAME_SCENARIO, game=True)
    if scenario is None:
        return options
    try:
        result = scenario(options)
        if inspect.isawaitable(result):
            result = await result
    except SetupError:
        raise
    except Exception as exc:
        raise SetupError(f"the scenario failed: {type(exc).__name__}: {exc}") from exc
    if not isinstance(result, Options):
        raise SetupError(f"the scenario returned {type(result).__name__}, not Options")
    return result


def _raise_fd_limit(clients: int) -> str | None:
    """Raise the soft limit on open files for `clients` sockets; a warning if the hard
    limit is too low."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not on Unix
        return None
    needed = clients + 256
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
    if soft != resource.RLIM_INFINITY and soft < needed:
        return (f"the open files limit is {soft}, {clients} clients need about {needed}: "
                f"raise it (ulimit -n) or some connections will fail")
    return None


async def run(options: Options, *, progress: TextIO | None = None) -> dict[str, Any]:
    """Run a load test; return its report (see `report`)."""
    options = await _set_up(options)
    state = _Run(options)
    stats = state.stats
    auths = options.auths or [None]
    async with anyio.create_task_group() as outer:
        if threading.current_thread() is threading.main_thread():
            outer.start_soon(_signals, state, outer.cancel_scope)
        try:
            outer.start_soon(_monitor_loop, state)
            if progress is not None:
                outer.start_soon(_progress, state, progress)
            state.started = time.monotonic()
            state.send_until = state.started + options.ramp + options.duration
            async with anyio.create_task_group() as clients:
                for number in range(options.clients):
                    auth = _fill(auths[number % len(auths)], {CLIENT: str(number)})
                    clients.start_soon(_client, state, number, auth)
                with anyio.move_on_after(options.ramp + options.duration):
                    await state.stop_sending.wait()
                state.stop_sending.set()
                state.sending_stopped = time.monotonic()
                stats.connected_at_end = stats.connected
                # Drain: until nothing arrived for a moment and no request is pending.
                with anyio.move_on_after(options.drain):
                    seen = -1
                    while seen != stats.deliveries or stats.in_flight:
                        if state.closing.is_set():
                            break
                        seen = stats.deliveries
                        await anyio.sleep(0.5)
                state.finished = time.monotonic()
                state.closing.set()
        finally:
            state.sending_stopped = state.sending_stopped or time.monotonic()
            state.finished = state.finished or time.monotonic()
            outer.cancel_scope.cancel()
    return report(state)


def report(state: _Run) -> dict[str, Any]:
    """The run's results as a JSON-able dict."""
    options, stats = state.options, state.stats
    window = state.send_window()
    errors = sum(stats.errors.values())
    passed = stats.gaps == 0 and errors <= options.max_errors and not state.interrupted
    return {
        "url": options.url,
        "clients": options.clients,
        "rate_per_client": options.rate,
        "duration": options.duration,
        "ramp": options.ramp,
        "drop_per_second": options.drop,
        "mode": "fire_and_forget" if options.fire_and_forget else "request",
        "event": options.event,
        "echo_event": options.echo,
        **options.labels,
        "interrupted": state.interrupted,
        "elapsed": round(state.elapsed(), 3),
        "sent": stats.sent,
        "sent_per_second": round(stats.sent / window, 2),
        "skipped": stats.skipped,
        "replies": stats.replies,
        "lost_requests": stats.lost_requests,
        "deliveries": stats.deliveries,
        "deliveries_per_second": round(stats.deliveries / window, 2),
        "other_messages": stats.other_messages,
        "latency_ms": stats.latency.summary(),
        "replay_latency_ms": stats.replay_latency.summary(),
        "reply_latency_ms": stats.reply_latency.summary(),
        "gaps": stats.gaps,
        "holes": stats.holes,
        "missing": stats.missing,
        "duplicates": stats.duplicates,
        "snapshots": stats.snapshots,
        "drops": stats.drops,
        "resumes": {"total": sum(stats.resumes.values()),
                    "recovered": stats.resumes["recovered"],
                    "not_recovered": stats.resumes["not_recovered"],
                    "new_session": stats.resumes["new_session"]},
        "closes": dict(stats.closes),
        "failed_attempts": dict(stats.failed_attempts),
        "errors": {"total": errors, **dict(stats.errors)},
        "max_errors": options.max_errors,
        "connected_at_end": stats.connected_at_end,
        "ever_connected": stats.ever_connected,
        "loop_lag_ms": stats.loop_lag.summary(),
        "passed": passed,
    }


# -------------------------------------------------------------------- printing


def _ms(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    value = seconds * 1000
    return f"{value:.1f} ms" if value < 100 else f"{value:.0f} ms"


def _counts(counter: dict[str, int]) -> str:
    return ", ".join(f"{key} x{value}" for key, value in sorted(
        counter.items(), key=lambda item: -item[1])) or "none"


def format_report(result: dict[str, Any]) -> str:
    """The report as a table for a terminal."""

    def latency(summary: dict[str, Any]) -> str:
        if not summary["count"]:
            return "no samples"
        return "  ".join(f"{key} {summary[key]:.1f} ms" if summary[key] < 100
                         else f"{key} {summary[key]:.0f} ms"
                         for key in ("p50", "p95", "p99", "max")) + f"  (n={summary['count']})"

    resumes = result["resumes"]
    errors = dict(result["errors"])
    total_errors = errors.pop("total")
    per_message = result["deliveries"] / result["sent"] if result["sent"] else 0.0
    rows = [
        ("latency", latency(result["latency_ms"])),
        ("replayed", latency(result["replay_latency_ms"])),
    ]
    if result["mode"] == "request":
        rows.append(("reply latency", latency(result["reply_latency_ms"])))
    rows += [
        ("sent", f"{result['sent']} ({result['sent_per_second']:g}/s); "
                 f"skipped while disconnected or late: {result['skipped']}"
                 + (f"; requests lost with their connection: {result['lost_requests']}"
                    if result["mode"] == "request" else "")),
        ("deliveries", f"{result['deliveries']} ({result['deliveries_per_second']:g}/s, "
                       f"{per_message:.1f} per message sent)"),
        ("gaps", f"{result['gaps']} (holes {result['holes']}, missing messages "
                 f"{result['missing']}, duplicates {result['duplicates']})"),
        ("resumes", f"{resumes['total']}: recovered {resumes['recovered']}, not recovered "
                    f"{resumes['not_recovered']}, new session {resumes['new_session']}; "
                    f"snapshots after a resume {result['snapshots']}"),
        ("drops", f"{result['drops']} (ours)"),
        ("server closes", _counts(result["closes"])),
        ("failed attempts", _counts(result["failed_attempts"])),
        ("errors", f"{total_errors}" + (f": {_counts(errors)}" if errors else "")
                   + f" (tolerated: {result['max_errors']})"),
        ("clients", f"{result['ever_connected']}/{result['clients']} connected at least "
                    f"once, {result['connected_at_end']} at the end"),
        ("generator lag", f"p99 {_ms_value(result['loop_lag_ms']['p99'])}, "
                          f"max {_ms_value(result['loop_lag_ms']['max'])}"),
    ]
    title = (f"wsroom load test: {result['url']}, {result['clients']} clients x "
             f"{result['rate_per_client']:g} msg/s, {result['duration']:g} s"
             + (f" (+{result['ramp']:g} s ramp)" if result["ramp"] else "")
             + (f", drop {result['drop_per_second']:g}/s" if result["drop_per_second"]
                else "")
             + (f", game {result['game']}" if "game" in result else "")
             + f", {result['elapsed']:.1f} s in all")
    width = max(len(name) for name, _ in rows)
    lines = [title, ""] + [f"  {name.ljust(width)}  {value}" for name, value in rows]
    notes = []
    if result["interrupted"]:
        notes.append("interrupted: the numbers are those so far")
    lag = result["loop_lag_ms"]["p99"]
    if lag is not None and lag > 50:
        notes.append("the load generator itself was busy (event loop lag above): the "
                     "latencies include its delay; use fewer clients per process")
    if any("429" in key for key in result["failed_attempts"]):
        notes.append("HTTP 429: the server's per-address caps (max_connections_per_ip, "
                     "connect_rate_per_ip) count all clients as one address; see "
                     "--forwarded-for")
    if not result["deliveries"] and result["sent"]:
        notes.append(f"no message came back: does the server broadcast "
                     f"{result['echo_event']!r} with the probe to the sender's room? "
                     f"(--echo-event)")
    verdict = ("INTERRUPTED" if result["interrupted"]
               else "PASS" if result["passed"] else "FAIL")
    lines += [""] + [f"  note: {note}" for note in notes] + [
        f"  result: {verdict} (gaps {result['gaps']}, errors {total_errors}, "
        f"tolerated {result['max_errors']})"]
    return "\n".join(lines)


def _ms_value(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} ms"


# ------------------------------------------------------------------------ main


def main(argv: Sequence[str] | None = None) -> int:
    """The command line: ``wsroom loadtest URL [options]`` (the ``wsroom`` console
    script passes its arguments) or ``python -m wsroom.loadtest URL [options]``. Returns
    the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["loadtest"]:
        args = args[1:]
    options = parse_args(args, prog="wsroom loadtest" if argv is not None
                         else "python -m wsroom.loadtest")
    warning = _raise_fd_limit(options.clients)
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    progress = None if options.quiet else sys.stderr
    try:
        result = anyio.run(lambda: run(options, progress=progress))
    except SetupError as exc:
        print(f"error: setup failed: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # during the setup
        return 130
    _clear_progress(sys.stderr, options.quiet)
    text = format_report(result)
    print(text)
    if options.json_path is not None:
        options.json_path.write_text(json.dumps(result, indent=2) + "\n")
    if result["interrupted"]:
        return 130
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    # Run the imported module's main, not this copy's (`python -m wsroom.loadtest`): a
    # scenario imports wsroom.loadtest, whose Options and SetupError must be the ones
    # the run checks against.
    from wsroom.loadtest import main as _main

    sys.exit(_main())
