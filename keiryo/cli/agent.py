"""``keiryo agent ...``: run the edge updater on a device (see docs/updates.md)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

agent_app = typer.Typer(
    help="The device's updater: follows a registry alias with TUF checks, stages, smoke-tests, swaps atomically, "
    "watches a health window, commits or rolls back; serves local inference from the active model.",
    no_args_is_help=True,
)

SourceOpt = Annotated[str, typer.Option("--source", help="registry: http(s):// URL or a directory")]
NameOpt = Annotated[str, typer.Option("--name", help="the package this device runs")]
AliasOpt = Annotated[str, typer.Option("--alias", help="the alias it follows")]
RootOpt = Annotated[Path, typer.Option("--trusted-root", help="the registry's tuf/1.root.json, provisioned out of band")]
KeyOpt = Annotated[Path, typer.Option("--public-key", help="the package signer's public key (PEM)")]
StateOpt = Annotated[Path, typer.Option("--state-dir", help="where versions, state and trusted metadata live")]


def _agent(**kw: Any) -> Any:
    from keiryo.agent import Agent, AgentConfig

    cfg = AgentConfig.parse({k: (str(v) if isinstance(v, Path) else v) for k, v in kw.items() if v is not None}, where="agent")
    return Agent(cfg, log=lambda s: typer.echo(s, err=True))


@agent_app.command("run")
def agent_run(
    source: SourceOpt,
    name: NameOpt,
    trusted_root: RootOpt,
    public_key: KeyOpt,
    state_dir: StateOpt,
    alias: AliasOpt = "production",
    host: Annotated[str, typer.Option(help="local endpoint interface")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="local endpoint port (0: none)")] = 8200,
    api_key: Annotated[
        Optional[str], typer.Option("--api-key", envvar="KEIRYO_AGENT_KEY", help="bearer key for local inference")
    ] = None,
    poll_s: Annotated[float, typer.Option(min=0.01, help="check for an update every N s")] = 30.0,
    health_window_s: Annotated[float, typer.Option(min=0, help="watch a new version this long before committing")] = 10.0,
    max_errors: Annotated[int, typer.Option(min=0, help="local inference errors tolerated in the window")] = 0,
    health_command: Annotated[Optional[str], typer.Option(help="command run in the window; non-zero exit = roll back")] = None,
    latency_budget_ms: Annotated[Optional[float], typer.Option(help="smoke test: golden-row p50 must be under this")] = None,
    memory_budget_mb: Annotated[Optional[float], typer.Option(help="smoke test: loading may grow RSS by this much")] = None,
    max_staleness_s: Annotated[float, typer.Option(min=1, help="stop serving after this long without a good check")] = 604800.0,
    offline: Annotated[bool, typer.Option("--offline", help="never contact the registry (serve within max staleness)")] = False,
    threads: Annotated[int, typer.Option(min=1, help="intra-op threads")] = 1,
    decryption_key: Annotated[
        Optional[Path], typer.Option("--decryption-key", help="key for encrypted packages (default $KEIRYO_DECRYPTION_KEY)")
    ] = None,
) -> None:
    """Keep the device's model current and serve it locally (OIP v2 REST on --port)."""
    agent = _agent(**{k: v for k, v in locals().items() if k not in ("host", "port", "api_key")})  # the options, first
    import signal
    import threading

    from keiryo.agent.endpoint import Endpoint

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    if port:
        with Endpoint(agent, host, port, api_key=api_key) as ep:
            typer.echo(f"keiryo agent: {name}@{alias} from {source}; local endpoint http://{host}:{ep.port}/", err=True)
            agent.run(stop)
    else:
        agent.run(stop)


@agent_app.command("check")
def agent_check(
    source: SourceOpt,
    name: NameOpt,
    trusted_root: RootOpt,
    public_key: KeyOpt,
    state_dir: StateOpt,
    alias: AliasOpt = "production",
    health_window_s: Annotated[float, typer.Option(min=0, help="watch a new version this long before committing")] = 10.0,
) -> None:
    """One update cycle, then exit (for cron, or a first install). Prints the outcome as JSON."""
    agent = _agent(**locals())
    agent.recover()
    outcome = agent.check()
    typer.echo(json.dumps({"outcome": outcome, "active": agent.active and agent.active.version}))


@agent_app.command("status")
def agent_status(state_dir: StateOpt, name: NameOpt) -> None:
    """The device's state record and its last events (JSON)."""
    from keiryo.agent.state import StateDir

    d = StateDir(state_dir, name)
    typer.echo(
        json.dumps({"current": d.active(), **json.loads(d.load().model_dump_json()), "events": d.events()[-10:]}, indent=2)
    )
