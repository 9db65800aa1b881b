"""The Grafana dashboard and the Prometheus alerting rules in deploy/ name only metrics the
service exports, and are well formed: a renamed metric or label, or a broken rules file, fails
here rather than on an operator's screen. Where promtool is installed (Debian's `prometheus`
package), it checks the rules and every dashboard expression too."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from prometheus_client import REGISTRY
from prometheus_client.metrics import MetricWrapperBase

from server.observability import metrics

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "credits.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"

# The samples each kind of family exports (prometheus_client's naming: a Counter `credits_x`
# is scraped as `credits_x_total` and `credits_x_created`).
SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "summary": ("", "_count", "_sum", "_created"),
    "info": ("_info",),
}
# Labels Prometheus adds when it scrapes (a histogram's buckets carry `le` as well).
SCRAPE_LABELS = {"job", "instance"}
PROMQL_WORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or",
    "unless", "offset", "inf", "nan",
}  # fmt: skip
# Grafana's variables outside label values, as Grafana fills them in before Prometheus parses.
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h"}


def exported_samples() -> dict[str, set[str]]:
    """Every sample name the service's registry can export, with the labels it carries."""
    labels_of = {
        wrapper._name: set(wrapper._labelnames)
        for wrapper in vars(metrics).values()
        if isinstance(wrapper, MetricWrapperBase)
    }
    samples: dict[str, set[str]] = {}
    for family in REGISTRY.collect():
        labels = labels_of.get(family.name, set())
        for suffix in SUFFIXES.get(family.type, ("",)):
            extra = {"le"} if suffix == "_bucket" else set()
            samples[family.name + suffix] = labels | extra | SCRAPE_LABELS
        for sample in family.samples:
            samples.setdefault(sample.name, set()).update(sample.labels, SCRAPE_LABELS)
    return samples


def selectors(expr: str) -> Iterator[tuple[str, set[str]]]:
    """Each metric an expression reads, with the label names its matchers use."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings: label values, variables
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # range and subquery windows
    expr = re.sub(r"(?<![\w:])\d[\w.]*", "", expr)  # numbers and durations (offset 5m)
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    for match in re.finditer(r"([a-zA-Z_:][a-zA-Z0-9_:]*)?\s*(\{[^}]*\})?(\s*\()?", expr):
        name, matchers, call = match.groups()
        if not name or call or name.lower() in PROMQL_WORDS:
            continue
        labels = set(re.findall(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)", matchers or ""))
        yield name, labels


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def dashboard_panels() -> list[dict[str, Any]]:
    panels: list[dict[str, Any]] = []
    for panel in dashboard()["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", ()))  # a collapsed row holds its panels
    return panels


def dashboard_expressions() -> list[str]:
    return [
        target["expr"]
        for panel in dashboard_panels()
        for target in panel.get("targets", ())
        if "expr" in target
    ]


def rules() -> list[dict[str, Any]]:
    loaded = yaml.safe_load(ALERTS.read_text())
    return [rule for group in loaded["groups"] for rule in group["rules"]]


def promtool_check(rules_file: Path) -> str | None:
    """promtool's complaints about a rules file ("" for none); None where promtool is not
    installed (it is optional: the Python checks run either way)."""
    promtool = shutil.which("promtool")
    if promtool is None:
        return None
    checked = subprocess.run(
        [promtool, "check", "rules", str(rules_file)], capture_output=True, text=True, timeout=60
    )
    return "" if checked.returncode == 0 else checked.stdout + checked.stderr


def as_rules_file(expressions: list[str], path: Path) -> Path:
    """The dashboard's expressions as recording rules, with Grafana's variables filled in as
    Grafana would, for promtool to parse."""
    recorded = []
    for number, expr in enumerate(expressions):
        for variable, value in GRAFANA_VARIABLES.items():
            expr = expr.replace(variable, value)
        recorded.append({"record": f"credits:dashboard_{number}", "expr": expr})
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": recorded}]}))
    return path


def unknown_metrics(expressions: list[str]) -> list[str]:
    exported = exported_samples()
    problems = []
    for expr in expressions:
        found = list(selectors(expr))
        if not found:
            problems.append(f"no metric found in {expr!r}")
        for name, labels in found:
            if name not in exported:
                problems.append(f"{name} (in {expr!r}) is not exported")
            elif labels - exported[name]:
                problems.append(f"{name} has no label {sorted(labels - exported[name])}")
    return problems


def test_the_metric_finder_sees_what_an_expression_reads() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (method, le) (rate(credits_rpc_seconds_bucket{job=~"$job"'
        ', instance=~"a|b"}[$__rate_interval]))) / on (job) group_left sum(up offset 5m) > bool 0'
    )
    assert sorted(selectors(expr)) == [
        ("credits_rpc_seconds_bucket", {"job", "instance"}),
        ("up", set()),
    ]
    assert unknown_metrics(["credits_rpcs_total", "credits_rpcs"]) == [
        "credits_rpcs (in 'credits_rpcs') is not exported"
    ]
    assert unknown_metrics(['credits_generation_queue{queue="x"}']) == [
        "credits_generation_queue has no label ['queue']"
    ]


def test_every_dashboard_expression_names_exported_metrics(tmp_path: Path) -> None:
    expressions = dashboard_expressions()
    assert unknown_metrics(expressions) == []
    assert promtool_check(as_rules_file(expressions, tmp_path / "dashboard.yml")) in {"", None}
    used = {name for expr in expressions for name, _ in selectors(expr)}
    wanted = {
        "credits_rpcs_total", "credits_rpc_errors_total", "credits_rpc_seconds_bucket",
        "credits_db_pool_connections", "credits_service_layer_breaker_open",
        "credits_service_credential_rejections_total", "credits_user_layer_calls_total",
        "credits_database_reachable", "credits_embedded_postgres_restarts_total",
        "credits_db_batch_calls_bucket", "credits_generation_queue",
        "credits_generation_oldest_queued_seconds", "credits_generation_attempts_total",
    }  # fmt: skip
    assert wanted <= used, f"panels missing for {sorted(wanted - used)}"


def test_the_dashboard_is_an_importable_grafana_dashboard() -> None:
    board = dashboard()
    assert isinstance(board["schemaVersion"], int)
    assert board["schemaVersion"] >= 39
    assert board["uid"]
    assert board["title"]
    assert "webhook" in board["description"].lower()  # the backlog panel comes with webhooks
    variables = {variable["name"]: variable for variable in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("job", "instance"):
        assert variables[name]["type"] == "query"
        assert variables[name]["datasource"]["uid"] == "${datasource}"
    panels = dashboard_panels()
    assert len({panel["id"] for panel in panels}) == len(panels)
    for panel in panels:
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]
            # every series is narrowed to the chosen jobs and instances
            for name, labels in selectors(target["expr"]):
                assert {"job", "instance"} <= labels, f"{panel['title']}: {name}"
        assert set(panel["gridPos"]) == {"h", "w", "x", "y"}


def test_every_alert_names_exported_metrics() -> None:
    assert unknown_metrics([rule["expr"] for rule in rules()]) == []


def test_the_rules_file_has_the_alerts_an_operator_needs() -> None:
    loaded = yaml.safe_load(ALERTS.read_text())
    assert set(loaded) == {"groups"}
    for group in loaded["groups"]:
        assert group["name"]
        assert group["rules"]
    found = rules()
    for rule in found:
        assert set(rule) == {"alert", "expr", "for", "labels", "annotations"}, rule
        assert re.fullmatch(r"[A-Z][A-Za-z]+", rule["alert"]), rule["alert"]
        assert re.fullmatch(r"\d+[smh]", rule["for"]), rule["alert"]
        assert rule["labels"]["severity"] in {"critical", "warning"}, rule["alert"]
        for key in ("summary", "description", "runbook"):
            assert rule["annotations"][key].strip(), (rule["alert"], key)
        assert "docs/deployment.md#dashboard-and-alerts" in rule["annotations"]["runbook"]
    assert {rule["alert"] for rule in found} >= {
        "CreditsServiceCredentialsRefused", "CreditsServiceLayerBreakerOpen",
        "CreditsErrorRatioHigh", "CreditsGenerationQueueStalled", "CreditsDatabaseUnreachable",
        "CreditsBackendUnavailable", "CreditsEmbeddedPostgresRestarting",
    }  # fmt: skip
    assert len({rule["alert"] for rule in found}) == len(found)
    assert promtool_check(ALERTS) in {"", None}


def test_runbook_links_point_at_sections_that_exist() -> None:
    for rule in rules():
        for page, anchor in re.findall(
            r"(docs/[\w-]+\.md)#([\w-]+)", rule["annotations"]["runbook"]
        ):
            headings = re.findall(r"^#+ (.+)$", (ROOT / page).read_text(), re.MULTILINE)
            anchors = {
                re.sub(r"[^\w -]", "", h).strip().lower().replace(" ", "-") for h in headings
            }
            assert anchor in anchors, f"{rule['alert']}: {page}#{anchor}"
        # each alert is explained there by its name
        assert rule["alert"] in (ROOT / "docs" / "deployment.md").read_text()
