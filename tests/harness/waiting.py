"""Waiting for something a server does in the background, bounded in time."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any


def wait_for(check: Callable[[], Any], timeout: float = 5.0, what: str = "",
             interval: float = 0.05) -> Any:
    """Call ``check`` until it returns something true (returned) or ``timeout`` passes
    (AssertionError naming ``what``)."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result or time.monotonic() >= deadline:
            assert result, f"timed out after {timeout}s waiting for {what or check}"
            return result
        time.sleep(interval)


async def wait_for_async(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """``wait_for`` inside an event loop: sleeps with asyncio, so the loop keeps running."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.05)
