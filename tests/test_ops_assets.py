"""Deployment assets (ops/, compose.yaml, .dockerignore) agree with the code they deploy.

No Docker engine or cluster is needed: every file is parsed and checked against what the
code itself says (metric names from the Prometheus registry, queue names from Topology,
settings defaults from the settings classes), so the assets cannot drift from it silently.
"""

from __future__ import annotations

import dataclasses
import json
import re
import tomllib
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import REGISTRY

from shared.settings import DEFAULT_RETRY_DELAYS_S, default_of
from shared.topology import Topology
from worker.settings import WorkerSettings

ROOT = Path(__file__).resolve().parent.parent
OPS = ROOT / "ops"
K8S = OPS / "k8s"
ALERTS = OPS / "prometheus" / "alerts.yaml"
DASHBOARD = OPS / "grafana" / "dashboard.json"
RUNBOOK = ROOT / "docs" / "operations.md"
COMPOSE = ROOT / "compose.yaml"
DOCKERFILE = OPS / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"

# The rabbitmq_prometheus families the runbook's scrape job asks /metrics/detailed for, and
# the series each one yields (prefix rabbitmq_detailed_). A query on any other rabbitmq_
# series would need another family in that scrape job: add it to both.
RABBITMQ_DETAILED_FAMILIES = {
    "queue_coarse_metrics": {
        "rabbitmq_detailed_queue_messages_ready",
        "rabbitmq_detailed_queue_messages_unacked",
        "rabbitmq_detailed_queue_messages",
        "rabbitmq_detailed_queue_process_reductions_total",
    },
    "queue_consumer_count": {"rabbitmq_detailed_queue_consumers"},
}
RABBITMQ_METRICS = set().union(*RABBITMQ_DETAILED_FAMILIES.values())

REQUIRED_ALERTS = {
    "FulfillmentDeadLettersPresent",
    "FulfillmentBacklogNotDraining",
    "IngressHigh5xxRate",
    "IngressBrokerDisconnected",
    "FulfillmentNoConsumers",
    "WorkerDeadLetterRate",
    "FulfillmentHandledEventsUnrouted",
    "ReconcileFoundMissingSessions",
}


# --- helpers ----------------------------------------------------------------------------------


def load_yaml_documents(path: Path) -> list[Any]:
    with path.open(encoding="utf-8") as f:
        return [doc for doc in yaml.safe_load_all(f) if doc is not None]


def k8s_objects() -> list[dict[str, Any]]:
    return [
        doc
        for path in sorted(K8S.glob("*.yaml"))
        if path.name != "kustomization.yaml"
        for doc in load_yaml_documents(path)
    ]


def k8s_object(kind: str, name: str) -> dict[str, Any]:
    found = [o for o in k8s_objects() if o.get("kind") == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def only_container(deployment: dict[str, Any]) -> dict[str, Any]:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    container: dict[str, Any] = containers[0]
    return container


def compose_services() -> dict[str, Any]:
    (compose,) = load_yaml_documents(COMPOSE)
    services: dict[str, Any] = compose["services"]
    return services


def alert_rules() -> list[dict[str, Any]]:
    (doc,) = load_yaml_documents(ALERTS)
    return [rule for group in doc["groups"] for rule in group["rules"] if "alert" in rule]


def dashboard() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return doc


def dashboard_panels() -> Iterator[dict[str, Any]]:
    """Every panel, including those nested in collapsed rows."""
    for panel in dashboard()["panels"]:
        yield panel
        yield from panel.get("panels", [])


def dashboard_exprs() -> list[str]:
    return [
        target["expr"]
        for panel in dashboard_panels()
        for target in panel.get("targets", [])
        if target.get("expr")
    ]


_PROMQL_STRING = re.compile(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`')
_PROMQL_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_PROMQL_MATCHERS = re.compile(r"\{[^}]*\}")
_PROMQL_RANGE = re.compile(r"\[[^\]]*\]")
_PROMQL_IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
_PROMQL_KEYWORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan"}


def promql_metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (functions, labels, keywords dropped)."""
    text = _PROMQL_STRING.sub('""', expr)
    text = _PROMQL_GROUPING.sub(" ", text)
    text = _PROMQL_MATCHERS.sub(" ", text)
    text = _PROMQL_RANGE.sub(" ", text)
    names = set()
    for match in _PROMQL_IDENT.finditer(text):
        before = text[match.start() - 1] if match.start() else " "
        after = text[match.end() :].lstrip()[:1]
        if before.isalnum() or before in "_$.":
            continue  # part of a number (1e3) or a $variable
        if after == "(" or match.group().lower() in _PROMQL_KEYWORDS:
            continue  # a function or an operator
        names.add(match.group())
    return names


_QUEUE_MATCHER = re.compile(r'\bqueue\s*(=~|=)\s*"((?:\\.|[^"\\])*)"')


def queue_matchers(expr: str) -> list[tuple[str, str]]:
    return _QUEUE_MATCHER.findall(expr)


# Families of labelled metrics have no samples until a label set is used, so the sample
# names a family will have are derived from its type, as prometheus_client writes them.
_SAMPLE_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("_sum", "_count", "_created"),
    "gauge": ("",),
    "info": ("_info",),
}


@cache
def exported_metric_families() -> dict[str, set[str]]:
    """{family name: its sample names} for everything in the default registry."""
    import ingress.metrics  # noqa: F401 - registering is the import's effect
    import worker.metrics  # noqa: F401

    families: dict[str, set[str]] = {}
    for family in REGISTRY.collect():
        # not the family name itself: a counter "x" is only ever queried as x_total
        names = {s.name for s in family.samples}
        names.update(family.name + suffix for suffix in _SAMPLE_SUFFIXES.get(family.type, ("",)))
        families[family.name] = names
    return families


def exported_metric_names() -> set[str]:
    return set().union(*exported_metric_families().values())


def default_topology(prefix: str = "") -> Topology:
    return Topology(prefix=prefix, retry_delays_s=DEFAULT_RETRY_DELAYS_S, delivery_limit=10)


def github_anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives the headings of a Markdown document."""
    anchors: set[str] = set()
    seen: dict[str, int] = {}
    fenced = False
    for line in markdown.splitlines():
        if line.lstrip().startswith(("```", "~~~")):
            fenced = not fenced
            continue
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if fenced or not match:
            continue
        slug = re.sub(r"[^\w\- ]", "", match.group(1).strip().lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


def parse_duration_s(text: str) -> float:
    """A compose duration ("45s", "1m30s", "500ms") in seconds."""
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", str(text))
    assert parts and "".join(n + u for n, u in parts) == str(text), f"bad duration {text!r}"
    return sum(float(n) * units[u] for n, u in parts)


def default_ingress_metrics_port() -> int:
    from ingress.settings import IngressSettings

    port: int = default_of(IngressSettings, "metrics_port")
    return port


def default_worker_grace_s() -> float:
    (field,) = [f for f in dataclasses.fields(WorkerSettings) if f.name == "grace_s"]
    assert isinstance(field.default, float)
    return field.default


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue  # a comment inside a continued instruction
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = pending + line
        pending = ""
        keyword, _, rest = full.partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
    return instructions


def final_stage(instructions: list[tuple[str, str]]) -> list[tuple[str, str]]:
    starts = [i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM"]
    assert starts, "no FROM in the Dockerfile"
    return instructions[starts[-1] :]


def dockerignore_excludes(path: str) -> bool:
    """Whether .dockerignore keeps ``path`` (relative, with /) out of the build context.

    Docker's rule: the last pattern matching the path or one of its parent folders wins;
    ``!`` re-includes; ``*`` stays within one path segment, ``**`` crosses them.
    """
    excluded = False
    for raw in DOCKERIGNORE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line.lstrip("!").strip().strip("/")
        regex = ""
        i = 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                regex, i = regex + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                regex, i = regex + ".*", i + 2
            elif pattern[i] == "*":
                regex, i = regex + "[^/]*", i + 1
            elif pattern[i] == "?":
                regex, i = regex + "[^/]", i + 1
            elif pattern[i] == "[":
                end = pattern.index("]", i)
                regex, i = regex + pattern[i : end + 1], end + 1
            else:
                regex, i = regex + re.escape(pattern[i]), i + 1
        parts = path.split("/")
        candidates = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
        if any(re.fullmatch(regex, candidate) for candidate in candidates):
            excluded = not negate
    return excluded


# --- every file parses ------------------------------------------------------------------------


YAML_FILES = sorted([*OPS.rglob("*.yaml"), *OPS.rglob("*.yml"), COMPOSE])


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_yaml_file_under_ops_and_the_compose_file_parses(path: Path) -> None:
    assert load_yaml_documents(path), f"{path} holds no YAML document"


def test_the_grafana_dashboard_is_valid_json_with_a_prometheus_datasource_variable() -> None:
    doc = dashboard()

    assert doc["schemaVersion"] >= 36
    variables = {v["name"]: v for v in doc["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for panel in dashboard_panels():
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], f"panel {panel['title']!r} queries nothing"
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]


# --- metric names -----------------------------------------------------------------------------


def test_promql_metric_names_finds_selectors_and_skips_functions_labels_and_keywords() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (le) (rate(a_seconds_bucket{x="y z"}[$__rate_interval])))'
        ' / on (vhost) b_total > bool 1e3 and max without (queue) (c{queue=~"d|e"}) offset 5m'
    )

    assert promql_metric_names(expr) == {"a_seconds_bucket", "b_total", "c"}


def test_every_metric_the_alerts_and_the_dashboard_query_is_exported_by_our_code_or_rabbitmq() -> (
    None
):
    ours = exported_metric_names()
    exprs = [rule["expr"] for rule in alert_rules()] + dashboard_exprs()
    used = set().union(*(promql_metric_names(expr) for expr in exprs))

    assert used, "no metric found in the alerts or the dashboard"
    unknown = {name for name in used if name not in ours and name not in RABBITMQ_METRICS}
    assert not unknown, (
        f"queried but exported neither by ingress/worker metrics nor by the "
        f"rabbitmq_prometheus families {sorted(RABBITMQ_DETAILED_FAMILIES)}: {sorted(unknown)}"
    )
    assert {n for n in used if n.startswith("rabbitmq_")} <= RABBITMQ_METRICS


def test_the_dashboard_charts_every_ingress_and_worker_metric() -> None:
    used = set().union(*(promql_metric_names(expr) for expr in dashboard_exprs()))
    ours = {
        family: samples
        for family, samples in exported_metric_families().items()
        if family.startswith(("ingress_", "worker_"))
    }

    assert ours, "ingress.metrics / worker.metrics registered nothing"
    missing = sorted(family for family, samples in ours.items() if not samples & used)
    assert not missing, f"metrics no dashboard panel shows: {missing}"


def test_every_queue_the_alerts_and_dashboard_name_is_one_the_topology_declares() -> None:
    topology = default_topology()
    # every queue that can hold messages (the readiness probe's keeps none)
    queues = set(topology.all_queues) - {topology.readiness_queue}
    exprs = [rule["expr"] for rule in alert_rules()] + dashboard_exprs()
    covered: set[str] = set()

    for expr in exprs:
        for op, value in queue_matchers(expr):
            if op == "=":
                assert value in queues, f"{value!r} is not a declared queue: {expr}"
                covered.add(value)
            else:
                matched = {q for q in queues if re.fullmatch(value, q)}
                assert matched, f"{value!r} matches no declared queue: {expr}"
                covered |= matched

    assert covered == queues, f"queues on no panel or alert: {sorted(queues - covered)}"


# --- alerts and runbook -----------------------------------------------------------------------


def test_the_alert_file_has_every_alert_with_severity_summary_description_and_runbook() -> None:
    rules = alert_rules()

    assert {rule["alert"] for rule in rules} >= REQUIRED_ALERTS
    for rule in rules:
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        for key in ("summary", "description", "runbook_url"):
            assert str(rule["annotations"].get(key, "")).strip(), f"{rule['alert']}: no {key}"


def test_each_alert_links_to_a_heading_of_the_runbook_that_exists() -> None:
    anchors = github_anchors(RUNBOOK.read_text(encoding="utf-8"))

    for rule in alert_rules():
        url, _, anchor = rule["annotations"]["runbook_url"].partition("#")
        assert url.endswith("docs/operations.md"), rule["alert"]
        assert anchor in anchors, f"{rule['alert']}: no heading for #{anchor} in docs/operations.md"
        assert anchor == rule["alert"].lower()


def test_every_link_inside_the_runbook_to_one_of_its_headings_resolves() -> None:
    text = RUNBOOK.read_text(encoding="utf-8")
    anchors = github_anchors(text)
    links = re.findall(r"\]\(#([^)]+)\)", text)

    assert links
    assert not [link for link in links if link not in anchors]


def test_the_backlog_alert_requires_consumers_and_waits_fifteen_minutes() -> None:
    (rule,) = [r for r in alert_rules() if r["alert"] == "FulfillmentBacklogNotDraining"]

    assert rule["for"] == "15m"
    assert promql_metric_names(rule["expr"]) == {
        "rabbitmq_detailed_queue_messages_ready",
        "rabbitmq_detailed_queue_consumers",
    }


# --- compose ----------------------------------------------------------------------------------


def test_compose_runs_the_broker_database_mail_catcher_migration_ingress_and_workers() -> None:
    services = compose_services()

    assert {"rabbitmq", "postgres", "mailpit", "migrate", "ingress", "worker"} <= set(services)
    assert services["postgres"]["environment"]["POSTGRES_DB"] == "fulfillment"
    for role in ("migrate", "ingress", "worker"):
        assert services[role]["build"]["dockerfile"] == "ops/Dockerfile"
        assert services[role]["command"] == [role]


def test_the_compose_worker_has_no_fixed_host_port_or_name_so_it_can_be_scaled() -> None:
    worker = compose_services()["worker"]

    assert "container_name" not in worker
    for port in worker.get("ports", []):
        if isinstance(port, dict):
            assert "published" not in port, port
        else:
            assert ":" not in str(port).split("/")[0], f"fixed host port {port!r}"


def test_the_compose_worker_gets_longer_to_stop_than_it_takes_to_drain() -> None:
    worker = compose_services()["worker"]
    grace_s = float(worker["environment"].get("WORKER_GRACE_S", default_worker_grace_s()))

    assert parse_duration_s(worker["stop_grace_period"]) > grace_s


def test_compose_starts_the_ingress_and_workers_only_after_the_migration_succeeded() -> None:
    services = compose_services()

    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    for role in ("ingress", "worker"):
        depends = services[role]["depends_on"]
        assert depends["migrate"]["condition"] == "service_completed_successfully"
        assert depends["rabbitmq"]["condition"] == "service_healthy"
    assert "/readyz" in " ".join(services["ingress"]["healthcheck"]["test"])


# --- image ------------------------------------------------------------------------------------


def test_the_image_runs_as_a_non_root_user_in_its_final_stage() -> None:
    stage = final_stage(dockerfile_instructions())
    users = [args for keyword, args in stage if keyword == "USER"]

    assert users, "the final stage sets no USER (it would run as root)"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0")


def test_the_image_installs_from_the_lock_without_dev_dependencies_and_runs_fulfillment() -> None:
    instructions = dockerfile_instructions()
    runs = " ".join(args for keyword, args in instructions if keyword == "RUN")
    stage = dict(final_stage(instructions))

    assert re.search(r"uv sync\b[^&;]*--frozen", runs)
    assert re.search(r"uv sync\b[^&;]*--no-dev", runs)
    assert json.loads(stage["ENTRYPOINT"]) == ["fulfillment"]
    assert json.loads(stage["CMD"]) == ["ingress"]
    assert set(stage["EXPOSE"].split()) == {"8080", "9090", "9100"}


def test_the_image_copies_every_package_the_wheel_is_built_from() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    packages = pyproject["tool"]["hatch"]["build"]["targets"]["wheel"]["packages"]
    copied = {
        args.split()[0].rstrip("/")
        for keyword, args in dockerfile_instructions()
        if keyword == "COPY" and not args.startswith("--from")
    }

    assert set(packages) <= copied
    assert {"pyproject.toml", "README.md"} <= copied  # hatchling needs the readme


def test_the_build_context_holds_what_the_image_copies_and_not_the_venv_git_or_tests() -> None:
    copied = [
        path
        for keyword, args in dockerfile_instructions()
        if keyword == "COPY" and not args.startswith("--from")
        for path in args.split()[:-1]
    ]
    files = []
    for source in copied:
        path = ROOT / source
        if path.is_dir():
            files += [
                p.relative_to(ROOT).as_posix()
                for p in path.rglob("*")
                if p.is_file() and "__pycache__" not in p.parts
            ]
        else:
            files.append(source)

    assert files
    assert not [f for f in files if dockerignore_excludes(f)]
    for kept_out in (".venv/bin/python", ".git/HEAD", "tests/test_ops_assets.py", ".env"):
        assert dockerignore_excludes(kept_out), kept_out
    assert dockerignore_excludes("worker/__pycache__/db.cpython-311.pyc")


# --- Kubernetes -------------------------------------------------------------------------------


def test_the_k8s_worker_gets_longer_to_terminate_than_its_drain_grace_period() -> None:
    worker = k8s_object("Deployment", "fulfillment-worker")
    config = k8s_object("ConfigMap", "fulfillment-config")["data"]
    env = {e["name"]: e.get("value") for e in only_container(worker).get("env", [])}
    grace_s = float(env.get("WORKER_GRACE_S") or config.get("WORKER_GRACE_S") or 0) or (
        default_worker_grace_s()
    )

    assert worker["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > grace_s


def test_keda_scales_the_worker_deployment_on_the_topologys_work_queue() -> None:
    scaled = k8s_object("ScaledObject", "fulfillment-worker")
    config = k8s_object("ConfigMap", "fulfillment-config")["data"]
    (trigger,) = scaled["spec"]["triggers"]
    metadata = trigger["metadata"]

    assert scaled["spec"]["scaleTargetRef"]["name"] == "fulfillment-worker"
    assert k8s_object("Deployment", scaled["spec"]["scaleTargetRef"]["name"])
    assert trigger["type"] == "rabbitmq"
    assert metadata["queueName"] == default_topology(config.get("BROKER_PREFIX", "")).work_queue
    assert metadata["queueName"] == default_topology().work_queue == "fulfillment"
    assert metadata["mode"] == "QueueLength"
    assert metadata["protocol"] == "amqp"
    assert isinstance(metadata["value"], str)  # KEDA wants strings in trigger metadata
    assert scaled["spec"]["minReplicaCount"] >= 1
    assert scaled["spec"]["maxReplicaCount"] > scaled["spec"]["minReplicaCount"]


def test_keda_reads_the_broker_url_from_the_secret_the_workers_use() -> None:
    scaled = k8s_object("ScaledObject", "fulfillment-worker")
    (trigger,) = scaled["spec"]["triggers"]
    auth = k8s_object("TriggerAuthentication", trigger["authenticationRef"]["name"])
    worker_secrets = {
        source["secretRef"]["name"]
        for source in only_container(k8s_object("Deployment", "fulfillment-worker"))["envFrom"]
        if "secretRef" in source
    }

    (ref,) = [r for r in auth["spec"]["secretTargetRef"] if r["parameter"] == "host"]
    assert ref["name"] in worker_secrets
    assert ref["key"] == "RABBITMQ_URL"
    assert "RABBITMQ_URL" in k8s_object("Secret", ref["name"])["stringData"]


def test_deployments_run_as_non_root_with_their_probes_config_and_secret() -> None:
    config_names = {o["metadata"]["name"] for o in k8s_objects() if o["kind"] == "ConfigMap"}
    secret_names = {o["metadata"]["name"] for o in k8s_objects() if o["kind"] == "Secret"}
    expected = {
        "fulfillment-ingress": ("ingress", 8080, "/healthz", "/readyz"),
        "fulfillment-worker": ("worker", 9100, "/healthz", None),
    }
    scraped = {"fulfillment-ingress": default_ingress_metrics_port(), "fulfillment-worker": 9100}

    for name, (role, port, liveness, readiness) in expected.items():
        deployment = k8s_object("Deployment", name)
        pod = deployment["spec"]["template"]["spec"]
        container = only_container(deployment)
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}

        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] != 0
        assert container["args"] == [role]
        live = container["livenessProbe"]["httpGet"]
        assert (live["path"], ports.get(live["port"], live["port"])) == (liveness, port)
        if readiness:
            ready = container["readinessProbe"]["httpGet"]
            assert (ready["path"], ports.get(ready["port"], ready["port"])) == (readiness, port)
        assert container["resources"]["requests"] and container["resources"]["limits"]
        refs = container["envFrom"]
        assert {r["configMapRef"]["name"] for r in refs if "configMapRef" in r} <= config_names
        assert {r["secretRef"]["name"] for r in refs if "secretRef" in r} <= secret_names
        annotations = deployment["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/port"] == str(scraped[name])
        assert scraped[name] in ports.values(), f"{name} does not declare its metrics port"
    assert k8s_object("Deployment", "fulfillment-ingress")["spec"]["replicas"] == 2


def test_the_ingress_serves_metrics_on_its_own_port_which_no_public_route_reaches() -> None:
    """/metrics is off the webhook port (IngressSettings.metrics_port): the pods are scraped
    there, and neither the Service, compose's host ports nor the image's port list for the
    public side carries it."""
    metrics_port = default_ingress_metrics_port()
    ingress = k8s_object("Deployment", "fulfillment-ingress")
    ports = {p["name"]: p["containerPort"] for p in only_container(ingress)["ports"]}
    service = k8s_object("Service", "fulfillment-ingress")
    config = k8s_object("ConfigMap", "fulfillment-config")["data"]

    assert ports == {"http": 8080, "metrics": metrics_port}
    assert config["INGRESS_METRICS_PORT"] == str(metrics_port)
    assert [p["targetPort"] for p in service["spec"]["ports"]] == ["http"]
    compose_ingress = compose_services()["ingress"]
    assert compose_ingress["environment"]["INGRESS_METRICS_PORT"] == str(metrics_port)
    assert all(not str(p).endswith(f":{metrics_port}") for p in compose_ingress["ports"])
    assert str(metrics_port) in compose_ingress["expose"]
    env = " ".join(args for keyword, args in dockerfile_instructions() if keyword == "ENV")
    assert f"INGRESS_METRICS_PORT={metrics_port}" in env
    assert f":{metrics_port}" in ALERTS.read_text() and f":{metrics_port}/metrics" in (
        RUNBOOK.read_text()
    )


def test_the_service_sends_port_80_to_the_ingress_pods_http_port() -> None:
    service = k8s_object("Service", "fulfillment-ingress")
    ingress = k8s_object("Deployment", "fulfillment-ingress")
    pod_labels = ingress["spec"]["template"]["metadata"]["labels"]
    (port,) = service["spec"]["ports"]
    container_ports = {p["name"]: p["containerPort"] for p in only_container(ingress)["ports"]}

    assert service["spec"]["type"] == "ClusterIP"
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert port["port"] == 80
    assert container_ports.get(port["targetPort"], port["targetPort"]) == 8080


def test_disruption_budgets_cover_the_ingress_and_the_worker_pods() -> None:
    budgets = [o for o in k8s_objects() if o["kind"] == "PodDisruptionBudget"]

    for name in ("fulfillment-ingress", "fulfillment-worker"):
        labels = k8s_object("Deployment", name)["spec"]["template"]["metadata"]["labels"]
        assert [
            b for b in budgets if b["spec"]["selector"]["matchLabels"].items() <= labels.items()
        ], f"no PodDisruptionBudget selects {name}"


def test_the_migrate_job_runs_fulfillment_migrate() -> None:
    job = k8s_object("Job", "fulfillment-migrate")
    (container,) = job["spec"]["template"]["spec"]["containers"]

    assert container["args"] == ["migrate"]
    assert job["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True


def test_the_reconcile_cronjob_runs_fulfillment_reconcile_one_run_at_a_time_as_non_root() -> None:
    cronjob = k8s_object("CronJob", "fulfillment-reconcile")
    job = cronjob["spec"]["jobTemplate"]["spec"]
    pod = job["template"]["spec"]
    (container,) = pod["containers"]
    config_names = {o["metadata"]["name"] for o in k8s_objects() if o["kind"] == "ConfigMap"}
    worker = only_container(k8s_object("Deployment", "fulfillment-worker"))

    assert container["args"][0] == "reconcile"
    assert cronjob["spec"]["concurrencyPolicy"] == "Forbid"  # one run pages Stripe at a time
    minutes = re.fullmatch(r"\*/(\d+) \* \* \* \*", cronjob["spec"]["schedule"])
    assert minutes, cronjob["spec"]["schedule"]
    # a stuck run is ended before the next one is due, rather than holding it off
    assert job["activeDeadlineSeconds"] < int(minutes.group(1)) * 60
    assert pod["restartPolicy"] in ("Never", "OnFailure")
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["resources"]["requests"] and container["resources"]["limits"]
    # the workers' own settings: the same broker names, database and Stripe key
    assert container["envFrom"] == worker["envFrom"]
    assert {r["configMapRef"]["name"] for r in container["envFrom"] if "configMapRef" in r} <= (
        config_names
    )
    assert container["image"] == worker["image"]


def test_kustomization_lists_every_manifest_but_the_example_secret() -> None:
    (kustomization,) = load_yaml_documents(K8S / "kustomization.yaml")
    manifests = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}

    assert set(kustomization["resources"]) == manifests - {"secret.example.yaml"}
    assert len(kustomization["resources"]) == len(set(kustomization["resources"]))


def test_the_example_secret_holds_only_placeholders() -> None:
    secret = k8s_object("Secret", "fulfillment-secrets")

    for key, value in secret["stringData"].items():
        assert "replace_me" in value, f"{key} looks like a real value"
    assert secret["stringData"]["STRIPE_WEBHOOK_SECRETS"].startswith("whsec_")
