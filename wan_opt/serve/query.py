"""The gallery's question to the index: which runs of which set, filtered by knobs and figures, in what order.

    /api/runs?set=ID&status=ok&q=fox&f=steps=2&f=steps=4&f=mode=fast&min=s_per_step=0.5&sort=s_per_step&order=desc

Filters on one knob are alternatives (steps 2 or 4), filters on different knobs all apply; `q` looks in the
prompt (and a failure's item and sentence). The answer lists, for the chosen set, the knobs that differ
across it and how many runs each value would leave (the facets), so the page needs no logic of its own.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from wan_opt.serve import knobs

# Knobs that name what was run: always on a card, whether or not they differ.
HEADLINE = ("hardware.name", "mode", "model.name", "seed")
SORT_KEYS = ("created", "prompt", "status")  # besides every knob and figure


class BadQuery(ValueError):
    """A query the page did not make (a hand-written URL): one sentence."""


@dataclass
class Query:
    set: str = ""
    status: str = ""  # "", "ok" or "failed"
    text: str = ""
    where: dict[str, set[str]] = field(default_factory=dict)  # knob -> accepted shown values
    low: dict[str, float] = field(default_factory=dict)  # figure -> minimum
    high: dict[str, float] = field(default_factory=dict)
    facets: list[str] = field(default_factory=list)  # knobs to count values of besides the differing ones
    sort: str = "created"
    descending: bool = True

    @classmethod
    def parse(cls, params: Iterable[tuple[str, str]]) -> "Query":
        """From a URL's query pairs; raises BadQuery."""
        query = cls()
        for name, value in params:
            if name in ("set", "status", "sort"):
                setattr(query, name, value)
            elif name == "q":
                query.text = value
            elif name == "facet":
                query.facets.append(value)
            elif name == "order":
                query.descending = value != "asc"
            elif name in ("f", "min", "max"):
                key, sep, wanted = value.partition("=")
                if not sep or not key:
                    raise BadQuery(f"{name}={value} is not KEY=VALUE.")
                if name == "f":
                    query.where.setdefault(key, set()).add(wanted)
                    continue
                try:
                    bound = float(wanted)
                except ValueError:
                    raise BadQuery(f"{name}={value}: {wanted!r} is not a number.") from None
                (query.low if name == "min" else query.high)[key] = bound
        if query.status not in ("", "ok", "failed"):
            raise BadQuery(f"status={query.status} is not one of ok, failed.")
        return query


def value_of(record: Mapping[str, Any], key: str) -> Any:
    """A record's knob, figure, or own field (prompt, created, status) by one name."""
    if key in knobs.FIGURES:
        return record.get("figures", {}).get(key)
    if key in record.get("knobs", {}):
        return record["knobs"][key]
    return record.get(key) if key in SORT_KEYS else None


def _passes(record: Mapping[str, Any], query: Query, skip: str | None = None) -> bool:
    if query.status and record["status"] != query.status:
        return False
    if query.text:
        haystack = " ".join(str(record.get(k) or "") for k in ("prompt", "item", "error", "name")).lower()
        if query.text.lower() not in haystack:
            return False
    for key, accepted in query.where.items():
        if key != skip and knobs.shown(value_of(record, key)) not in accepted:
            return False
    for key, bound in query.low.items():
        value = value_of(record, key)
        if not isinstance(value, (int, float)) or value < bound:
            return False
    for key, bound in query.high.items():
        value = value_of(record, key)
        if not isinstance(value, (int, float)) or value > bound:
            return False
    return True


def _sort_key(record: Mapping[str, Any], key: str) -> tuple:
    value = value_of(record, key)
    if isinstance(value, bool) or value is None:
        return (1, 0.0, knobs.shown(value))
    if isinstance(value, (int, float)):
        return (0, float(value), "")
    return (0, 0.0, str(value).lower())


def run_query(records: list[dict], query: Query) -> dict:
    """The records that answer `query`, in order, with the set's differing knobs and their facets."""
    in_set = [r for r in records if not query.set or r["set"] == query.set]
    differing = knobs.differing(r["knobs"] for r in in_set if r["status"] == "ok") if in_set else []
    facets = {}
    for key in list(dict.fromkeys([*differing, *query.where, *query.facets])):
        counts: dict[str, int] = {}
        for record in in_set:
            if _passes(record, query, skip=key):
                shown = knobs.shown(value_of(record, key))
                counts[shown] = counts.get(shown, 0) + 1
        facets[key] = dict(sorted(counts.items(), key=lambda kv: _natural(kv[0])))
    chosen = [r for r in in_set if _passes(r, query)]
    ok = sorted((r for r in chosen if value_of(r, query.sort) is not None), key=lambda r: _sort_key(r, query.sort),
                reverse=query.descending)
    missing = [r for r in chosen if value_of(r, query.sort) is None]  # runs without the figure go last
    figures = sorted({name for r in in_set for name in r.get("figures", {})}, key=list(knobs.FIGURES).index)
    ranges = {}
    for name in figures:
        values = [r["figures"][name] for r in in_set if name in r.get("figures", {})]
        ranges[name] = [min(values), max(values)]
    keys = sorted({key for r in in_set for key in r.get("knobs", {})})
    return {"total": len(in_set), "count": len(chosen), "differing": differing, "facets": facets, "keys": keys,
            "figures": figures, "ranges": ranges, "records": ok + missing}


def _natural(text: str) -> tuple:
    try:
        return (0, float(text), "")
    except ValueError:
        return (1, 0.0, text)


def card(record: Mapping[str, Any], shown_knobs: Iterable[str]) -> dict:
    """What the gallery needs of a record: the headline and the differing knobs, not the whole sidecar."""
    keys = list(dict.fromkeys([*HEADLINE, *shown_knobs]))
    out = {k: v for k, v in record.items() if k not in ("knobs", "data")}
    out["knobs"] = {k: record["knobs"][k] for k in keys if k in record.get("knobs", {})}
    return out
