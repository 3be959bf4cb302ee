"""`trisect roles`: the instances of a cluster and their roles, read from (and asked through) Redis.

  trisect roles [--redis-url URL] [--namespace trisect]             list: id, role, state, load, since
  trisect roles set ID ROLE [--redis-url URL] [--namespace trisect]   ask instance ID to take ROLE

`set` only records the desired role in the registry; the instance drains, switches and reports
back through its record (watch it with `trisect roles`). The URL defaults to $TRISECT_REDIS_URL.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from cluster.redis_store import RedisStore, StoreConfig, StoreError
from cluster.registry import InstanceRecord, Registry
from cluster.roles import Role


def _registry(args) -> Registry:
    url = args.redis_url or os.environ.get("TRISECT_REDIS_URL")
    if not url:
        raise SystemExit("trisect roles: give --redis-url (or set TRISECT_REDIS_URL)")
    return Registry(RedisStore(StoreConfig(url=url, namespace=args.namespace)))


def _ago(since: float, now: float) -> str:
    if not since:
        return "?"
    s = max(0, int(now - since))
    return f"{s}s ago" if s < 120 else f"{s // 60}m ago" if s < 7200 else f"{s // 3600}h ago"


def format_table(records: list[InstanceRecord], wanted: dict[str, Role], now: float) -> str:
    rows = [("ID", "ROLE", "STATE", "LOAD (wait/run, kv free)", "SINCE", "ASKED")]
    for r in records:
        ld = r.load
        state = r.state.value + (f" -> {r.target.value}" if r.target else "")
        rows.append((r.id, r.info.role.value, state, f"{ld.waiting}/{ld.running}, {ld.free_kv_blocks}/{ld.total_kv_blocks}",
                     _ago(r.since, now), wanted[r.id].value if r.id in wanted else "-"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="trisect roles", description="list instances' roles, or ask one to switch")
    ap.add_argument("action", nargs="*", help="nothing (list) or: set ID ROLE")
    ap.add_argument("--redis-url")
    ap.add_argument("--namespace", default="trisect")
    args = ap.parse_args(argv)
    try:
        registry = _registry(args)
        if not args.action:
            records = registry.live()
            print(format_table(records, registry.desired_roles([r.id for r in records]), time.time()))
            return 0
        if args.action[0] != "set" or len(args.action) != 3:
            ap.error("usage: trisect roles set ID ROLE")
        iid, role = args.action[1], args.action[2]
        try:
            role = Role.parse(role)
        except ValueError as e:
            ap.error(f"ROLE: {e}")
        rec = next((r for r in registry.live() if r.id == iid), None)
        if rec is None:
            print(f"trisect roles: no live instance {iid!r}", file=sys.stderr)
            return 1
        registry.request_role(iid, role)
        print(f"asked {iid} ({rec.info.role.value}, {rec.state.value}) to become {role.value}")
        return 0
    except StoreError as e:
        print(f"trisect roles: {e}", file=sys.stderr)
        return 1
