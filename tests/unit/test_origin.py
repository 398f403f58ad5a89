"""The Origin allowlist: exact matches only, refused before the upgrade (HTTP 403)."""

from __future__ import annotations

import pytest

from support import Player, hub_app, serve, wait_for
from wsroom import Hub, HubConfig
from wsroom._core.origin import OriginPolicy, normalize_origin
from wsroom.client._websocket import HandshakeRejected, connect


@pytest.mark.parametrize(("origin", "normal"), [
    ("https://Game.Example.com", "https://game.example.com"),
    ("https://game.example.com:443", "https://game.example.com"),
    ("http://game.example.com:80/", "http://game.example.com"),
    ("http://127.0.0.1:8000", "http://127.0.0.1:8000"),
    ("https://[::1]:8443", "https://[::1]:8443"),
])
def test_origins_are_normalized(origin: str, normal: str) -> None:
    assert normalize_origin(origin) == normal


@pytest.mark.parametrize("origin", [
    "game.example.com", "ftp://game.example.com", "https://game.example.com/path",
    "https://user@game.example.com", "https://game.example.com?x=1", "null", "",
    "https://game.example.com:99999",
])
def test_what_is_not_an_origin_is_refused(origin: str) -> None:
    with pytest.raises(ValueError, match="not an origin"):
        normalize_origin(origin)
    assert not OriginPolicy(["https://game.example.com"]).allows(origin)


@pytest.mark.parametrize("origin", [
    "https://evil-example.com", "https://game.example.com.evil.net",
    "https://evil.net/https://game.example.com", "http://game.example.com",
    "https://game.example.com:8443", "https://sub.game.example.com",
])
def test_only_exact_origins_match(origin: str) -> None:
    policy = OriginPolicy(["https://game.example.com"])
    assert policy.allows("https://GAME.example.com:443")
    assert not policy.allows(origin)


def test_a_request_without_origin_is_not_a_browser_page_and_is_allowed() -> None:
    assert OriginPolicy(["https://game.example.com"]).allows(None)


def test_the_config_rejects_what_is_not_an_origin() -> None:
    with pytest.raises(ValueError, match="not an origin"):
        HubConfig(allowed_origins=["https://game.example.com/app"])
    with pytest.raises(TypeError, match="list of origins"):
        HubConfig(allowed_origins="https://game.example.com")


@pytest.mark.anyio
@pytest.mark.e2e
async def test_a_forbidden_origin_gets_403_before_the_upgrade() -> None:
    hub = Hub(HubConfig(allowed_origins=["https://game.example.com"]))
    async with serve(hub_app(hub)) as url:
        with pytest.raises(HandshakeRejected) as refused:
            await connect(url + "/ws", headers=[("Origin", "https://evil.example.com")])
        assert refused.value.status == 403
        async with Player.connect(url + "/ws",
                                  headers=[("Origin", "https://game.example.com")]) as page:
            assert page.welcome is not None
        async with Player.connect(url + "/ws") as bot:  # no Origin: not a browser
            assert bot.welcome is not None
        await wait_for(lambda: hub.stats().connections == 0)
    assert hub.stats().closes["forbidden_origin"] == 1
    assert hub.stats().connections_total == 2  # the refused one was never admitted
