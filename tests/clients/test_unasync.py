"""tools/unasync.py: the sync client is generated from the async one, and `make lint` notices drift."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[2]


def _tool() -> ModuleType:
    spec = importlib.util.spec_from_file_location("unasync", ROOT / "tools" / "unasync.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sdk_py_is_what_the_tool_generates_from_aio_py() -> None:
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "unasync.py"), "--check"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_async_constructs_become_their_sync_twins_with_continuation_lines_realigned() -> None:
    source = '''import asyncio
import grpc.aio
from collections.abc import AsyncIterator, Callable


class AsyncClient:
    async def get(self, method: grpc.aio.UnaryUnaryMultiCallable[int, int],
                  request: int) -> int:
        try:
            return await method(request,
                                timeout=1)
        except grpc.aio.AioRpcError:
            await asyncio.sleep(1)
            raise

    async def each(self, stream: AsyncIterator[int]) -> AsyncIterator[int]:
        async for item in stream:
            yield item

    async def all(self, stream: AsyncIterator[int]) -> list[int]:
        return [x async for x in stream]
'''
    assert _tool().unasync(source) == '''# generated from clients/aio.py by tools/unasync.py; never edit
from collections.abc import Callable, Iterator


class Client:
    def get(self, method: grpc.UnaryUnaryMultiCallable[int, int],
            request: int) -> int:
        try:
            return method(request,
                          timeout=1)
        except grpc.RpcError:
            time.sleep(1)
            raise

    def each(self, stream: Iterator[int]) -> Iterator[int]:
        yield from stream

    def all(self, stream: Iterator[int]) -> list[int]:
        return list(stream)
'''


def test_check_fails_on_a_hand_edit_and_a_run_mends_it(tmp_path: Path) -> None:
    tool = _tool()
    stale = tmp_path / "sdk.py"
    stale.write_text(tool.unasync(tool.SOURCE.read_text()) + "# a hand edit\n")
    tool.TARGET = stale
    assert tool.main(["--check"]) == 1
    assert tool.main([]) == 0 and tool.main(["--check"]) == 0
