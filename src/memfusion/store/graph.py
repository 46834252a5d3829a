"""Versioned graph edges ``src -[relation]-> dst``: link / unlink / neighbors over SQL.

Edges are versioned exactly like records, per ``(namespace, src, relation, dst)``: every link
or unlink appends a version (``1..n``, strictly increasing ``committed_at``), an unlink is a
tombstone, and visibility (``as_of``, ``valid_at``) follows :mod:`memfusion.store.versions`.
Each change appends an audit line keyed ``"src|relation|dst"`` in the same transaction.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from memfusion.errors import NotFound
from memfusion.store.base import check_key, check_metadata, check_namespace, check_time
from memfusion.store.dialect import from_us, opt_us, to_us
from memfusion.store.options import check_actor, check_direction, check_interval
from memfusion.store.records import JSON, Edge, Op
from memfusion.store.sqlbase import SQLBase
from memfusion.store.versions import append_audit, append_edge, edge_from_row, latest_edge, visible_edges_sql


class GraphMixin(SQLBase):
    """``link``, ``unlink`` and ``neighbors`` of :class:`~memfusion.store.sql.SQLStore`."""

    def _append_edge_version(self, cur: Any, edge: Edge, latest: Edge | None, now: int, op: Op) -> Edge:
        committed = now if latest is None else max(now, to_us(latest.committed_at) + 1)
        version = 1 if latest is None else latest.version + 1
        new = Edge(
            namespace=edge.namespace,
            src=edge.src,
            relation=edge.relation,
            dst=edge.dst,
            version=version,
            committed_at=from_us(committed),
            actor=edge.actor,
            metadata=edge.metadata,
            valid_from=edge.valid_from,
            valid_to=edge.valid_to,
            deleted=edge.deleted,
        )
        append_edge(cur, self._dialect, new, committed_at=committed)
        append_audit(
            cur,
            self._dialect,
            namespace=edge.namespace,
            key=f"{edge.src}|{edge.relation}|{edge.dst}",
            op=op,
            actor=edge.actor,
            at=committed,
            old_version=None if latest is None else latest.version,
            new_version=version,
        )
        return new

    def link(
        self,
        namespace: str,
        src: str,
        relation: str,
        dst: str,
        *,
        metadata: dict[str, JSON] | None = None,
        valid_from: datetime | None = None,
        valid_to: datetime | None = None,
        actor: str = "memfusion",
    ) -> Edge:
        """Append a version of the edge (a re-link of a live edge appends one too)."""
        ns = check_namespace(namespace)
        src, relation, dst = check_key(src, "src"), check_key(relation, "relation"), check_key(dst, "dst")
        meta, (start, end), actor = check_metadata(metadata), check_interval(valid_from, valid_to), check_actor(actor)
        draft = Edge(ns, src, relation, dst, 0, from_us(0), actor, meta, start, end)
        with self._txn(write=True) as cur:
            latest = latest_edge(cur, self._dialect, ns, src, relation, dst)
            return self._append_edge_version(cur, draft, latest, self._now(), Op.LINK)

    def unlink(self, namespace: str, src: str, relation: str, dst: str, *, actor: str = "memfusion") -> Edge:
        """Append a tombstone of the edge; NotFound if it is not live."""
        ns = check_namespace(namespace)
        src, relation, dst = check_key(src, "src"), check_key(relation, "relation"), check_key(dst, "dst")
        actor = check_actor(actor)
        draft = Edge(ns, src, relation, dst, 0, from_us(0), actor, {}, None, None, deleted=True)
        with self._txn(write=True) as cur:
            latest = latest_edge(cur, self._dialect, ns, src, relation, dst)
            if latest is None or latest.deleted:
                raise NotFound(f"no live edge {src!r} -[{relation}]-> {dst!r} in namespace {ns!r} to unlink")
            return self._append_edge_version(cur, draft, latest, self._now(), Op.UNLINK)

    def neighbors(
        self,
        namespace: str,
        node: str,
        *,
        relation: str | None = None,
        direction: str = "out",
        as_of: datetime | None = None,
        valid_at: datetime | None = None,
    ) -> list[Edge]:
        """Visible edges at ``node``, ordered by ``(src, relation, dst)``."""
        ns, node = check_namespace(namespace), check_key(node, "node")
        relation = None if relation is None else check_key(relation, "relation")
        direction = check_direction(direction)
        t, w = check_time(as_of, "as_of"), check_time(valid_at, "valid_at")
        sql, params = visible_edges_sql(
            ns, node=node, relation=relation, direction=direction, as_of=opt_us(t), valid_at=opt_us(w)
        )
        with self._txn(write=False) as cur:
            cur.execute(self._dialect.sql(sql), params)
            return [edge_from_row(self._dialect, row) for row in cur.fetchall()]
