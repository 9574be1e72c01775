"""`create_app(settings)`: the FastAPI application.

Every request passes, outermost first: LastResort (an unhandled exception becomes a logged 500
problem) → CORS (only when IOTJX_API_CORS_ORIGINS lists origins: answers their preflights and marks
their answers; otherwise absent, and no Access-Control-* header is ever sent) → CleanUrl (no NUL in the
URL) → Authenticate (the API key; 401 for anyone without a valid one, except on /health) → RateLimit
(429 + Retry-After past IOTJX_API_RATE_PER_S / IOTJX_API_RATE_BURST for the key; /health exempt) →
BodyLimit (413 past IOTJX_API_MAX_BODY, or IOTJX_API_MAX_IMPORT_BYTES for the CSV import) → the route, whose role dependency answers 403 for a key of too low a role, and
which refuses a query parameter it does not take (422: a misspelt `as_of` is not silently ignored).  Every
error is a problem document with a stable `type` (api/problems.py).  OpenAPI at /openapi.json and /docs, with a key."""

from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI
from psycopg_pool import ConnectionPool

from api import problems
from analytics.coverage import CoverageService
from analytics.schedule import AnalyticsLoop
from api.auth import Authenticate
from ingest.aggregates import Aggregator
from api.deps import refuse_unknown_query
from api.limits import BodyLimit, CleanUrl, Cors, RateLimit
from api.jobs import JobRunner
from api.routes import (alarms, audit, cities, coverage, credentials, devices, downlinks, fire, health, jobs, keys,
                        radio, rejects, reports, sites, system, telemetry, traffic, water)
from iotjx import __version__
from iotjx.settings import Settings
from iotjx.targets import load_catalogue

ROUTERS = (system.router, devices.router, credentials.router, downlinks.router, sites.router, coverage.router,
           keys.router, audit.router, telemetry.router, alarms.router, rejects.router, jobs.router, cities.router, water.router,
           fire.router, traffic.router, radio.router, health.router, reports.router)


def create_app(settings: Settings) -> FastAPI:
    """The API over `settings.database_url` (a pool opened with the app's lifespan)."""
    if settings.database_url is None:
        raise ValueError("the API needs IOTJX_DATABASE_URL")
    pool = ConnectionPool(settings.database_url, min_size=1, max_size=8, open=False,
                          kwargs={"application_name": "iotjx-api", "autocommit": True})

    catalogue = load_catalogue(settings.targets_file)      # a bad catalogue stops the start, naming the entry
    service = CoverageService(pool.connection, catalogue, settings)
    # Fire lifecycles, water figures, coverage snapshots every IOTJX_ANALYTICS_INTERVAL_S (0: off); a
    # replica finding another one's round running skips it (analytics/schedule.py).
    analytics = AnalyticsLoop(pool.connection, settings, catalogue=catalogue)
    # Background jobs (re-decodes) on connections of their own, one at a time (api/jobs.py).
    runner = JobRunner(settings.database_url, lambda: Aggregator(settings.tz) if settings.rollups else None)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        pool.open(wait=False)
        service.start()
        analytics.start()
        runner.start()
        yield
        runner.stop()
        analytics.stop()
        service.stop()
        pool.close()

    # The framework's own /docs and /openapi.json would answer anyone: they are routes of ours instead.
    app = FastAPI(title="iotjx", version=__version__, lifespan=lifespan, openapi_url=None, docs_url=None,
                  redoc_url=None, dependencies=[Depends(refuse_unknown_query)], description="Telemetry backend of Jiangxi's mobile-IoT programme (物联江西). "
                                              "Every route but /health needs `Authorization: Bearer KEY`.")
    app.state.pool = pool
    app.state.settings = settings
    app.state.catalogue = catalogue
    app.state.coverage = service
    app.state.analytics = analytics
    app.state.jobs = runner
    for router in ROUTERS:
        app.include_router(router)
    # add_middleware puts each new one outside the previous: listed innermost first.
    app.add_middleware(BodyLimit, default=settings.api_max_body,
                       per_path={"/devices/bulk": settings.api_max_import_bytes,
                                 "/sites/bulk": settings.api_max_import_bytes})
    app.add_middleware(RateLimit, rate=settings.api_rate_per_s, burst=settings.api_rate_burst)
    app.add_middleware(Authenticate, pool=pool)
    app.add_middleware(CleanUrl)
    if settings.cors_origins:        # outside Authenticate: a browser's preflight carries no key
        app.add_middleware(Cors, origins=settings.cors_origins)
    problems.install(app)           # handlers, and LastResort outermost
    return app
