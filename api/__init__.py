"""The HTTP API (FastAPI): health, the device registry, coverage against targets."""
