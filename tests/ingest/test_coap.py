"""CoAP ingest end to end with two clients we did not write (aiocoap's and libcoap's coap-client):
real gateway, real PostgreSQL; rows compared with the reference decoders, refusals with their codes."""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import subprocess
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiocoap
import psycopg
import pytest
from aiocoap.numbers import codes
from aiocoap.optiontypes import OpaqueOption

import decoders
from ingest.coap import set_device_token
from ingest.gateway import Gateway
from simulators.water import make_meters
from tests.helpers import register_fleet

MAX_PAYLOAD = 8192
COAP_CLIENT = next((shutil.which(n) for n in ("coap-client", "coap-client-notls", "coap-client-openssl",
                                              "coap-client-gnutls") if shutil.which(n)), None)


@pytest.fixture
def coap_settings(settings):
    return settings.model_copy(update={"coap_enabled": True, "coap_bind": "127.0.0.1:0",
                                       "coap_max_payload": MAX_PAYLOAD, "downlink_poll_s": 0.2})


@pytest.fixture
def gateway(coap_settings, no_thread_leaks):
    gw = Gateway(coap_settings)
    gw.start()
    yield gw
    gw.stop()


def _tokens(db_url: str, device_ids) -> dict[str, str]:
    with psycopg.connect(db_url) as conn:
        return {d: set_device_token(conn, d) for d in device_ids}


def _water_row(device_id: str, payload: bytes) -> tuple:
    r = decoders.decode("cjt188", payload)
    return (device_id, r["meter_address"], r["flow_m3"], r["meter_time"], r["status"], r["valve"])


def _water_rows(db_url: str) -> Counter:
    with psycopg.connect(db_url) as conn:
        return Counter(conn.execute("""SELECT device_id, meter_address, flow_m3, meter_time, status, valve
                                       FROM water_readings WHERE meter_address IS NOT NULL""").fetchall())


def _rejects(db_url: str) -> Counter:
    with psycopg.connect(db_url) as conn:
        return Counter((d, bytes(p), r, t) for d, p, r, t in conn.execute(
            "SELECT device_id, payload, reason, transport FROM rejected_uplinks").fetchall())


def _senml_pack(imei: str, hours: int) -> bytes:
    """A day of hourly volume readings plus battery, as an LwM2M 3424 meter would send: ~3 kB."""
    t0 = datetime(2026, 11, 5, tzinfo=UTC).timestamp()
    pack = [{"bn": f"urn:imei:{imei}/", "bt": t0, "bu": "m3", "n": "3424/0/1", "v": 120.25, "t": 0}]
    pack += [{"n": "3424/0/1", "v": round(120.25 + 0.013 * h, 3), "t": 3600 * h} for h in range(1, hours)]
    pack += [{"n": "3424/0/4", "u": "count", "v": 48000 + 5 * h, "t": 3600 * h} for h in range(hours)]
    pack.append({"n": "3/0/9", "u": "%", "v": 87, "t": 3600 * (hours - 1)})
    return json.dumps(pack).encode()


async def _post(ctx, url: str, payload: bytes, fmt: int | None = 42, confirmable: bool = True) -> aiocoap.Message:
    request = aiocoap.Message(code=aiocoap.POST, uri=url, payload=payload,
                              transport_tuning=aiocoap.Reliable if confirmable else aiocoap.Unreliable)
    if fmt is not None:
        request.opt.content_format = fmt
    return await asyncio.wait_for(ctx.request(request).response, 60)


def test_aiocoap_client_stored_once_refusals_and_blockwise(gateway, coap_settings):
    db = coap_settings.database_url
    fleet = register_fleet(db, 3, seed=11)
    meters = make_meters(fleet, seed=11)
    senml = register_fleet(db, 1, seed=12, model="lwm2m-3424-water-senml-json")[0].record.device_id
    no_token = meters[2].device_id
    tokens = _tokens(db, [m.device_id for m in meters[:2]] + [senml])
    base = f"coap://127.0.0.1:{gateway.coap.port}"
    now = datetime(2026, 11, 5, 8, tzinfo=UTC)
    frames = {m.device_id: [m.frame(now + timedelta(hours=k)) for k in range(3)] for m in meters[:2]}
    for m in meters[:2]:
        m.advance(now, 3600)
    good = frames[meters[0].device_id][0]
    bad_checksum = good[:-2] + bytes([good[-2] ^ 0xFF, 0x16])
    pack = _senml_pack(senml, 48)
    assert 2048 < len(pack) < MAX_PAYLOAD           # more than one 1024-byte block, under the limit
    unknown = "869999999999999"

    async def run() -> dict[str, aiocoap.Message]:
        ctx = await aiocoap.Context.create_client_context()
        try:
            out = {}
            for device_id, device_frames in frames.items():
                for k, frame in enumerate(device_frames):
                    out[f"{device_id}/{k}"] = await _post(ctx, f"{base}/up/{device_id}?t={tokens[device_id]}", frame)
            d0 = meters[0].device_id
            # A retransmission after a lost response is a new request (new message id), same bytes.
            out["again"] = await _post(ctx, f"{base}/up/{d0}?t={tokens[d0]}", good)
            out["non"] = await _post(ctx, f"{base}/up/{d0}?t={tokens[d0]}", frames[d0][1], confirmable=False)
            out["checksum"] = await _post(ctx, f"{base}/up/{d0}?t={tokens[d0]}", bad_checksum)
            out["wrong_token"] = await _post(ctx, f"{base}/up/{d0}?t={'x' * 24}", good)
            out["no_token"] = await _post(ctx, f"{base}/up/{d0}", good)
            out["device_without_token"] = await _post(ctx, f"{base}/up/{no_token}?t={tokens[d0]}", good)
            out["unknown_device"] = await _post(ctx, f"{base}/up/{unknown}", good)
            out["path_up"] = await _post(ctx, f"{base}/up", good)
            out["path_deep"] = await _post(ctx, f"{base}/up/{d0}/extra?t={tokens[d0]}", good)
            out["path_other"] = await _post(ctx, f"{base}/data/{d0}", good)
            out["format"] = await _post(ctx, f"{base}/up/{d0}?t={tokens[d0]}", good, fmt=0)
            out["too_large"] = await _post(ctx, f"{base}/up/{d0}?t={tokens[d0]}", b"\x68" * (MAX_PAYLOAD + 500))
            out["senml"] = await _post(ctx, f"{base}/up/{senml}?t={tokens[senml]}", pack, fmt=110)
            out["discovery"] = await asyncio.wait_for(ctx.request(aiocoap.Message(
                code=aiocoap.GET, uri=f"{base}/.well-known/core")).response, 30)
            return out
        finally:
            await ctx.shutdown()

    answers = asyncio.run(run())
    for key in [k for k in answers if "/" in k] + ["again", "non", "senml"]:
        assert answers[key].code == codes.CHANGED, (key, answers[key].code, answers[key].payload)
    assert answers["non"].mtype == aiocoap.NON
    assert answers["checksum"].code == codes.BAD_REQUEST
    assert answers["checksum"].payload.decode().startswith("checksum:")
    for key in ("wrong_token", "no_token", "device_without_token"):
        assert answers[key].code == codes.UNAUTHORIZED, key
    for key in ("unknown_device", "path_up", "path_deep", "path_other"):
        assert answers[key].code == codes.NOT_FOUND, key
    assert answers["format"].code == codes.UNSUPPORTED_CONTENT_FORMAT
    assert answers["too_large"].code == codes.REQUEST_ENTITY_TOO_LARGE
    assert answers["too_large"].opt.size1 == MAX_PAYLOAD
    assert answers["discovery"].code == codes.CONTENT and b"</up>" in answers["discovery"].payload

    # Every 2.04 frame stored exactly once and equal to the reference decoder.
    expected = Counter(_water_row(d, f) for d, fs in frames.items() for f in fs)
    assert _water_rows(db) == expected
    with psycopg.connect(db) as conn:
        outcomes = Counter(o for (o,) in conn.execute("SELECT outcome FROM raw_uplinks WHERE transport = 'coap'"))
        senml_row = conn.execute("SELECT flow_m3, meter_time, extra FROM water_readings WHERE device_id = %s",
                                 (senml,)).fetchall()
        settings = conn.execute("SELECT settings FROM device_models WHERE model = 'lwm2m-3424-water-senml-json'"
                                ).fetchone()[0]
    assert outcomes == Counter({"stored": 7, "duplicate": 2, "rejected:checksum": 1,
                                "rejected:unknown_device": 1})
    # The block-wise SenML pack: assembled whole, one row equal to the reference decoder's fields.
    reference = decoders.decode("senml-json", pack, settings)["fields"]
    assert len(senml_row) == 1
    flow, meter_time, extra = senml_row[0]
    assert flow == reference["flow_m3"] == pytest.approx(120.25 + 0.013 * 47)
    assert extra["pulses"] == reference["pulses"] and extra["battery_pct"] == reference["battery_pct"]
    # Malformed and unknown-device uplinks are kept; refused requests (401, 404 path, 413, 4.15) are not.
    assert _rejects(db) == Counter({(meters[0].device_id, bad_checksum, "checksum", "coap"): 1,
                                    (unknown, good, "unknown_device", "coap"): 1})
    counters = gateway.status()["counters"]
    assert counters["coap.unauthorized"] == 3 and counters["coap.too_large"] == 1
    # Sized for bursts (CEILINGS.md): what was asked, or all the kernel allows without CAP_NET_ADMIN.
    rmem_max = int(Path("/proc/sys/net/core/rmem_max").read_text()) if Path("/proc/sys/net/core/rmem_max").exists() \
        else coap_settings.coap_rcvbuf
    assert counters["coap.rcvbuf_bytes"] >= min(coap_settings.coap_rcvbuf, rmem_max)


@pytest.mark.skipif(COAP_CLIENT is None, reason="libcoap's coap-client is not installed "
                                                "(Debian: apt-get install -y libcoap3-bin)")
def test_libcoap_client_stored_once_refusals_and_blockwise(gateway, coap_settings, tmp_path):
    db = coap_settings.database_url
    meter = make_meters(register_fleet(db, 1, seed=21), seed=21)[0]
    senml = register_fleet(db, 1, seed=22, model="lwm2m-3424-water-senml-json")[0].record.device_id
    tokens = _tokens(db, [meter.device_id, senml])
    base = f"coap://127.0.0.1:{gateway.coap.port}/up"
    frame = meter.frame(datetime(2026, 11, 6, 6, tzinfo=UTC))
    malformed = frame[:20]
    pack = _senml_pack(senml, 40)
    files = {}
    for name, data in (("frame", frame), ("malformed", malformed), ("pack", pack), ("huge", b"\x68" * 9000)):
        files[name] = tmp_path / f"{name}.bin"
        files[name].write_bytes(data)

    def client(*args: str) -> tuple[str, str]:
        done = subprocess.run([COAP_CLIENT, "-B", "30", "-m", "post", *args], capture_output=True, timeout=60)
        assert done.returncode == 0, done
        return done.stdout.decode(), done.stderr.decode().strip()

    ok = f"{base}/{meter.device_id}?t={tokens[meter.device_id]}"
    assert client("-t", "42", "-f", str(files["frame"]), ok) == ("", "")                   # 2.04, empty
    assert client("-N", "-t", "42", "-f", str(files["frame"]), ok) == ("", "")             # NON, duplicate
    assert client("-t", "42", "-f", str(files["malformed"]), ok)[1].startswith("4.00 truncated")
    assert client("-t", "42", "-f", str(files["frame"]), f"{base}/{meter.device_id}?t={'y' * 20}"
                  )[1].startswith("4.01")
    assert client("-t", "42", "-f", str(files["frame"]), f"{base}/")[1].startswith("4.04")
    assert client("-t", "42", "-b", "64", "-f", str(files["huge"]), ok)[1].startswith("4.13")
    senml_url = f"{base}/{senml}?t={tokens[senml]}"
    assert client("-t", "110", "-b", "64", "-f", str(files["pack"]), senml_url) == ("", "")  # 48 blocks

    assert _water_rows(db) == Counter([_water_row(meter.device_id, frame)])
    assert _rejects(db) == Counter({(meter.device_id, malformed, "truncated", "coap"): 1})
    with psycopg.connect(db) as conn:
        settings = conn.execute("SELECT settings FROM device_models WHERE model = 'lwm2m-3424-water-senml-json'"
                                ).fetchone()[0]
        rows = conn.execute("SELECT flow_m3, extra FROM water_readings WHERE device_id = %s", (senml,)).fetchall()
        raw = conn.execute("SELECT payload FROM raw_uplinks WHERE device_id = %s", (senml,)).fetchall()
        dup = conn.execute("SELECT count(*) FROM raw_uplinks WHERE outcome = 'duplicate'").fetchone()[0]
    reference = decoders.decode("senml-json", pack, settings)["fields"]
    assert [bytes(p) for (p,) in raw] == [pack]               # the blocks reassembled byte for byte
    assert rows == [(reference["flow_m3"], rows[0][1])] and rows[0][1]["pulses"] == reference["pulses"]
    assert dup == 1


def test_no_answer_before_the_commit(gateway, coap_settings):
    """While the readings table is locked the uplink cannot commit, and the device gets no 2.04."""
    db = coap_settings.database_url
    meter = make_meters(register_fleet(db, 1, seed=23), seed=23)[0]
    token = _tokens(db, [meter.device_id])[meter.device_id]
    frame = meter.frame(datetime(2026, 11, 6, 9, tzinfo=UTC))
    blocker = psycopg.connect(db)
    blocker.execute("LOCK TABLE water_readings IN ACCESS EXCLUSIVE MODE")

    async def run():
        ctx = await aiocoap.Context.create_client_context()
        try:
            pending = asyncio.ensure_future(_post(ctx, f"coap://127.0.0.1:{gateway.coap.port}/up/{meter.device_id}"
                                                       f"?t={token}", frame))
            await asyncio.sleep(1.5)
            answered_while_locked = pending.done()
            blocker.rollback()                            # the commit can happen now
            return answered_while_locked, await pending
        finally:
            await ctx.shutdown()

    try:
        answered_while_locked, answer = asyncio.run(run())
    finally:
        blocker.close()
    assert not answered_while_locked
    assert answer.code == codes.CHANGED
    assert _water_rows(db) == Counter([_water_row(meter.device_id, frame)])


def test_tokens_cached_while_the_database_is_away(gateway, coap_settings):
    """A device whose token the gateway has seen keeps being accepted when the credential store
    cannot be read; one it has not seen is told 5.03 with Max-Age, and nothing of it is stored."""
    db = coap_settings.database_url
    seen, unseen = make_meters(register_fleet(db, 2, seed=24), seed=24)
    tokens = _tokens(db, [seen.device_id, unseen.device_id])
    frames = [seen.frame(datetime(2026, 11, 6, h, tzinfo=UTC)) for h in (10, 11)]
    credentials = gateway.coap._credentials

    def unreachable():
        raise psycopg.OperationalError("connection refused (simulated outage of the credential lookup)")

    async def run():
        ctx = await aiocoap.Context.create_client_context()
        base = f"coap://127.0.0.1:{gateway.coap.port}/up"
        try:
            first = await _post(ctx, f"{base}/{seen.device_id}?t={tokens[seen.device_id]}", frames[0])
            credentials.close()
            credentials._connect, credentials._ttl_s = unreachable, 0.0    # every entry stale, lookups fail
            again = await _post(ctx, f"{base}/{seen.device_id}?t={tokens[seen.device_id]}", frames[1])
            wrong = await _post(ctx, f"{base}/{seen.device_id}?t={'z' * 20}", frames[1])
            other = await _post(ctx, f"{base}/{unseen.device_id}?t={tokens[unseen.device_id]}", frames[1])
            return first, again, wrong, other
        finally:
            await ctx.shutdown()

    first, again, wrong, other = asyncio.run(run())
    assert (first.code, again.code, wrong.code) == (codes.CHANGED, codes.CHANGED, codes.UNAUTHORIZED)
    assert other.code == codes.SERVICE_UNAVAILABLE and other.opt.max_age == 30
    assert _water_rows(db) == Counter(_water_row(seen.device_id, f) for f in frames)


def test_a_large_single_datagram_is_read_whole_and_a_longer_one_gets_413(gateway, coap_settings):
    """aiocoap's client without block-wise: a 5 kB SenML pack in one datagram (past the 4,096 bytes
    a read used to take) is stored whole; one past the limit gets 4.13 with Size1 = the limit, both
    when the datagram fits the read (the payload is measured) and when it is longer (the read is cut)."""
    db = coap_settings.database_url
    senml = register_fleet(db, 1, seed=25, model="lwm2m-3424-water-senml-json")[0].record.device_id
    meter = make_meters(register_fleet(db, 1, seed=26), seed=26)[0]
    tokens = _tokens(db, [senml, meter.device_id])
    pack = _senml_pack(senml, 48)
    assert 4096 < len(pack) < MAX_PAYLOAD
    base = f"coap://127.0.0.1:{gateway.coap.port}/up"

    async def single(ctx, url: str, payload: bytes, fmt: int) -> aiocoap.Message:
        request = aiocoap.Message(code=aiocoap.POST, uri=url, payload=payload, transport_tuning=aiocoap.Reliable)
        request.opt.content_format = fmt
        return await asyncio.wait_for(ctx.request(request, handle_blockwise=False).response, 60)

    async def run():
        ctx = await aiocoap.Context.create_client_context()
        try:
            return (await single(ctx, f"{base}/{senml}?t={tokens[senml]}", pack, 110),
                    await single(ctx, f"{base}/{meter.device_id}?t={tokens[meter.device_id]}",
                                 b"\x68" * (MAX_PAYLOAD + 500), 42),
                    await single(ctx, f"{base}/{meter.device_id}?t={tokens[meter.device_id]}",
                                 b"\x68" * (3 * MAX_PAYLOAD), 42))
        finally:
            await ctx.shutdown()

    stored, over, far_over = asyncio.run(run())
    assert stored.code == codes.CHANGED, stored.payload
    for answer in (over, far_over):
        assert (answer.code, answer.opt.size1) == (codes.REQUEST_ENTITY_TOO_LARGE, MAX_PAYLOAD)
    with psycopg.connect(db) as conn:
        raw = conn.execute("SELECT payload, outcome FROM raw_uplinks").fetchall()
        settings = conn.execute("SELECT settings FROM device_models WHERE model = 'lwm2m-3424-water-senml-json'"
                                ).fetchone()[0]
        flow = conn.execute("SELECT flow_m3 FROM water_readings WHERE device_id = %s", (senml,)).fetchall()
    assert [(bytes(p), o) for p, o in raw] == [(pack, "stored")]         # byte for byte; nothing of the others
    assert flow == [(decoders.decode("senml-json", pack, settings)["fields"]["flow_m3"],)]
    assert gateway.coap.counters["too_large"] == 2


def test_an_unreadable_option_from_real_clients_gets_4_02_and_one_log_line(gateway, coap_settings, tmp_path,
                                                                            caplog):
    """A Uri-Query that is not UTF-8 (aiocoap's client with an opaque value, libcoap's with -O): 4.02
    Bad Option each time, counted; logged once for the source, with no traceback."""
    db = coap_settings.database_url
    meter = make_meters(register_fleet(db, 1, seed=27), seed=27)[0]
    frame = meter.frame(datetime(2026, 11, 6, 7, tzinfo=UTC))
    url = f"coap://127.0.0.1:{gateway.coap.port}/up/{meter.device_id}"
    caplog.set_level(logging.INFO)

    async def run():
        ctx = await aiocoap.Context.create_client_context()
        try:
            answers = []
            for _ in range(5):
                request = aiocoap.Message(code=aiocoap.POST, uri=url, payload=frame, transport_tuning=aiocoap.Reliable)
                request.opt.add_option(OpaqueOption(15, b"t=\xff\xfe"))
                answers.append(await asyncio.wait_for(ctx.request(request).response, 60))
            return answers
        finally:
            await ctx.shutdown()

    answers = asyncio.run(run())
    assert [a.code for a in answers] == [codes.BAD_OPTION] * 5
    assert answers[0].payload == b"option 15: not UTF-8"
    if COAP_CLIENT is not None:
        (tmp_path / "frame.bin").write_bytes(frame)
        done = subprocess.run([COAP_CLIENT, "-B", "30", "-m", "post", "-t", "42", "-O", "15,0xfffe", "-f",
                               str(tmp_path / "frame.bin"), url], capture_output=True, timeout=60)
        assert done.stderr.decode().startswith("4.02"), done
    lines = [r for r in caplog.records if "malformed CoAP datagram" in r.getMessage()]
    assert len(lines) == 1 and "option 15 is not UTF-8" in lines[0].getMessage()
    assert not [r for r in caplog.records if r.exc_info]
    assert gateway.coap.counters["malformed"] == 5 + (COAP_CLIENT is not None)
    assert _water_rows(db) == Counter()
