"""The deployment files must match what the code serves and reads."""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
import tomllib
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from sidecar.app import create_admin_app, create_app
from sidecar.config import OPTIONS, load_settings

ROOT = Path(__file__).resolve().parents[2]
OPTION_ENV = {"SIDECAR_" + o.name.upper() for o in OPTIONS} | {"SIDECAR_CONFIG"}


def admin_paths() -> set[str]:
    settings = load_settings(env={}, flags={"upstream": "http://127.0.0.1:1", "admin_port": 9901})
    admin = create_admin_app(create_app(settings))
    return {r.resource.canonical for r in admin.router.routes() if r.resource is not None}


def mounted(docs: list[dict], pod: dict, container: dict, root: Path) -> dict[str, str]:
    """Where the container's secret volumes put their files, made real under
    ``root``: {path in the container: path here}. (Secret and projected
    volumes, from the Secrets of the same file.)"""
    secrets = {d["metadata"]["name"]: d["stringData"] for d in docs if d["kind"] == "Secret"}
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    files = {}
    for mount in container.get("volumeMounts", []):
        volume = volumes[mount["name"]]
        if "secret" in volume:
            sources = [{"secret": {"name": volume["secret"]["secretName"], **volume["secret"]}}]
        elif "projected" in volume:
            sources = volume["projected"]["sources"]
        else:
            continue
        assert mount.get("readOnly") is True, mount
        for source in sources:
            data = secrets[source["secret"]["name"]]
            for item in source["secret"]["items"]:
                here = root / mount["mountPath"].strip("/") / item["path"]
                here.parent.mkdir(parents=True, exist_ok=True)
                here.write_text(data[item["key"]] + "\n")  # as a kubectl-made file may end
                files[f"{mount['mountPath']}/{item['path']}"] = str(here)
    return files


def with_files(env: dict[str, str], files: dict[str, str]) -> dict[str, str]:
    """``env`` with every *_FILE variable naming a file that exists here."""
    out = {}
    for name, value in env.items():
        if name.endswith("_FILE"):
            assert value in files, f"{name}={value} is in no secret volume"
            value = files[value]
        out[name] = value
    return out


def kubernetes_docs() -> list[dict]:
    return list(yaml.safe_load_all((ROOT / "config/kubernetes.yaml").read_text()))


def kubernetes() -> dict:
    docs = list(yaml.safe_load_all((ROOT / "config/kubernetes.yaml").read_text()))
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    return deployment


def test_kubernetes_native_sidecar_probes_ports_and_env_match_the_code(tmp_path: Path) -> None:
    pod = kubernetes()["spec"]["template"]["spec"]
    (sidecar,) = pod["initContainers"]
    assert sidecar["restartPolicy"] == "Always"
    env = {e["name"]: e["value"] for e in sidecar["env"] if "value" in e}
    assert set(env) <= OPTION_ENV
    files = mounted(kubernetes_docs(), pod, sidecar, tmp_path)
    settings = load_settings(env=with_files(env, files))  # the values are valid, too
    ports = {p["name"]: p["containerPort"] for p in sidecar["ports"]}
    assert ports == {"http": settings.port, "admin": settings.admin_port}
    served = admin_paths()
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        get = sidecar[probe]["httpGet"]
        assert get["port"] == "admin" and get["path"] in served
    # Metrics and state are reachable on the pod's network only with a token
    # from a Secret; the probes need none.
    assert settings.admin_host == "0.0.0.0"
    # ... as a file: no secret in the environment, none on a command line.
    assert not [e for e in sidecar["env"] if "valueFrom" in e]
    secrets = {d["metadata"]["name"]: d for d in kubernetes_docs() if d["kind"] == "Secret"}
    assert settings.admin_token == secrets["sidecar-admin"]["stringData"]["token"]
    assert env["SIDECAR_ADMIN_TOKEN_FILE"].startswith("/run/secrets/")
    assert sidecar["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert sidecar["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert settings.upstream.startswith("http://127.0.0.1:")  # same pod: loopback
    # The store lives on the pod's emptyDir: it survives container restarts.
    (mount,) = [m for m in sidecar["volumeMounts"] if m["name"] == "sidecar-state"]
    assert settings.store == f"sqlite:{mount['mountPath']}/state.db"
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert "emptyDir" in volume


#: The main container's own stop, after its preStop: gptme's server exits at once.
MAIN_STOP_BUDGET = 5


def test_kubernetes_shutdown_order_and_timings_add_up(tmp_path: Path) -> None:
    pod = kubernetes()["spec"]["template"]["spec"]
    (sidecar,) = pod["initContainers"]
    (main,) = pod["containers"]
    env = {e["name"]: e["value"] for e in sidecar["env"] if "value" in e}
    settings = load_settings(
        env=with_files(env, mounted(kubernetes_docs(), pod, sidecar, tmp_path))
    )
    # Native sidecars get SIGTERM only after the main containers have
    # stopped: the main container is the one that waits for the endpoints.
    drain = main["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert drain >= 5
    assert "lifecycle" not in sidecar  # nothing to wait for: it stops last
    total = drain + MAIN_STOP_BUDGET + settings.shutdown_grace
    assert total < pod["terminationGracePeriodSeconds"]
    docs = list(yaml.safe_load_all((ROOT / "config/kubernetes.yaml").read_text()))
    (service,) = [d for d in docs if d["kind"] == "Service"]
    (port,) = service["spec"]["ports"]
    assert port["targetPort"] == settings.port  # a number: it resolves on every version


@pytest.mark.parametrize("version", ["1.30.0", "1.32.0", "1.35.0", "1.37.0"])
def test_kubernetes_manifest_is_valid_on_the_versions_it_names(version: str) -> None:
    for doc in yaml.safe_load_all((ROOT / "config/kubernetes.yaml").read_text()):
        kubernetes_validate.validate(doc, version, strict=True)
    text = (ROOT / "config/kubernetes.yaml").read_text()
    assert "Kubernetes 1.30 and newer" in text


def test_the_manifest_is_refused_where_it_would_not_work() -> None:
    # 1.28 has no preStop sleep: the validator does catch what this file needs.
    (deployment,) = [
        d
        for d in yaml.safe_load_all((ROOT / "config/kubernetes.yaml").read_text())
        if d["kind"] == "Deployment"
    ]
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, "1.28.0", strict=True)


def test_compose_env_is_valid_and_stop_grace_fits(tmp_path: Path) -> None:
    compose = yaml.safe_load((ROOT / "config/compose.yaml").read_text())
    sidecar = compose["services"]["sidecar"]
    env = {k: str(v) for k, v in sidecar["environment"].items()}
    assert set(env) <= OPTION_ENV
    # Compose mounts each secret at /run/secrets/<name>; here, from the
    # variable that a .env file or the shell sets.
    files = {}
    for name in sidecar["secrets"]:
        source = compose["secrets"][name]["environment"]
        here = tmp_path / name
        here.write_text("token-from-" + source)
        files[f"/run/secrets/{name}"] = str(here)
    settings = load_settings(env=with_files(env, files))
    assert settings.admin_token == "token-from-SIDECAR_ADMIN_TOKEN"
    assert int(sidecar["stop_grace_period"].rstrip("s")) > settings.shutdown_grace
    published = compose["services"]["gptme"]["ports"]
    assert any(p.endswith(f":{settings.port}") for p in published)


def test_dockerfile_env_healthcheck_and_ports_match_the_code() -> None:
    text = (ROOT / "Dockerfile").read_text()
    env = dict(re.findall(r"(SIDECAR_[A-Z_]+)=(\S+)", text))
    assert set(env) <= OPTION_ENV
    settings = load_settings(env={**env, "SIDECAR_UPSTREAM": "http://127.0.0.1:1"})
    health = re.search(r"HEALTHCHECK .*\n\s*CMD (\[.*\])", text)
    assert health is not None
    probe = " ".join(json.loads(health.group(1)))
    # It follows the admin port setting, with the image's own as the fallback.
    assert "os.environ.get('SIDECAR_ADMIN_PORT', '9901')" in probe
    assert settings.admin_port == 9901 and "/healthz" in probe and "/healthz" in admin_paths()
    assert f"EXPOSE {settings.port} {settings.admin_port}" in text
    assert "USER 10001" in text and 'ENTRYPOINT ["sidecar"]' in text
    assert settings.store == "sqlite:/var/lib/sidecar/state.db"
    assert "VOLUME /var/lib/sidecar" in text and "chown 10001:10001 /var/lib/sidecar" in text


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


async def test_the_container_health_check_follows_the_admin_port(start_sidecar) -> None:
    sc = await start_sidecar("http://127.0.0.1:9", admin_port=0)
    text = (ROOT / "Dockerfile").read_text()
    health = re.search(r"HEALTHCHECK .*\n\s*CMD (\[.*\])", text)
    assert health is not None
    argv = json.loads(health.group(1))
    assert argv[:2] == ["python", "-c"]
    env = {**os.environ, "SIDECAR_ADMIN_PORT": str(sc.server.admin_port)}
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", argv[2], env=env)
    assert await proc.wait() == 0
    env["SIDECAR_ADMIN_PORT"] = "9"  # nothing there: the check fails
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", argv[2], env=env, stderr=asyncio.subprocess.DEVNULL
    )
    assert await proc.wait() != 0


def gateway() -> list[dict]:
    return list(yaml.safe_load_all((ROOT / "config/kubernetes-gateway.yaml").read_text()))


def _named(docs: list[dict], kind: str, name: str) -> dict:
    (doc,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


@pytest.mark.parametrize("version", ["1.30.0", "1.32.0", "1.35.0", "1.37.0"])
def test_the_gateway_example_is_valid_on_the_versions_it_names(version: str) -> None:
    for doc in gateway():
        kubernetes_validate.validate(doc, version, strict=True)
    assert "Kubernetes 1.30 and newer" in (ROOT / "config/kubernetes-gateway.yaml").read_text()


def test_the_gateway_example_matches_the_code(tmp_path: Path) -> None:
    docs = gateway()
    deployment = _named(docs, "Deployment", "sidecar-gateway")
    assert deployment["spec"]["replicas"] >= 2
    pod = deployment["spec"]["template"]["spec"]
    (sidecar,) = pod["containers"]
    secrets = {d["metadata"]["name"]: d["stringData"] for d in docs if d["kind"] == "Secret"}

    def value(entry: dict) -> str:
        if "value" in entry:
            return re.sub(r"\$\((\w+)\)", lambda m: env_values[m.group(1)], entry["value"])
        ref = entry["valueFrom"]["secretKeyRef"]
        return secrets[ref["name"]][ref["key"]]

    env_values: dict[str, str] = {}
    for entry in sidecar["env"]:  # in order: $(NAME) names an earlier one
        env_values[entry["name"]] = value(entry)
    env = {k: v for k, v in env_values.items() if k.startswith("SIDECAR_")}
    assert set(env) <= OPTION_ENV
    # Every secret is a file: none in the environment.
    assert not [e for e in sidecar["env"] if "valueFrom" in e]
    settings = load_settings(env=with_files(env, mounted(docs, pod, sidecar, tmp_path)))
    assert settings.admin_token == secrets["sidecar-admin"]["token"]
    # The store is the Redis of this file, with its password; the upstream is
    # the gptme Service, watched with the replicas' own token.
    redis = _named(docs, "Service", "sidecar-redis")
    (redis_port,) = redis["spec"]["ports"]
    assert settings.store == f"redis://sidecar-redis:{redis_port['port']}/0"
    redis_pod = _named(docs, "Deployment", "sidecar-redis")["spec"]["template"]["spec"]
    (redis_container,) = redis_pod["containers"]
    assert "--requirepass" in redis_container["args"]
    assert settings.store_password == secrets["sidecar-redis"]["password"]
    assert settings.upstream_authorization == f"Bearer {secrets['gptme-server']['token']}"
    # Probes on the admin port, at paths it serves; ready while Redis is away.
    served = admin_paths()
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        get = sidecar[probe]["httpGet"]
        assert get["port"] == "admin" and get["path"] in served
    # A drain takes one replica at a time, and a rolling update none before its successor.
    pdb = _named(docs, "PodDisruptionBudget", "sidecar-gateway")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["spec"]["maxUnavailable"] < deployment["spec"]["replicas"]
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    service = _named(docs, "Service", "sidecar-gateway")
    assert service["spec"]["selector"].items() <= labels.items()
    (port,) = service["spec"]["ports"]
    assert port["targetPort"] == settings.port
    # The shutdown fits: endpoint drain, then the grace, within the pod's.
    drain = sidecar["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert drain + settings.shutdown_grace < pod["terminationGracePeriodSeconds"]
