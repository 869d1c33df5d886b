"""docs/grafana-dashboard.json queries only series that a real gateway's /metrics (with llama-server's) exposes."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import requests

from tests.conftest import ROOT, Gateway

DASHBOARD = ROOT / "docs" / "grafana-dashboard.json"
# Names followed by "(" are functions or aggregations; these are PromQL words that are neither.
PROMQL_WORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring", "group_left",
                "group_right", "inf", "nan"}
SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
            "summary": ("_sum", "_count", "_created"), "gauge": (), "untyped": (), "unknown": (), "info": ("_info",)}


def queries(node: Any) -> Iterator[str]:
    """Every PromQL text in the dashboard: panel targets' `expr` and the template variables' queries."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("expr", "definition", "query") and isinstance(value, str):
                yield value
            else:
                yield from queries(value)
    elif isinstance(node, list):
        for item in node:
            yield from queries(item)


def metric_names(promql: str) -> set[str]:
    """The metric names one PromQL expression (or Grafana's label_values(metric, label)) reads."""
    grafana = re.fullmatch(r"\s*label_values\(\s*([A-Za-z_:][A-Za-z0-9_:]*)[^,]*,\s*\w+\s*\)\s*", promql)
    if grafana:
        return {grafana.group(1)}
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', promql)  # label values, e.g. status=~"5.."
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # ranges
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)  # label lists
    text = re.sub(r"\$\w+", "", text)  # Grafana variables
    text = re.sub(r"\boffset\s+\w+", "", text)  # offset 1h
    names = set()
    for match in re.finditer(r"(?<![\w.:])[A-Za-z_:][A-Za-z0-9_:]*", text):  # not inside 1e3 or 0.5
        word = match.group(0)
        if text[match.end():].lstrip().startswith("(") or word.lower() in PROMQL_WORDS:
            continue
        names.add(word)
    return names


def exposed_names(scrape: str) -> set[str]:
    """Sample names in a Prometheus text scrape, plus every sample name the declared families (# TYPE) can have."""
    names = set()
    for line in scrape.splitlines():
        if line.startswith("# TYPE "):
            _, _, family, kind = line.split(" ", 3)
            names.add(family)
            names.update(family + suffix for suffix in SUFFIXES[kind])
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def test_metric_names_are_read_from_promql() -> None:
    assert metric_names('histogram_quantile(0.95, sum by (le, route) (rate(a_bucket{x=~"5.."}[$__rate_interval])))') \
        == {"a_bucket"}
    assert metric_names("sum(rate(llamacpp:x_total[5m])) / (sum(b) + max(c offset 1h)) * 1e3") == {
        "llamacpp:x_total", "b", "c"}
    assert metric_names("label_values(gateway_uptime_seconds, instance)") == {"gateway_uptime_seconds"}


def test_every_dashboard_query_names_an_exposed_series(gateway: Gateway) -> None:
    chat = {"model": "any", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    assert requests.post(f"{gateway.url}/v1/chat/completions", json=chat, timeout=60).status_code == 200
    with requests.post(f"{gateway.url}/v1/chat/completions", json={**chat, "stream": True}, stream=True,
                       timeout=60) as streamed:
        assert streamed.status_code == 200
        for _ in streamed.iter_lines():
            pass
    scrape = requests.get(f"{gateway.url}/metrics", params={"format": "prometheus"}, timeout=10)
    assert scrape.status_code == 200
    exposed = exposed_names(scrape.text)
    assert any(name.startswith("llamacpp:") for name in exposed), "llama-server's series are missing from the scrape"

    dashboard = json.loads(DASHBOARD.read_text())
    wanted: dict[str, set[str]] = {}
    for promql in queries(dashboard):
        for name in metric_names(promql):
            wanted.setdefault(name, set()).add(promql)
    assert any(name.startswith("llamacpp:") for name in wanted) and len(wanted) > 10
    missing = {name: sorted(exprs) for name, exprs in wanted.items() if name not in exposed}
    assert not missing, f"the dashboard queries series /metrics does not expose: {missing}"
