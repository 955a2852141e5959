"""The deployment files must match what the code serves and reads."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml

from sidecar.app import create_admin_app, create_app
from sidecar.config import OPTIONS, load_settings

ROOT = Path(__file__).resolve().parent.parent
OPTION_ENV = {"SIDECAR_" + o.name.upper() for o in OPTIONS} | {"SIDECAR_CONFIG"}


def admin_paths() -> set[str]:
    settings = load_settings(env={}, flags={"upstream": "http://127.0.0.1:1", "admin_port": 9901})
    admin = create_admin_app(create_app(settings))
    return {r.resource.canonical for r in admin.router.routes() if r.resource is not None}


def kubernetes() -> dict:
    docs = list(yaml.safe_load_all((ROOT / "config/kubernetes.yaml").read_text()))
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    return deployment


def test_kubernetes_native_sidecar_probes_ports_and_env_match_the_code() -> None:
    pod = kubernetes()["spec"]["template"]["spec"]
    (sidecar,) = pod["initContainers"]
    assert sidecar["restartPolicy"] == "Always"
    env = {e["name"]: e["value"] for e in sidecar["env"] if "value" in e}
    assert set(env) <= OPTION_ENV
    settings = load_settings(env=env)  # the values are valid, too
    ports = {p["name"]: p["containerPort"] for p in sidecar["ports"]}
    assert ports == {"http": settings.port, "admin": settings.admin_port}
    served = admin_paths()
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        get = sidecar[probe]["httpGet"]
        assert get["port"] == "admin" and get["path"] in served
    # Metrics and state are reachable on the pod's network only with a token
    # from a Secret; the probes need none.
    assert settings.admin_host == "0.0.0.0"
    (token,) = [e for e in sidecar["env"] if e["name"] == "SIDECAR_ADMIN_TOKEN"]
    assert token["valueFrom"]["secretKeyRef"]["name"] == "sidecar-admin"
    assert sidecar["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert sidecar["readinessProbe"]["httpGet"]["path"] == "/readyz"
    pause = sidecar["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pause + settings.shutdown_grace < pod["terminationGracePeriodSeconds"]
    assert settings.upstream.startswith("http://127.0.0.1:")  # same pod: loopback


def test_compose_env_is_valid_and_stop_grace_fits() -> None:
    compose = yaml.safe_load((ROOT / "config/compose.yaml").read_text())
    sidecar = compose["services"]["sidecar"]
    env = {k: str(v) for k, v in sidecar["environment"].items()}
    assert set(env) <= OPTION_ENV
    settings = load_settings(env=env)
    assert int(sidecar["stop_grace_period"].rstrip("s")) > settings.shutdown_grace
    published = compose["services"]["gptme"]["ports"]
    assert any(p.endswith(f":{settings.port}") for p in published)


def test_dockerfile_env_healthcheck_and_ports_match_the_code() -> None:
    text = (ROOT / "Dockerfile").read_text()
    env = dict(re.findall(r"(SIDECAR_[A-Z_]+)=(\S+)", text))
    assert set(env) <= OPTION_ENV
    settings = load_settings(env={**env, "SIDECAR_UPSTREAM": "http://127.0.0.1:1"})
    health = re.search(r"http://127\.0\.0\.1:(\d+)(/\w+)", text)
    assert health is not None
    assert int(health.group(1)) == settings.admin_port and health.group(2) in admin_paths()
    assert f"EXPOSE {settings.port} {settings.admin_port}" in text
    assert "USER 10001" in text and 'ENTRYPOINT ["sidecar"]' in text


def test_the_example_config_file_loads(tmp_path: Path) -> None:
    settings = load_settings(config_file=str(ROOT / "config/sidecar.example.toml"), env={})
    assert settings.admin_port == 9901


def test_the_lock_file_pins_every_runtime_dependency() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = project["dependencies"] + project["optional-dependencies"]["brotli"]
    wanted += project["optional-dependencies"]["fast"]
    lock = (ROOT / "requirements.lock").read_text().lower().replace("_", "-")
    for requirement in wanted:
        name = re.split(r"[<>=\[ ]", requirement)[0].lower().replace("_", "-")
        assert re.search(rf"^{re.escape(name)}==\S+$", lock, re.M), name
