"""The supervisor's policy builds: the first, before any worker answers, may use a second
core; a reload, while the workers answer, must leave it to them."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from resolver import workers
from resolver.config import load


def test_only_the_first_build_may_use_a_second_core(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = load(None, {"server": {"workers": 2, "state_dir": str(tmp_path)},
                      "upstream": {"servers": ["127.0.0.1:9"]}})
    calls: list[bool] = []

    def build_in_child(*args: object, starting: bool = False, **kwargs: object) -> None:
        calls.append(starting)
        raise RuntimeError("not building in this test")

    monkeypatch.setattr(workers, "build_in_child", build_in_child)
    sup = workers.Supervisor(cfg)
    assert sup.build(starting=True) is None  # as _supervise starts

    async def reload() -> None:
        sup._reload_lock = asyncio.Lock()
        await sup.reload(reread_config=False)

    asyncio.run(reload())
    assert calls == [True, False]
