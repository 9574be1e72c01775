"""Settings whose defaults depend on others."""

from __future__ import annotations

from iotjx.settings import Settings


def test_database_writers_default_to_two_and_to_one_per_replica():
    assert Settings().database_writers == 2
    assert Settings(mqtt_shared_group="g").database_writers == 1     # replicas share the database
    assert Settings(mqtt_shared_group="g", db_writers=3).database_writers == 3
    assert Settings(db_writers=1).database_writers == 1
