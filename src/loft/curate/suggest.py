"""Suggestions from a model: a registered model version, served by a running `loft serve`,
answers each record's prompt; the answer prefills the project's correction questions on the
labelling page, marked "suggestion: model NAME:VERSION", for the annotator to accept or edit.

Generation goes through the model server's chat API (loft.serve.client, stdlib only), never
torch here. Requests are made in batches of ``limit`` records (the portal's button asks for the
next batch), so a large project is worked through a batch at a time.
"""

from __future__ import annotations

from typing import Any

from loft.core import audit
from loft.core.errors import ConfigError
from loft.curate import questions as qs
from loft.curate.store import LabellingStore

MAX_BATCH = 200


def suggest(
    store: LabellingStore,
    project: str,
    model: str,
    *,
    url: str | None = None,
    key: str | None = None,
    limit: int = 20,
    max_tokens: int = 256,
    actor: str,
    context: dict | None = None,
) -> dict[str, Any]:
    """Ask ``model`` (``name:version`` on the server at ``url``, default the configured one:
    $LOFT_SERVE_URL or serve.url) to answer up to ``limit`` records that have no suggestion yet;
    ``{"model", "suggested": [records], "left": n}``."""
    from loft.data import catalog
    from loft.serve import client

    p = store.get_project(project)
    if not any(q.kind == "correction" for q in p.questions):
        raise ConfigError(
            f"project {project!r} has no correction question for a model's answer to prefill."
        )
    if not 1 <= limit <= MAX_BATCH:
        raise ConfigError(f"limit {limit}: ask for 1 to {MAX_BATCH} records at a time.")
    if url is None:
        url, configured_key = client.configured()
        key = key or configured_key
        if url is None:
            raise ConfigError(
                "no model server is configured for suggestions.",
                hint="Start one with `loft serve` (or `loft up`) and set LOFT_SERVE_URL (or "
                "serve.url in LOFT_HOME/settings.yaml) and LOFT_API_KEY for the portal.",
            )
    done = []
    for record in store.unsuggested(project, limit):
        prompt, _ = qs.record_parts(catalog.read_records(p.dataset, record, 1)[0])
        if not prompt:
            continue
        messages = [{"role": m["role"], "content": m["content"]} for m in prompt]
        text = client.chat(url, key, model, messages, max_tokens=max_tokens)
        store.add_suggestion(project, record, model, text)
        done.append(record)
    audit.append(
        actor, "labelling.suggest", project,
        {"model": model, "records": done, **(context or {})},
    )  # fmt: skip
    return {"model": model, "suggested": done, "left": len(store.unsuggested(project, p.records))}
