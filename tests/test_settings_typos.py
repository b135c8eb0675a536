"""A misspelt setting is named, with the setting it was probably meant to be.

The list of settings (shared/setting_names.py) is checked against docs/settings.md and
against every name the code reads, so that neither a new setting nor a removed one leaves
it behind.
"""

from __future__ import annotations

import ast
import os
import re
from pathlib import Path

from shared.setting_names import FOREIGN, PREFIXES, SETTINGS, unknown_settings
from tests.processes import run_fulfillment

ROOT = Path(__file__).resolve().parent.parent
# the packages whose code runs in a `fulfillment` command (devkit: the demo, up's stand-ins)
PACKAGES = ("shared", "ingress", "worker", "fulfillment", "devkit")
_NAME = re.compile(r"[A-Z][A-Z0-9_]*\Z")
_READERS = {"env_str", "env_int", "env_float", "env_port", "env_list", "env_url", "env_bool",
            "_delays", "_raw"}  # fmt: skip


def _is_env(node: ast.AST) -> bool:
    return ast.unparse(node).split(".")[-1] in ("env", "environ")


def names_the_code_reads() -> dict[str, set[str]]:
    """Every variable name read from (or written for the children into) an environment:
    ``env_*(env, "NAME", …)``, ``env.get("NAME")``, ``env["NAME"]``, ``"NAME" in env``."""
    found: dict[str, set[str]] = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                candidates: list[ast.AST] = []
                if isinstance(node, ast.Call):
                    func = node.func
                    name = getattr(func, "id", None) or getattr(func, "attr", "")
                    if name in _READERS and len(node.args) > 1:
                        candidates.append(node.args[1])
                    elif (
                        isinstance(func, ast.Attribute)
                        and func.attr in ("get", "setdefault", "pop")
                        and _is_env(func.value)
                        and node.args
                    ):
                        candidates.append(node.args[0])
                    elif ast.unparse(func) == "os.getenv" and node.args:
                        candidates.append(node.args[0])
                elif isinstance(node, ast.Subscript) and _is_env(node.value):
                    candidates.append(node.slice)
                elif (
                    isinstance(node, ast.Compare)
                    and isinstance(node.ops[0], ast.In | ast.NotIn)
                    and _is_env(node.comparators[0])
                ):
                    candidates.append(node.left)
                for candidate in candidates:
                    if isinstance(candidate, ast.Constant) and _NAME.match(str(candidate.value)):
                        found.setdefault(candidate.value, set()).add(str(path.relative_to(ROOT)))
    return found


def names_the_reference_lists() -> set[str]:
    reference = (ROOT / "docs" / "settings.md").read_text()
    table = reference.split("## Reference", 1)[1].split("\n## ", 1)[0]
    names: set[str] = set()
    for cell in re.findall(r"^\| ((?:`[A-Z_]+`(?: / )?)+) \|", table, re.M):
        names.update(re.findall(r"`([A-Z_]+)`", cell))
    return names


def test_the_list_of_settings_is_the_reference_table_and_what_the_code_reads() -> None:
    read = names_the_code_reads()
    assert len(read) >= 30  # the scan finds the settings (else the next lines prove nothing)

    assert set(SETTINGS) == names_the_reference_lists()
    assert {name: paths for name, paths in read.items() if name not in SETTINGS} == {}
    assert set(SETTINGS) - set(read) == set()
    assert len(SETTINGS) == len(set(SETTINGS))


def test_every_setting_but_the_conventions_has_one_of_the_watched_prefixes() -> None:
    # a new family of settings needs its prefix watched too, or its typos go unseen
    assert [name for name in SETTINGS if not name.startswith(PREFIXES)] == ["NO_COLOR"]


def test_names_close_to_a_setting_get_a_did_you_mean() -> None:
    notes = unknown_settings(
        {"WORKER_CONCURENCY": "64", "RABBIT_URL": "amqp://x", "log_level": "debug"}
    )

    assert notes == [
        "RABBIT_URL is not a setting; did you mean RABBITMQ_URL?",
        "WORKER_CONCURENCY is not a setting; did you mean WORKER_CONCURRENCY?",
        "log_level is not a setting; did you mean LOG_LEVEL?",
    ]


def test_names_from_stripes_samples_and_other_projects_are_named_with_ours() -> None:
    notes = unknown_settings(
        {"STRIPE_WEBHOOK_SECRET": "whsec_x", "STRIPE_SECRET_KEY": "sk_x", "SMTP_HOST": "mail"}
    )

    assert notes[0].startswith("SMTP_HOST is not a setting; did you mean SMTP_URL?")
    assert notes[1] == "STRIPE_SECRET_KEY is not a setting; did you mean STRIPE_API_KEY?"
    assert notes[2].startswith(
        "STRIPE_WEBHOOK_SECRET is not a setting; did you mean STRIPE_WEBHOOK_SECRETS (plural"
    )


def test_an_unknown_name_with_one_of_our_prefixes_is_named_even_when_nothing_is_close() -> None:
    assert unknown_settings({"CHECKOUT_SUCCESS_PAGE": "/thanks"}) == [
        "CHECKOUT_SUCCESS_PAGE is not a setting of ours (docs/settings.md lists them all)"
    ]


def test_settings_other_programs_and_the_shell_use_are_left_alone() -> None:
    shell = "PATH HOME USER SHELL LANG PWD TERM CI MAIL LOGNAME PGHOST PGUSER NO_PROXY HOSTNAME"
    env = {name: "x" for name in [*shell.split(), *FOREIGN, *SETTINGS]}

    assert unknown_settings(env) == []
    assert unknown_settings(dict(os.environ)) == []  # this machine's, and CI's


def test_a_command_warns_once_about_each_misspelt_setting_before_it_runs() -> None:
    env = {
        **os.environ,
        "WORKER_CONCURENCY": "64",
        "STRIPE_WEBHOOK_SECRET": "whsec_" + "a" * 32,
    }
    env.pop("STRIPE_WEBHOOK_SECRETS", None)

    result = run_fulfillment("ingress", env=env, timeout_s=30)

    lines = result.stderr.splitlines()
    assert result.returncode == 2
    assert lines[:2] == [
        "fulfillment ingress: warning: STRIPE_WEBHOOK_SECRET is not a setting; did you mean "
        "STRIPE_WEBHOOK_SECRETS (plural: one or more whsec_… secrets, comma-separated)?",
        "fulfillment ingress: warning: WORKER_CONCURENCY is not a setting; did you mean "
        "WORKER_CONCURRENCY?",
    ]
    assert lines[2].startswith("fulfillment ingress: STRIPE_WEBHOOK_SECRETS is not set")
    assert len(lines) == 3
    assert "a" * 32 not in result.stderr  # a value is never echoed


def test_what_the_deployment_assets_set_or_read_is_a_setting_or_known_to_be_compose_s() -> None:
    import yaml

    configmap = yaml.safe_load((ROOT / "ops" / "k8s" / "configmap.yaml").read_text())
    compose_text = (ROOT / "compose.yaml").read_text()
    compose = yaml.safe_load(compose_text)
    set_for_ours = {
        *configmap["data"],
        *compose["x-app"]["environment"],
        *compose["services"]["ingress"]["environment"],
        *compose["services"]["worker"]["environment"],
    }
    read_by_compose = set(re.findall(r"\$\{([A-Z_]+)", compose_text))

    assert set_for_ours <= set(SETTINGS)
    assert unknown_settings(dict.fromkeys(set_for_ours | read_by_compose, "x")) == []
