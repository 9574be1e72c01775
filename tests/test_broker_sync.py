"""`iotjx.broker_sync`: the files PostgreSQL writes line by line hold what Python computes from the
same rows; retired devices are left out; the files are whole, 0640, and nothing is left beside them."""

from __future__ import annotations

import psycopg
import pytest

from iotjx import broker_sync, mqtt_accounts
from tests.helpers import register_fleet


def test_the_streamed_password_file_is_the_registry_in_mosquittos_format(db_url, tmp_path):
    fleet = register_fleet(db_url, 5, seed=71)
    ids = [d.record.device_id for d in fleet]
    with psycopg.connect(db_url) as conn:
        for device_id in ids:
            mqtt_accounts.set_device_password(conn, device_id)
        mqtt_accounts.set_service_account(conn, "gw-a", "gateway")
        mqtt_accounts.set_service_account(conn, "tester-a", "tester")
        conn.execute("UPDATE devices SET status = 'retired' WHERE device_id = %s", (ids[0],))
        conn.execute("UPDATE devices SET status = 'inactive' WHERE device_id = %s", (ids[1],))
        conn.commit()
        rows = conn.execute("SELECT username, role, iterations, salt, password_hash FROM mqtt_accounts").fetchall()
        result = broker_sync.sync(conn, tmp_path, "jx/iotjx")
    # What each line must be, computed in Python from the rows (mqtt_accounts.mosquitto_hash is held
    # equal to mosquitto_passwd's output in tests/test_mqtt_accounts.py).
    want = {r[0]: f"{r[0]}:{mqtt_accounts.mosquitto_hash(r[2], bytes(r[3]), bytes(r[4]))}" for r in rows}
    devices = (tmp_path / "devices.passwd").read_text().splitlines()
    services = (tmp_path / "services.passwd").read_text().splitlines()
    assert sorted(devices) == sorted(want[i] for i in ids[1:])                   # the retired one left out
    assert services == [want["gw-a"], want["tester-a"]]
    assert (result.devices, result.services) == (4, 2)
    assert result.device_bytes == (tmp_path / "devices.passwd").stat().st_size
    assert (tmp_path / "devices.acl").read_text().splitlines()[-3:] == [
        "pattern write jx/iotjx/up/%u", "pattern write jx/iotjx/ack/%u", "pattern read jx/iotjx/down/%u"]
    assert (tmp_path / "services.acl").read_text().splitlines()[1:] == [
        "user gw-a", "topic read jx/iotjx/up/+", "topic read jx/iotjx/ack/+", "topic write jx/iotjx/down/+",
        "topic read jx/iotjx/replay/+",
        "user tester-a", "topic write jx/iotjx/up/+", "topic read jx/iotjx/up/+", "topic write jx/iotjx/replay/+"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["devices.acl", "devices.passwd", "services.acl",
                                                          "services.passwd"]
    assert all(p.stat().st_mode & 0o777 in (0o640, 0o644) for p in tmp_path.iterdir())


def test_a_failed_write_leaves_the_old_file_whole(tmp_path):
    broker_sync.write_files(tmp_path, "iotjx", [], [b"a:$7$1$x$y\n"])

    def broken():
        yield b"b:$7$1$x$y\n"
        raise OSError("the database went away mid-COPY")

    with pytest.raises(OSError):
        broker_sync.write_files(tmp_path, "iotjx", [], broken())
    assert (tmp_path / "devices.passwd").read_text() == "a:$7$1$x$y\n"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("prefix", ["", "a/#", "a b", "a+/b", "%u", "a//b"])
def test_a_prefix_an_acl_cannot_hold_is_refused(prefix, tmp_path):
    with pytest.raises(ValueError, match="topic prefix"):
        broker_sync.write_files(tmp_path, prefix, [])


def test_the_gateways_client_id_and_group_are_not_its_name_and_stay_the_same():
    from iotjx.settings import Settings
    a = Settings(mqtt_client_id="gw-1", mqtt_shared_group="iotjx", mqtt_password="p" * 20)
    again = Settings(mqtt_client_id="gw-1", mqtt_shared_group="iotjx", mqtt_password="p" * 20)
    replica = Settings(mqtt_client_id="gw-2", mqtt_shared_group="iotjx", mqtt_password="p" * 20)
    other = Settings(mqtt_client_id="gw-1", mqtt_shared_group="iotjx", mqtt_password="q" * 20)
    kept = Settings(mqtt_client_id="gw-1", mqtt_shared_group="iotjx", mqtt_password="q" * 20,
                    mqtt_session_secret="p" * 20)
    assert a.mqtt_session_client_id.startswith("gw-1-") and len(a.mqtt_session_client_id) == len("gw-1-") + 20
    assert a.mqtt_session_client_id == again.mqtt_session_client_id                 # stable across restarts
    assert replica.mqtt_session_client_id != a.mqtt_session_client_id
    assert replica.mqtt_share_group == a.mqtt_share_group != "iotjx"                # replicas share the group
    assert other.mqtt_session_client_id != a.mqtt_session_client_id
    assert kept.mqtt_session_client_id == a.mqtt_session_client_id                  # the secret, not the password
    assert a.uplink_topic_filter == f"$share/{a.mqtt_share_group}/iotjx/up/+"
    anonymous = Settings(mqtt_client_id="gw-1", mqtt_shared_group="g")
    assert (anonymous.mqtt_session_client_id, anonymous.mqtt_share_group) == ("gw-1", "g")
    with pytest.raises(ValueError, match="mqtt_protocol 5"):
        Settings(mqtt_identity_property="username")
