"""How the CoAP transport answers under load, with aiocoap's client and the real PostgreSQL: the
answer rides on the ACK when the commit comes in time and follows separately when it does not;
credential misses are read together; a pipeline that does not take uplinks gets devices a 5.03
(the loop keeps answering) and loses nothing."""

from __future__ import annotations

import asyncio
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import aiocoap
import psycopg
import pytest
from aiocoap.numbers import codes

import decoders
from iotjx.db import connect
from ingest.coap import CoapIngest, DeviceCredentials, ServerTuning, set_device_token
from ingest.gateway import Gateway
from ingest.pipeline import Pipeline
from ingest.registry import DeviceRegistry
from ingest.writer import Writer
from simulators.water import make_meters
from tests.helpers import register_fleet


def _stored(db_url: str) -> Counter:
    with psycopg.connect(db_url) as conn:
        return Counter(conn.execute("SELECT device_id, meter_time FROM water_readings").fetchall())


def _expected(items) -> Counter:
    return Counter((d, decoders.decode("cjt188", f)["meter_time"]) for d, f in items)


async def _post(ctx, url: str, payload: bytes) -> aiocoap.Message:
    request = aiocoap.Message(code=aiocoap.POST, uri=url, payload=payload, transport_tuning=aiocoap.Reliable)
    request.opt.content_format = 42
    return await asyncio.wait_for(ctx.request(request).response, 60)


def test_empty_ack_delay_is_checked():
    assert ServerTuning(1.5).EMPTY_ACK_DELAY == 1.5
    for bad in (0, 2.0, 3.0):
        with pytest.raises(ValueError, match="ACK_TIMEOUT"):
            ServerTuning(bad)


def test_piggybacked_in_time_separate_when_the_commit_is_late(settings, no_thread_leaks):
    """A commit within the empty-ACK delay rides on the ACK; a later one comes as a separate
    confirmable response, which aiocoap's client takes, and the reading is stored once."""
    coap_settings = settings.model_copy(update={"coap_enabled": True, "coap_bind": "127.0.0.1:0",
                                                "coap_empty_ack_delay_s": 0.6})
    db = coap_settings.database_url
    meter = make_meters(register_fleet(db, 1, seed=31), seed=31)[0]
    with psycopg.connect(db) as conn:
        token = set_device_token(conn, meter.device_id)
    frames = [meter.frame(datetime(2026, 11, 7, 8, tzinfo=UTC) + timedelta(hours=k)) for k in range(2)]
    gw = Gateway(coap_settings)
    gw.start()
    try:
        url = f"coap://127.0.0.1:{gw.coap.port}/up/{meter.device_id}?t={token}"

        async def run():
            ctx = await aiocoap.Context.create_client_context()
            try:
                quick = await _post(ctx, url, frames[0])
                blocker = psycopg.connect(db)
                try:
                    blocker.execute("LOCK TABLE water_readings IN ACCESS EXCLUSIVE MODE")
                    pending = asyncio.ensure_future(_post(ctx, url, frames[1]))
                    await asyncio.sleep(1.5)                 # past the 0.6 s delay, before a retransmission
                    answered_while_locked = pending.done()
                finally:
                    blocker.rollback()
                    blocker.close()
                return quick, answered_while_locked, await pending
            finally:
                await ctx.shutdown()

        quick, answered_while_locked, late = asyncio.run(run())
    finally:
        gw.stop()
    assert (quick.code, quick.mtype) == (codes.CHANGED, aiocoap.ACK)
    assert not answered_while_locked
    assert (late.code, late.mtype) == (codes.CHANGED, aiocoap.CON)
    assert _stored(db) == _expected((meter.device_id, f) for f in frames)


def test_credential_misses_are_read_in_one_query(settings):
    """Many devices missed at once: one query, and each verdict what the device's record says."""
    db = settings.database_url
    fleet = [m.device_id for m in make_meters(register_fleet(db, 200, seed=32), seed=32)]
    with_token, wrong_token, no_token, retired = fleet[:80], fleet[80:120], fleet[120:160], fleet[160:]
    unknown = [f"86999999{i:07d}" for i in range(40)]
    with psycopg.connect(db) as conn:
        tokens = {d: set_device_token(conn, d) for d in with_token + wrong_token + retired}
        conn.execute("UPDATE devices SET status = 'retired' WHERE device_id = ANY(%s)", (retired,))
    expected = {**{d: "ok" for d in with_token}, **{d: "bad_token" for d in wrong_token},
                **{d: "no_token" for d in no_token}, **{d: "unknown_device" for d in retired + unknown}}
    asked = {d: tokens.get(d) for d in expected} | {d: "w" * 20 for d in wrong_token}
    credentials = DeviceCredentials(lambda: psycopg.connect(db))
    executor = ThreadPoolExecutor(2)

    async def run():
        return await asyncio.gather(*(credentials.check(d, t, executor) for d, t in asked.items()))

    try:
        verdicts = dict(zip(asked, asyncio.run(run()), strict=True))
        again = asyncio.run(credentials.check(with_token[0], tokens[with_token[0]], executor))
    finally:
        executor.shutdown()
        credentials.close()
    assert verdicts == expected
    # One query for all 240, none for the cached device, plus the re-reads of the 40 wrong tokens
    # would come only after 2 s (a rotated token): none here.
    assert credentials.lookups == 1 and again == "ok"


def test_check_then_answers_each_miss_from_one_query_and_from_the_cache_while_the_database_is_away(settings):
    """The datagram front's path: verdicts by callback, misses read together; with the database
    away a cached device keeps its verdict and an uncached one gets None (the caller answers 5.03)."""
    db = settings.database_url
    fleet = [m.device_id for m in make_meters(register_fleet(db, 30, seed=34), seed=34)]
    with psycopg.connect(db) as conn:
        tokens = {d: set_device_token(conn, d) for d in fleet[:20]}
    credentials = DeviceCredentials(lambda: psycopg.connect(db))
    executor = ThreadPoolExecutor(2)

    async def verdicts(asked: dict) -> dict:
        loop = asyncio.get_running_loop()
        got = {d: loop.create_future() for d in asked}
        for d, t in asked.items():
            credentials.check_then(d, t, executor, got[d].set_result)
        return {d: await f for d, f in got.items()}

    def unreachable():
        raise psycopg.OperationalError("connection refused (simulated outage)")

    try:
        first = asyncio.run(verdicts({**{d: tokens[d] for d in fleet[:10]}, **{d: "w" * 20 for d in fleet[10:20]},
                                      **{d: None for d in fleet[20:]}}))
        lookups = credentials.lookups
        credentials.close()
        credentials._connect, credentials._ttl_s = unreachable, 0.0       # every entry stale, lookups fail
        away = asyncio.run(verdicts({fleet[0]: tokens[fleet[0]], "86999999000000": None}))
    finally:
        executor.shutdown()
        credentials.close()
    assert first == {**{d: "ok" for d in fleet[:10]}, **{d: "bad_token" for d in fleet[10:20]},
                     **{d: "no_token" for d in fleet[20:]}}
    assert lookups == 1
    assert away == {fleet[0]: "ok", "86999999000000": None}


def test_full_pipeline_gets_503_keeps_answering_and_loses_nothing(settings, no_thread_leaks):
    """The pipeline takes nothing (not started, queue of 2): uplinks past the hand-off bound get
    5.03 + Max-Age at once while the loop still answers; once it runs, every accepted uplink gets
    its 2.04 (acks delivered through `flush_acks`), and the refused ones, sent again, are stored."""
    coap_settings = settings.model_copy(update={"coap_enabled": True, "coap_bind": "127.0.0.1:0",
                                                "coap_require_credential": False})
    db = coap_settings.database_url
    meters = make_meters(register_fleet(db, 8, seed=33), seed=33)
    sent = {m.device_id: m.frame(datetime(2026, 11, 7, 9, tzinfo=UTC)) for m in meters}
    registry = DeviceRegistry(lambda: connect(db))
    writer = Writer(lambda: connect(db))
    pipeline = Pipeline(registry, writer, batch_age_s=0.05, queue_max=2)
    coap = CoapIngest(coap_settings, pipeline.submit, DeviceCredentials(lambda: connect(db)),
                      ack_flush=pipeline.add_ack_flush, handoff_max=3)
    coap.start()
    try:
        base = f"coap://127.0.0.1:{coap.port}"

        async def run():
            contexts = [await aiocoap.Context.create_client_context() for _ in meters]   # 8 peers
            try:
                tasks = {d: asyncio.ensure_future(_post(ctx, f"{base}/up/{d}", frame))
                         for ctx, (d, frame) in zip(contexts, sent.items(), strict=True)}
                await asyncio.sleep(2.0)
                early = {d: t.result() for d, t in tasks.items() if t.done()}
                # Answered while the submit thread is blocked: the event loop is not.
                discovery = await asyncio.wait_for(contexts[0].request(aiocoap.Message(
                    code=aiocoap.GET, uri=f"{base}/.well-known/core")).response, 30)
                pipeline.start()
                later = {d: await t for d, t in tasks.items() if d not in early}
                retried = {d: await _post(contexts[0], f"{base}/up/{d}", sent[d]) for d in early}
                return early, discovery, later, retried
            finally:
                for ctx in contexts:
                    await ctx.shutdown()

        early, discovery, later, retried = asyncio.run(run())
    finally:
        coap.stop()
        pipeline.stop()
        writer.close()
        registry.close()
    # 2 in the queue, 1 held by the blocked submit, 3 waiting: at least 2 of 8 refused at once.
    assert len(early) >= 2 and len(early) + len(later) == len(sent)
    assert all(a.code == codes.SERVICE_UNAVAILABLE and a.opt.max_age == 5 for a in early.values())
    assert discovery.code == codes.CONTENT
    assert all(a.code == codes.CHANGED for a in list(later.values()) + list(retried.values()))
    assert coap.counters["busy"] == len(early)
    assert _stored(db) == _expected(sent.items())


def test_server_context_renders_as_aiocoap_does():
    """`ServerContext.render_to_pipe` is aiocoap's minus the task name: it must follow aiocoap's."""
    import inspect
    source = inspect.getsource(aiocoap.Context.render_to_pipe)
    for part in ("error_to_message(pipe, self.log)", "run_driving_pipe(", "self._render_to_pipe(pipe)"):
        assert part in source, f"aiocoap's Context.render_to_pipe changed; review ingest.coap.ServerContext: {source}"


def test_an_uplink_past_its_models_size_limit_is_answered_4_13(settings):
    """The pipeline's `too_large` reject (a device model's size limit) is answered 4.13, not 4.00."""
    from iotjx.model import Outcome

    coap = CoapIngest(settings, lambda u: None, DeviceCredentials(lambda: connect(settings.database_url)))
    answer = coap._answer_for(Outcome("rejected", "too_large", "2,048 bytes; the model allows 512"), "dev")
    assert answer.code == codes.REQUEST_ENTITY_TOO_LARGE and b"512" in answer.payload
    assert coap._answer_for(Outcome("rejected", "checksum", "bad sum"), "dev").code == codes.BAD_REQUEST
