"""iotjx: what every part of the telemetry backend shares — settings, domain types, schema, CLI."""

__version__ = "0.1.0"
