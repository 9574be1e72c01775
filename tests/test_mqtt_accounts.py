"""`iotjx.mqtt_accounts`: hashes Mosquitto can check, and the registry's rules for account names."""

from __future__ import annotations

import base64
import shutil
import subprocess

import psycopg
import pytest

from iotjx import mqtt_accounts
from tests.helpers import register_fleet

# A line `mosquitto_passwd -b -c FILE alice secret` (Mosquitto 2.0.11) wrote.
MOSQUITTO_LINE = ("alice:$7$101$47c3jXfvvnWIfEzj$w+bLWvSLLQqk1npM/JWKElPyCTrBaeWQIUWKTULSORmw31zopDQgXN2jkOgJ"
                  "nFCq3gueyzgqPpl727R/+oBL2Q==")


def test_the_hash_is_the_one_mosquitto_passwd_writes():
    _, _, iterations, salt, digest = MOSQUITTO_LINE.split(":", 1)[1].split("$")
    ours = mqtt_accounts.hash_password("secret", base64.b64decode(salt), int(iterations))
    assert mqtt_accounts.mosquitto_hash(*ours) == MOSQUITTO_LINE.split(":", 1)[1]
    assert mqtt_accounts.verify_password("secret", *ours)
    assert not mqtt_accounts.verify_password("Secret", *ours)


@pytest.mark.skipif(shutil.which("mosquitto_passwd") is None, reason="mosquitto_passwd is not installed")
def test_a_fresh_hash_has_the_shape_mosquitto_passwd_gives(tmp_path):
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(tmp_path / "pw"), "bob", "x" * 20], check=True)
    theirs = (tmp_path / "pw").read_text().strip().split(":", 1)[1].split("$")
    ours = mqtt_accounts.mosquitto_hash(*mqtt_accounts.hash_password("x" * 20)).split("$")
    assert [len(p) for p in ours] == [len(p) for p in theirs] and ours[:3] == theirs[:3]


def test_device_and_service_accounts_in_the_registry(db_url):
    fleet = register_fleet(db_url, 2)
    device = fleet[0].record.device_id
    with psycopg.connect(db_url) as conn:
        password = mqtt_accounts.set_device_password(conn, device)
        assert mqtt_accounts.PASSWORD.match(password)
        with pytest.raises(LookupError):
            mqtt_accounts.set_device_password(conn, "999999999999999")
        with pytest.raises(ValueError, match="device id"):
            mqtt_accounts.set_service_account(conn, device, "gateway")
        with pytest.raises(ValueError, match="service account"):
            mqtt_accounts.set_service_account(conn, "gw-1", "device")
        with pytest.raises(ValueError, match="user name"):
            mqtt_accounts.set_service_account(conn, "gw/1", "gateway")
        gateway_password = mqtt_accounts.set_service_account(conn, "gw-1", "gateway", "p" * 16)
        rows = conn.execute("SELECT username, role, device_id, iterations, salt, password_hash FROM mqtt_accounts "
                            "ORDER BY username").fetchall()
    assert gateway_password == "p" * 16
    by_name = {r[0]: r for r in rows}
    assert by_name[device][1:3] == ("device", device)
    assert mqtt_accounts.verify_password(password, *by_name[device][3:])
    assert mqtt_accounts.verify_password("p" * 16, *by_name["gw-1"][3:])
    assert password.encode() not in b"".join(bytes(r[5]) + bytes(r[4]) for r in rows)


def test_a_device_registered_under_a_service_accounts_name_cannot_take_that_account_over(db_url):
    fleet = register_fleet(db_url, 1)
    record = fleet[0].record
    with psycopg.connect(db_url) as conn:
        mqtt_accounts.set_service_account(conn, "gw-9", "gateway", "g" * 16)
        conn.execute("UPDATE devices SET device_id = 'gw-9' WHERE device_id = %s", (record.device_id,))
        with pytest.raises(ValueError, match="another kind"):
            mqtt_accounts.set_device_password(conn, "gw-9", "d" * 16)
        assert not mqtt_accounts.delete_account(conn, "gw-9", "device")
        row = conn.execute("SELECT role, iterations, salt, password_hash FROM mqtt_accounts "
                           "WHERE username = 'gw-9'").fetchone()
    assert row[0] == "gateway" and mqtt_accounts.verify_password("g" * 16, *row[1:])

