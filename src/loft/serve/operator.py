"""Operator endpoints of `loft serve`: Prometheus metrics (also on a listener of their own), the
status document behind ``GET /v1/loft/status`` and ``loft serve status``, and the ``/v1/models``
list. Access rules are in app.py, where the routes are; this module builds the answers."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Response

if TYPE_CHECKING:
    from loft.serve.app import ServerState
    from loft.serve.keys import KeyRecord


def create_metrics_app(app: FastAPI) -> FastAPI:
    """``/metrics`` of ``app``'s server, with no key, for a listener of its own (metrics_port);
    every other path is 404 there."""
    metrics_app = FastAPI(title="loft metrics", docs_url=None, redoc_url=None, openapi_url=None)
    st: ServerState = app.state.loft

    @metrics_app.get("/metrics")
    async def metrics_endpoint() -> Response:
        return metrics_response(st)

    return metrics_app


def metrics_response(st: ServerState) -> Response:
    st.metrics.set_gauges(
        resident=len(st.engine.resident()),
        queue_depth=st.engine.queue_depth(),
        in_flight=st.in_flight,
    )
    body, content_type = st.metrics.render()
    return Response(body, media_type=content_type)


async def server_status(st: ServerState, record: KeyRecord | None) -> dict[str, Any]:
    """What the server serves: base model, resident adapters, and for each registered adapter
    the version a bare name routes to, its aliases and its traffic split (``split``: candidate
    ``name:V``, its ``share`` in [0, 1] and ``since``; null without one). A key without the
    metrics scope sees only the models on its allow-list (as in /v1/models)."""
    from datetime import UTC, datetime

    from loft import __version__
    from loft.registry.splits import served_version

    def visible(name: str) -> bool:
        return record is None or record.metrics or record.allows(name, is_base=False)

    cfg, base = st.config, st.engine.base
    adapters = []
    for m, split in await asyncio.to_thread(_models_and_splits, visible):
        version = served_version(m["aliases"], m["latest"], cfg.default_alias)
        adapters.append({
            "name": m["name"],
            "serves": f"{m['name']}:{version}" if version is not None else None,
            "aliases": {a: f"{m['name']}:{v}" for a, v in m["aliases"].items()},
            "latest": m["latest"],
            "split": None if split is None else {
                "candidate": f"{m['name']}:{split['candidate']}",
                "share": split["share"],
                "since": split["since"],
            },
        })  # fmt: skip
    resident = [r for r in st.engine.resident_details() if visible(r["ref"].rpartition(":")[0])]
    return {
        "object": "loft.status",
        "loft_version": __version__,
        "state": "draining" if st.draining else "ready",
        "started": datetime.fromtimestamp(st.started_at, UTC).isoformat(timespec="seconds"),
        "uptime_s": round(time.time() - st.started_at, 1),
        "engine": cfg.engine,
        "base_model": {"name": base.name, "sha256": base.sha256},
        "default_alias": cfg.default_alias,
        "alias_refresh_s": cfg.alias_refresh_s,
        "max_resident_adapters": cfg.max_resident_adapters,
        "resident": resident,
        "adapters": adapters,
        "in_flight": st.in_flight,
        "queue_depth": st.engine.queue_depth(),
        "view": "all" if record is None or record.metrics else f"key {record.name}",
    }


def _models_and_splits(
    visible: Callable[[str], bool],
) -> list[tuple[dict[str, Any], dict[str, Any] | None]]:
    """Each visible registered model with its split (None: none, or an unreadable one, which the
    server ignores too)."""
    from loft.core.errors import IntegrityError, NotFoundError
    from loft.registry import get_split, list_models

    out = []
    for m in list_models():
        if not visible(m["name"]):
            continue
        try:
            split = get_split(m["name"])
        except (IntegrityError, NotFoundError):  # unreadable, or deleted since it was listed
            split = None
        out.append((m, split))
    return out


async def visible_models(st: ServerState, record: KeyRecord | None) -> list[dict[str, Any]]:
    """The ``/v1/models`` list: the base model and each registered adapter name the key may use."""
    from loft.registry import list_models

    def entry(model_id: str, **extra: Any) -> dict[str, Any]:
        return {"id": model_id, "object": "model", "created": 0, "owned_by": "loft", **extra}

    base = st.engine.base
    out = []
    if record is None or record.allows(base.name, is_base=True):
        out.append(entry(base.name, loft={"kind": "base", "sha256": base.sha256}))
    for m in await asyncio.to_thread(list_models):
        if record is None or record.allows(m["name"], is_base=False):
            out.append(entry(m["name"], loft={"kind": "adapter", "aliases": m["aliases"]}))
    return out
