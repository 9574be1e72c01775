"""PGlite + TimescaleDB (WebAssembly, npm) for the schema tests: engine.mjs runs it, engine.py drives it."""
