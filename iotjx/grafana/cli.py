"""`iotjx grafana generate [--check]` and `iotjx grafana push` (added to `iotjx` by iotjx/cli.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

grafana_app = typer.Typer(help="Grafana: the boards and provisioning files generated from Python, and pushed to a "
                               "running Grafana.", no_args_is_help=True)


@grafana_app.command("generate")
def generate(check: Annotated[bool, typer.Option(
                 help="write nothing; exit 1 when the files differ from a fresh generation")] = False,
             out: Annotated[Optional[Path], typer.Option(
                 help="a directory for dashboards/ and provisioning/; default: the checkout's deploy/grafana")] = None
             ) -> None:
    """Write deploy/grafana/dashboards/*.json and deploy/grafana/provisioning/*/iotjx.yaml."""
    from iotjx.grafana import boards, provisioning

    dashboards_dir = boards.DASHBOARDS_DIR if out is None else out / "dashboards"
    provisioning_dir = provisioning.PROVISIONING_DIR if out is None else out / "provisioning"
    if check:
        stale = boards.differences(dashboards_dir) + [f"provisioning/{p}" for p in provisioning.differences(provisioning_dir)]
        if stale:
            typer.echo(f"out of date (run `iotjx grafana generate`): {', '.join(stale)}", err=True)
            raise typer.Exit(1)
        typer.echo(f"{dashboards_dir.parent} is up to date")
        return
    for path in boards.write(dashboards_dir) + provisioning.write(provisioning_dir):
        typer.echo(f"wrote {path}")


@grafana_app.command("push")
def push(timeout: Annotated[float, typer.Option(min=0.1, help="seconds per HTTP request")] = 10.0) -> None:
    """Create or update the data source, folder and boards in the Grafana at IOTJX_GRAFANA_URL."""
    from iotjx.cli import _settings
    from iotjx.grafana.push import PushError, push as do_push

    settings = _settings()
    database_url = settings.grafana_database_url or settings.database_url
    if not database_url:
        typer.echo("set IOTJX_GRAFANA_DATABASE_URL (or IOTJX_DATABASE_URL): the database as Grafana reaches it",
                   err=True)
        raise typer.Exit(2)
    try:
        result = do_push(settings.grafana_url, database_url, token=settings.grafana_token,
                         user=settings.grafana_user, password=settings.grafana_password, timeout=timeout)
    except PushError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"Grafana {result.grafana_version or '?'} at {settings.grafana_url}")
    for name, action in result.actions.items():
        typer.echo(f"  {name}: {action}")
