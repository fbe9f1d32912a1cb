"""A version's lineage as a graph: base model and datasets, through runs, merges and preference
stages (a DPO run starts from the version it names in ``init_from``, its parent), to the version.

Read from the lineage cards alone (no MLflow, no torch), walking parents up to ``depth``
versions. ``layout`` places the nodes in columns (each node one column right of everything it
came from) for a server-rendered SVG.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

NODE_W, NODE_H, GAP_X, GAP_Y, PAD = 190, 46, 60, 18, 12


@dataclass
class Node:
    id: str
    kind: str  # "base" | "dataset" | "run" | "merge" | "version"
    label: str
    detail: str = ""
    href: str | None = None
    x: int = 0
    y: int = 0


@dataclass
class Graph:
    nodes: dict[str, Node] = field(default_factory=dict)
    edges: list[tuple[str, str, str]] = field(default_factory=list)  # (from, to, label)
    width: int = 0
    height: int = 0
    truncated: bool = False

    def add(self, node: Node) -> str:
        self.nodes.setdefault(node.id, node)
        return node.id

    def link(self, a: str, b: str, label: str = "") -> None:
        if (a, b, label) not in self.edges:
            self.edges.append((a, b, label))

    def to_dict(self) -> dict[str, Any]:
        return {
            "nodes": [
                {"id": n.id, "kind": n.kind, "label": n.label, "detail": n.detail, "href": n.href}
                for n in self.nodes.values()
            ],
            "edges": [{"from": a, "to": b, "label": label} for a, b, label in self.edges],
            "truncated": self.truncated,
        }

    def svg_edges(self) -> list[dict[str, Any]]:
        """Each edge as an SVG path (right side of its source to left side of its target)."""
        out = []
        for a, b, label in self.edges:
            s, t = self.nodes[a], self.nodes[b]
            x1, y1 = s.x + NODE_W, s.y + NODE_H // 2
            x2, y2 = t.x, t.y + NODE_H // 2
            mid = (x1 + x2) // 2
            out.append(
                {
                    "d": f"M{x1},{y1} C{mid},{y1} {mid},{y2} {x2 - 4},{y2}",
                    "label": label,
                    "lx": mid,
                    "ly": (y1 + y2) // 2 - 4,
                }
            )
        return out


def lineage_graph(ref: str, *, depth: int = 8) -> Graph:
    """The graph of ``ref`` and its ancestors (up to ``depth`` versions), laid out."""
    from loft.registry.store import get_version

    mv = get_version(ref, verify=False)
    graph = Graph()
    seen: set[str] = set()
    _walk(graph, mv.name, mv.version, mv.card, depth, seen)
    layout(graph)
    return graph


def _walk(
    graph: Graph, name: str, version: int, card: dict[str, Any], depth: int, seen: set[str]
) -> str:
    from loft.core.errors import LoftError
    from loft.registry.store import _card

    vid = f"version:{name}:{version}"
    if vid in seen:
        return vid
    seen.add(vid)
    graph.add(
        Node(
            vid,
            "version",
            f"{name}:{version}",
            str(card.get("kind") or ""),
            f"/registry/{name}/{version}",
        )
    )
    lin = card.get("lineage") or {}
    config = lin.get("config") or {}
    parents = lin.get("parents") or ([lin["parent"]] if lin.get("parent") else [])
    run = lin.get("run") or {}
    if len(parents) > 1 and not config:
        step = graph.add(
            Node(f"merge:{name}:{version}", "merge", "merge", f"{len(parents)} versions")
        )
    else:
        objective = config.get("objective") or "sft"
        method = config.get("method")
        what = objective if objective != "sft" else f"sft · {method}" if method else ""
        run_id = str(run.get("run_id") or Path(str(run.get("path") or "?")).name)
        step = graph.add(Node(f"run:{run_id}", "run", f"run {run_id[:18]}", what))
    graph.link(step, vid)
    base = (lin.get("base_model") or {}).get("name")
    if base and not parents:
        sha = (lin.get("base_model") or {}).get("sha256") or ""
        label = Path(str(base)).name if "/" in str(base) else str(base)  # a local folder
        graph.link(graph.add(Node(f"base:{base}", "base", label, sha[:12])), step)
    data = _dataset(config, lin.get("dataset_fingerprint"))
    if data is not None:
        graph.link(graph.add(data), step, "data")
    for p in parents:
        pname, pversion = p.get("name"), p.get("version")
        if not pname or not isinstance(pversion, int):
            continue
        label = "merged" if len(parents) > 1 else "init from"
        if depth <= 1:
            pid = f"version:{pname}:{pversion}"
            graph.add(
                Node(pid, "version", f"{pname}:{pversion}", "…", f"/registry/{pname}/{pversion}")
            )
            graph.truncated = True
        else:
            try:
                pcard = _card(pname, pversion)
            except LoftError:
                pcard = {}
            pid = _walk(graph, pname, pversion, pcard, depth - 1, seen)
        graph.link(pid, step, label)
    return vid


def _dataset(config: dict[str, Any], fingerprint: str | None) -> Node | None:
    """The training data: a catalog dataset version when the run read one, else its file."""
    from loft.core.paths import loft_home

    train = ((config.get("data") or {}) if isinstance(config, dict) else {}).get("train")
    if train:
        path = Path(str(train))
        catalog = loft_home() / "catalog"
        try:
            rel = path.resolve().relative_to(catalog.resolve())
        except (ValueError, OSError):
            rel = None
        if rel is not None and len(rel.parts) >= 2 and rel.parts[1].isdigit():
            dname, dversion = rel.parts[0], rel.parts[1]
            return Node(
                f"dataset:{dname}:{dversion}",
                "dataset",
                f"{dname}:{dversion}",
                "dataset version",
                f"/datasets/{dname}/{dversion}",
            )
        detail = f"prepared {fingerprint[:12]}" if fingerprint else "file"
        return Node(f"dataset:{fingerprint or path}", "dataset", path.name, detail)
    if fingerprint:
        return Node(f"dataset:{fingerprint}", "dataset", "dataset", f"prepared {fingerprint[:12]}")
    return None


def layout(graph: Graph) -> None:
    """Columns by longest path from a source; rows in insertion order within a column."""
    incoming: dict[str, list[str]] = {n: [] for n in graph.nodes}
    for a, b, _ in graph.edges:
        incoming[b].append(a)
    column: dict[str, int] = {}

    def col(n: str, stack: frozenset[str] = frozenset()) -> int:
        if n not in column:
            preds = [p for p in incoming[n] if p not in stack]
            column[n] = 1 + max((col(p, stack | {n}) for p in preds), default=-1)
        return column[n]

    rows: dict[int, int] = {}
    for n in graph.nodes:
        c = col(n)
        node = graph.nodes[n]
        node.x = PAD + c * (NODE_W + GAP_X)
        node.y = PAD + rows.get(c, 0) * (NODE_H + GAP_Y)
        rows[c] = rows.get(c, 0) + 1
    graph.width = PAD * 2 + (max(column.values(), default=0) + 1) * (NODE_W + GAP_X) - GAP_X
    graph.height = PAD * 2 + max(rows.values(), default=1) * (NODE_H + GAP_Y) - GAP_Y
