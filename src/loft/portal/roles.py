"""Roles and the one permission table. Every page and every API route names an action from
``ACTIONS`` and the server checks the caller's role against it (loft.portal.auth.require); the
UI hides what a role may not do only as a courtesy. docs/portal.md shows this table.

Pure data, no web imports: the CLI (`loft users`) validates roles with it too.
"""

from __future__ import annotations

ROLES = ("admin", "curator", "annotator", "engineer", "viewer")

ROLE_HELP = {
    "admin": "everything, including users, serving keys and the audit trail",
    "curator": "manages datasets and labelling projects, reviews labels",
    "annotator": "labels the records assigned to them",
    "engineer": "submits jobs, promotes model versions through gates",
    "viewer": "reads datasets, jobs, runs, the registry and serving",
}

_ALL = frozenset(ROLES)
_READERS = frozenset({"admin", "curator", "engineer", "viewer"})  # everyone but annotators

# action -> the roles that may take it
ACTIONS: dict[str, frozenset[str]] = {
    # accounts
    "users.manage": frozenset({"admin"}),  # add users, change roles, disable, reset passwords
    "tokens.own": _ALL,  # create and revoke one's own API tokens
    "audit.view": frozenset({"admin"}),  # read and verify the audit trail
    # datasets
    "datasets.view": _READERS,  # list datasets, versions, validation reports
    "datasets.upload": frozenset({"admin", "curator"}),  # upload, new versions
    # labelling
    "labelling.manage": frozenset({"admin", "curator"}),  # projects, questions, assignment, export
    "labelling.annotate": frozenset({"admin", "curator", "annotator"}),  # label assigned records
    "labelling.review": frozenset({"admin", "curator"}),  # resolve conflicts between annotators
    # jobs and runs
    "jobs.view": _READERS,  # the queue, runs, their curves and logs
    "jobs.submit": frozenset({"admin", "engineer"}),  # submit and cancel jobs
    # registry
    "registry.view": _READERS,  # versions, lineage, metrics, history
    "registry.compare": frozenset({"admin", "curator", "engineer"}),  # side by side, blind votes
    "registry.promote": frozenset({"admin", "engineer"}),  # promote through a gate, roll back
    # serving
    "serving.view": _READERS,  # which version each alias serves, traffic and latency
    "keys.manage": frozenset({"admin"}),  # serving API keys: create, revoke
}


def allowed(role: str, action: str) -> bool:
    """Whether ``role`` may take ``action`` (KeyError for an action not in the table, so a
    misspelt name fails loudly instead of refusing everyone)."""
    return role in ACTIONS[action]


def actions_of(role: str) -> list[str]:
    """Every action ``role`` may take, in table order."""
    return [action for action, roles in ACTIONS.items() if role in roles]


def roles_for(action: str) -> list[str]:
    """The roles that may take ``action``, in ROLES order."""
    return [role for role in ROLES if role in ACTIONS[action]]
