#!/usr/bin/env python3
"""Check that the dashboards and alerts only use metric names the relay exports.

Every `hookrelay_*` name used in a Grafana dashboard expression (panel
targets and template-variable queries) or anywhere in an alerting-rules file
is looked up in a list of names that the real relay exports. A typo or a
renamed metric would otherwise only show up as an empty panel or an alert
that can never fire.

The list of exported names comes from one or more files, each either
  * the text of a `/metrics` scrape (Prometheus exposition format; `# HELP`
    and `# TYPE` lines count too, so a metric registered without samples is
    still known), or
  * a plain list of names, one per line (`#` starts a comment).
Both kinds can be mixed; a file is read line by line and the leading metric
name of each line is taken. A histogram is known by its base name or any of
its `_bucket`/`_sum`/`_count` series, and all of them are then accepted.

    deploy/check_dashboard.py metrics.txt
    deploy/check_dashboard.py --names names.txt
    deploy/check_dashboard.py --list-used            # print what is used
    deploy/check_dashboard.py --emit-rules out.yml   # dashboard exprs as
                                                     # recording rules, for
                                                     # `promtool check rules`

Exit status: 0 when every used name is exported, 1 when some are not, 2 on a
usage or input error. Standard library only.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_DASHBOARDS = sorted(glob.glob(os.path.join(HERE, "grafana", "dashboards", "*.json")))
DEFAULT_ALERTS = [os.path.join(HERE, "prometheus", "alerts.yml")]

METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def used_names_pattern(prefixes: list[str]) -> re.Pattern[str]:
    alternatives = "|".join(re.escape(p) for p in prefixes)
    # Not preceded by a name character, so "xhookrelay_a" is not a hit.
    return re.compile(r"(?<![a-zA-Z0-9_:])(?:%s)[a-zA-Z0-9_:]*" % alternatives)


def dashboard_expressions(path: str) -> list[tuple[str, str]]:
    """(where, expression) for every query in a dashboard, nested rows included."""
    with open(path, encoding="utf-8") as f:
        dash = json.load(f)
    found: list[tuple[str, str]] = []

    def walk_panels(panels: list[dict]) -> None:
        for panel in panels or []:
            title = panel.get("title", "?")
            for target in panel.get("targets", []) or []:
                expr = target.get("expr")
                if expr:
                    found.append((f"panel {panel.get('id')} '{title}' {target.get('refId', '')}", expr))
            walk_panels(panel.get("panels", []))

    walk_panels(dash.get("panels", []))
    for var in (dash.get("templating") or {}).get("list", []):
        query = var.get("query")
        if isinstance(query, dict):
            query = query.get("query")
        for text in (query, var.get("definition")):
            if isinstance(text, str) and text:
                found.append((f"variable ${var.get('name')}", text))
    return found


def text_without_comments(path: str) -> str:
    """A YAML file's text minus whole-line comments (names in comments are prose)."""
    with open(path, encoding="utf-8") as f:
        return "".join(line for line in f if not line.lstrip().startswith("#"))


def exported_names(paths: list[str]) -> set[str]:
    names: set[str] = set()
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for raw in f:
                line = raw.strip()
                if not line:
                    continue
                if line.startswith("#"):
                    parts = line.split()
                    # "# HELP name text" / "# TYPE name type"
                    if len(parts) >= 3 and parts[1] in ("HELP", "TYPE"):
                        names.add(parts[2])
                        if parts[1] == "TYPE" and len(parts) >= 4 and parts[3] in ("histogram", "summary"):
                            names.update(parts[2] + s for s in HISTOGRAM_SUFFIXES)
                    continue
                m = METRIC_NAME.match(line)
                if m:
                    names.add(m.group(0))
    # A histogram known by any one of its series is known by all of them.
    for name in list(names):
        for suffix in HISTOGRAM_SUFFIXES:
            if name.endswith(suffix):
                base = name[: -len(suffix)]
                names.add(base)
                names.update(base + s for s in HISTOGRAM_SUFFIXES)
    return names


def is_exported(name: str, exported: set[str]) -> bool:
    if name in exported:
        return True
    for suffix in HISTOGRAM_SUFFIXES:
        if name.endswith(suffix) and name[: -len(suffix)] in exported:
            return True
    return False


GRAFANA_VARS = {
    "$__rate_interval": "5m",
    "$__interval": "1m",
    "$__range": "1h",
    "${__rate_interval}": "5m",
    "${__interval}": "1m",
    "${__range}": "1h",
}


def as_promql(expr: str) -> str:
    """Turn a Grafana query into plain PromQL, good enough for a syntax check."""
    m = re.fullmatch(r"\s*label_values\(\s*(.+?)\s*,\s*[a-zA-Z_][a-zA-Z0-9_]*\s*\)\s*", expr)
    if m:
        expr = m.group(1)
    for var, value in GRAFANA_VARS.items():
        expr = expr.replace(var, value)
    # Remaining template variables only appear inside label matchers.
    expr = re.sub(r"\$\{[a-zA-Z0-9_:]+\}|\$[a-zA-Z_][a-zA-Z0-9_]*", ".*", expr)
    return expr


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("exported", nargs="*", metavar="METRICS_OR_NAMES_FILE",
                    help="a /metrics scrape or a newline list of names (may repeat)")
    ap.add_argument("--names", action="append", default=[], metavar="FILE",
                    help="a newline list of exported names (same as a positional file)")
    ap.add_argument("--dashboard", action="append", metavar="FILE",
                    help=f"dashboard JSON (default: {', '.join(os.path.relpath(p) for p in DEFAULT_DASHBOARDS)})")
    ap.add_argument("--alerts", action="append", metavar="FILE",
                    help="Prometheus rules file (default: deploy/prometheus/alerts.yml)")
    ap.add_argument("--prefix", action="append", metavar="PREFIX",
                    help="metric-name prefix to check (default: hookrelay_)")
    ap.add_argument("--list-used", action="store_true", help="print the names used, one per line")
    ap.add_argument("--emit-rules", metavar="FILE",
                    help="write the dashboard queries as recording rules for `promtool check rules`")
    args = ap.parse_args()

    dashboards = args.dashboard or DEFAULT_DASHBOARDS
    alerts = args.alerts or DEFAULT_ALERTS
    pattern = used_names_pattern(args.prefix or ["hookrelay_"])
    sources = args.exported + args.names

    try:
        uses: dict[str, list[str]] = {}
        expressions: list[tuple[str, str, str]] = []
        for path in dashboards:
            for where, expr in dashboard_expressions(path):
                expressions.append((path, where, expr))
                for name in pattern.findall(expr):
                    uses.setdefault(name, []).append(f"{os.path.relpath(path)}: {where}")
        for path in alerts:
            for name in pattern.findall(text_without_comments(path)):
                uses.setdefault(name, []).append(os.path.relpath(path))
        exported = exported_names(sources) if sources else set()
    except (OSError, ValueError) as e:
        print(f"check_dashboard: {e}", file=sys.stderr)
        return 2

    if not uses:
        print("check_dashboard: no metric names found in the dashboards and alerts; wrong files?", file=sys.stderr)
        return 2

    if args.emit_rules:
        rules = [{"record": f"dashboard:check:{i}", "expr": as_promql(expr)}
                 for i, (_, _, expr) in enumerate(expressions)]
        # JSON is valid YAML, and promtool reads YAML.
        with open(args.emit_rules, "w", encoding="utf-8") as f:
            json.dump({"groups": [{"name": "dashboard-expressions", "rules": rules}]}, f, indent=2)

    if args.list_used:
        for name in sorted(uses):
            print(name)

    if not sources:
        if args.list_used or args.emit_rules:
            return 0
        print("check_dashboard: give a /metrics scrape or --names FILE to check against", file=sys.stderr)
        return 2

    missing = sorted(n for n in uses if not is_exported(n, exported))
    if missing:
        print(f"check_dashboard: {len(missing)} metric name(s) used but not exported by the relay:", file=sys.stderr)
        for name in missing:
            where = sorted(set(uses[name]))
            print(f"  {name}  (used in {'; '.join(where[:3])}{' ...' if len(where) > 3 else ''})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
