"""The server takes agents of both versions during a roll-out: the hello's agent_version is recorded when
given and tolerated when absent (an agent older than version reporting)."""
from __future__ import annotations

import asyncio

from reddwarf.server.agents import AgentRegistry, _Conn
from reddwarf.v1 import agent_pb2


def test_hello_with_and_without_a_version_is_accepted_and_reported() -> None:
    seen: list[tuple[str, str]] = []

    async def on_hello(iid: str, hello: agent_pb2.Hello) -> None:
        seen.append((iid, hello.agent_version))

    async def go() -> None:
        reg = AgentRegistry(on_hello=on_hello)
        old = _Conn("i-old", agent_pb2.Hello(instance_id="i-old", boot_id="b1"))  # no version field at all
        new = _Conn("i-new", agent_pb2.Hello(instance_id="i-new", agent_version="2", boot_id="b2"))
        assert not old.hello.agent_version and "agent_version" not in str(old.hello)
        await reg._attach(old)
        await reg._attach(new)
        assert reg.is_connected("i-old") and reg.is_connected("i-new")
        assert (reg.agent_version("i-old"), reg.agent_version("i-new"), reg.agent_version("i-gone")) == ("", "2", None)
        # Both got their welcome, the same message to either version.
        assert (await old.outbox.get()).WhichOneof("message") == "welcome"
        assert (await new.outbox.get()).WhichOneof("message") == "welcome"

    asyncio.run(go())
    assert seen == [("i-old", ""), ("i-new", "2")]
