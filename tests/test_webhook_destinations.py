"""Webhooks reach only the outside (issue 23, item 4): by default a receiver whose host resolves to
a loopback, link-local, private, unique-local, multicast, unspecified or metadata address is
refused at registration (a 400 naming `url`) and again when a delivery connects (after resolving,
to the address checked), whatever form the address is written in; `webhooks.allowed_networks` /
`allowed_hosts` are the operator's exceptions; the deliveries list shows a receiver's status code,
never its body."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from serve.config import WebhooksConfig
from serve.jobs.webhook_store import receiver_refusal
from serve.jobs.webhooks import checked_transport
from tests.webhook_receiver import WebhookReceiver

INTERNAL = [
    "http://localhost:8265/api/jobs/",  # the Ray dashboard's job API
    "http://127.0.0.1/", "http://127.1/", "http://2130706433/", "http://0x7f000001/", "http://017700000001/",
    "http://[::1]/", "http://[::ffff:127.0.0.1]/", "http://0.0.0.0/", "http://[::]/",
    "http://169.254.169.254/latest/meta-data/", "http://[fe80::1]/", "http://100.100.100.200/",
    "http://10.1.2.3/", "http://172.16.0.1/", "http://192.168.1.1/", "http://[fd00:ec2::254]/",
    "http://[fc00::1]/", "http://224.0.0.1/", "http://[ff02::1]/", "http://192.0.2.10/", "http://100.64.0.1/",
]


@pytest.mark.fast
@pytest.mark.parametrize("url", INTERNAL)
def test_internal_destinations_are_refused_by_default(url):
    refusal = asyncio.run(receiver_refusal(url, WebhooksConfig()))
    assert refusal is not None and "public addresses" in refusal, (url, refusal)


@pytest.mark.fast
def test_public_addresses_pass_and_operators_allow_networks_and_hosts():
    assert asyncio.run(receiver_refusal("https://8.8.8.8/hook", WebhooksConfig())) is None
    assert asyncio.run(receiver_refusal("http://[2606:4700:4700::1111]/", WebhooksConfig())) is None
    loopback = WebhooksConfig(allowed_networks=["127.0.0.0/8", "::1/128"])
    assert asyncio.run(receiver_refusal("http://127.0.0.1:9/", loopback)) is None
    assert asyncio.run(receiver_refusal("http://2130706433/", loopback)) is None
    assert asyncio.run(receiver_refusal("http://10.0.0.1/", loopback)) is not None  # only what is listed
    named = WebhooksConfig(allowed_hosts=["LocalHost."])
    assert asyncio.run(receiver_refusal("http://localhost:9/", named)) is None
    assert asyncio.run(receiver_refusal("http://127.0.0.1:9/", named)) is not None


@pytest.mark.fast
def test_a_delivery_connection_is_checked_after_resolving():
    """The sender's own connection refuses an internal address (what a name that moved, DNS
    rebinding, resolves to at send time) before any byte is sent; an allowed one connects."""
    async def post(config: WebhooksConfig, url: str) -> httpx.Response:
        async with httpx.AsyncClient(transport=checked_transport(config), timeout=5) as client:
            return await client.post(url, content=b"{}")

    with WebhookReceiver() as receiver:
        with pytest.raises(httpx.ConnectError, match="not sent: .*127.0.0.1 is a loopback address"):
            asyncio.run(post(WebhooksConfig(), receiver.url + "/x"))
        with pytest.raises(httpx.ConnectError, match="not sent"):
            asyncio.run(post(WebhooksConfig(), receiver.url.replace("127.0.0.1", "localhost") + "/x"))
        assert receiver.received == []
        r = asyncio.run(post(WebhooksConfig(allowed_networks=["127.0.0.0/8"]), receiver.url + "/x"))
        assert len(receiver.received) == 1 and r.status_code == receiver.received[0].answered  # (unsigned: 401)
