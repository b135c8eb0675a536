"""The broker under the worker: a dropped connection, late confirms, returns, and stopping."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest

from devkit.stripe import StripeStandIn
from shared.topology import Topology
from tests.conftest import Publish, StartWorker, counted, depth, wait_for
from tests.pipeline import COMPLETED, Pipeline, both_steps, fulfillment_rows, session_event
from tests.tcp_proxy import TcpProxy
from worker.settings import WorkerSettings

pytestmark = pytest.mark.timeout(60)


async def test_an_outbound_message_no_queue_is_bound_for_is_counted_and_recorded_so(
    standin: StripeStandIn,
    worker_settings: WorkerSettings,
    start_worker: StartWorker,
    publish: Publish,
    database_url: str,
    topology: Topology,
) -> None:
    """Downstream trial: with no subscriber's queue bound, the broker dropped order.fulfilled
    unseen and the step read "published". Now it is published mandatory: the broker's
    return is counted, logged and recorded; the order and its email go on."""
    # not the pipeline fixture: its capture queue is bound for every outbound message
    sid = standin.add_session()["id"]
    before = counted("worker_outbound_unrouted_total", type="order.fulfilled")
    await start_worker(worker_settings)

    await publish(session_event(standin, "checkout.session.completed", sid))

    steps = await wait_for(lambda: both_steps(database_url, sid))
    assert steps["order_fulfilled_message"] == (
        f"unrouted order.fulfilled:{sid}: no queue was bound for order.fulfilled "
        f"on {topology.out_exchange}"
    )
    assert steps["confirmation_email"].startswith("sent <order.")
    assert counted("worker_outbound_unrouted_total", type="order.fulfilled") == before + 1
    assert len(await fulfillment_rows(database_url, sid)) == 1


async def test_a_broker_connection_drop_right_after_the_email_does_not_send_it_again(
    pipeline: Pipeline,
) -> None:
    """Regression: aio-pika cancels a channel's consumer tasks when the connection drops;
    a handler cancelled between sending the email and recording it sent it again on
    redelivery. The work now finishes; only its ack is lost."""
    smtp, worker_settings = pipeline.smtp, pipeline.settings
    proxy = TcpProxy.in_front_of(worker_settings.broker.url)
    await proxy.start()
    proxied = proxy.url()
    settings = replace(worker_settings, broker=replace(worker_settings.broker, url=proxied))
    try:
        sid = pipeline.standin.add_session()["id"]
        smtp.after_data = proxy.cutter()  # before the server's 250 to the email
        worker = await pipeline.start(settings)
        await pipeline.send(COMPLETED, sid)

        await pipeline.mails(1, timeout_s=15)
        await wait_for(lambda: pipeline.steps(sid))  # the email is recorded
        await proxy.restore()

        await wait_for(lambda: pipeline.both_steps(sid), timeout_s=30)
        await pipeline.settle(worker)
        assert len(smtp.for_session(sid)) == 1
        assert [m.routing_key for m in await pipeline.outbound_messages()] == ["order.fulfilled"]
        assert await pipeline.dead_letters() == []
    finally:
        await proxy.close()


async def test_an_unconfirmed_outbound_message_is_published_again_said_and_counted(
    pipeline: Pipeline,
) -> None:
    """A broker slower to confirm than PUBLISH_TIMEOUT_S (an alarm, a stalled link): the
    message's fate is unknown, so the retry publishes it again, and both may arrive (chaos
    trial). Not silent: a warning and a counter; receivers drop the repeat by its id."""

    def unconfirmed() -> float:
        return counted("worker_outbound_unconfirmed_total", type="order.fulfilled")

    worker_settings = pipeline.settings
    before = unconfirmed()  # (before the proxy: nothing between its start and the finally)
    proxy = TcpProxy.in_front_of(worker_settings.broker.url)
    await proxy.start()
    broker = replace(worker_settings.broker, url=proxy.url(), publish_timeout_s=0.3)
    try:
        sid = pipeline.standin.add_session()["id"]
        await pipeline.start(replace(worker_settings, broker=broker, quick_retries=2))
        await asyncio.sleep(0.5)  # consuming
        proxy.downstream_delay_s = 1.0  # the delivery, and every confirm, come 1 s late
        await pipeline.send(COMPLETED, sid)

        async def one_unconfirmed() -> bool:
            return unconfirmed() > before

        await wait_for(one_unconfirmed, timeout_s=15)
        proxy.downstream_delay_s = 0.0
        await pipeline.mails(1, timeout_s=15)
    finally:
        await proxy.close()
    copies = await wait_for(pipeline.outbound_messages, timeout_s=10)
    await asyncio.sleep(1.0)
    copies += await pipeline.outbound_messages()
    assert len(copies) >= 2  # the unconfirmed one arrived too
    assert {m.headers["fulfillment-id"] for m in copies} == {f"order.fulfilled:{sid}"}
    assert len({m.message_id for m in copies}) == len(copies)
    assert len(await pipeline.fulfillments(sid)) == 1
    assert len(pipeline.mails_for(sid)) == 1


async def test_a_failed_message_the_broker_cannot_take_a_copy_of_is_kept_not_lost(
    pipeline: Pipeline,
) -> None:
    """The original is acked only once its retry copy is confirmed: with the delay queue
    gone (the copy is returned), the original goes back to the work queue, is tried again
    and fulfilled; nothing is lost and nothing dead-lettered for the broker's trouble."""
    standin = pipeline.standin
    sid = standin.add_session()["id"]
    standin.fail_next(2, 500)  # the quick retries used up: the message is for a delay queue
    worker = await pipeline.start()
    await pipeline.channel.queue_delete(pipeline.topology.retry_queues[0])

    await pipeline.send(COMPLETED, sid)

    assert len(await pipeline.fulfilled(sid, timeout_s=20)) == 1
    await pipeline.settle(worker)
    assert len(pipeline.mails_for(sid)) == 1
    assert await pipeline.dead_letters() == []


async def test_a_stopping_worker_takes_no_new_message_while_it_finishes_its_own(
    pipeline: Pipeline,
) -> None:
    """On stop the consumer is cancelled first: a message arriving during the grace period
    stays in the queue for another worker (this one would be cut off holding it)."""
    standin = pipeline.standin
    held, later = standin.add_session()["id"], standin.add_session()["id"]
    standin.latency_s = 1.0
    worker = await pipeline.start()
    await pipeline.send(COMPLETED, held)
    await wait_for(lambda: worker.in_flight == 1)

    stopping = asyncio.create_task(worker.stop(grace_s=5))
    await asyncio.sleep(0.2)
    await pipeline.send(COMPLETED, later)
    await stopping

    assert len(await pipeline.fulfillments(held)) == 1
    assert await pipeline.fulfillments(later) == []
    assert standin.request_count == 1  # the later session was never looked up
    assert await depth(pipeline.channel, pipeline.topology.work_queue) == 1
