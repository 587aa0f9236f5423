"""deploy/compose.yaml, deploy/Dockerfile, the Kubernetes manifests and the systemd units agree.

Docker does not run on the CI machine, so this checks what can be checked without it: the YAML
parses (with compose's merge keys), compose builds one image from deploy/Dockerfile and never
installs at start or mounts the source, the setup is waited for until it completes, and every
deployment runs the same entry point (``cadenza <command>``) with the same per-service user. The
Dockerfile's install step is checked structurally (it copies every package ``pyproject.toml``
ships and installs that copy, not an editable tree); a real ``pip install`` in a clean venv is not
run here, it takes minutes.
"""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).parent.parent
DEPLOY = ROOT / "deploy"
SERVICES = ("broker", "recorder", "worker")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    doc = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    assert isinstance(doc, dict)
    return doc


@pytest.fixture(scope="module")
def k8s() -> dict[str, dict[str, Any]]:
    """Container specs by container name."""
    out = {}
    for doc in yaml.safe_load_all((DEPLOY / "k8s" / "cadenza.yaml").read_text()):
        if doc and doc.get("kind") in ("Deployment", "StatefulSet", "Job"):
            for container in doc["spec"]["template"]["spec"]["containers"]:
                out[container["name"]] = container
    return out


def _env(spec: dict[str, Any]) -> dict[str, str]:
    env = spec.get("environment", {})
    if isinstance(env, list):
        return dict(e.partition("=")[::2] for e in env)
    return {k: str(v) for k, v in env.items()}


def test_compose_builds_one_image_and_installs_nothing_at_start(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) >= {"nats", "setup", *SERVICES}
    images = set()
    for name in ("setup", *SERVICES):
        spec = services[name]
        build = spec["build"]
        assert (DEPLOY / build["context"] / build["dockerfile"]).resolve() == (DEPLOY / "Dockerfile").resolve()
        images.add(spec["image"])
        command = " ".join(spec["command"])
        assert "pip" not in command and "sh -c" not in command, f"{name} installs at start: {command}"
        for volume in spec.get("volumes", []):
            assert not str(volume).startswith(".."), f"{name} mounts the source tree: {volume}"
    assert len(images) == 1, images


def test_compose_waits_for_the_setup_to_complete(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert services["setup"]["command"] == ["setup"]
    assert "nats" in services["setup"]["depends_on"]
    for name in SERVICES:
        assert services[name]["depends_on"] == {"setup": {"condition": "service_completed_successfully"}}


def test_the_dockerfile_installs_the_package_at_build_time() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    lines = [ln.strip() for ln in re.sub(r"\\\n", " ", text).splitlines() if ln.strip() and not ln.startswith("#")]
    copied = {shlex.split(ln)[-1].removeprefix("./").rstrip("/") or "." for ln in lines if ln.startswith("COPY")}
    copied |= {p for ln in lines if ln.startswith("COPY") for p in shlex.split(ln)[1:-1]}
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    for pattern in project["tool"]["setuptools"]["packages"]["find"]["include"]:
        assert pattern.rstrip("*") in copied, f"package {pattern} is not copied into the image"
    assert "pyproject.toml" in copied and project["project"]["readme"] in copied
    runs = " ".join(ln for ln in lines if ln.startswith("RUN"))
    assert re.search(r"pip install (--no-cache-dir )?/src", runs), runs
    assert " -e " not in runs, "an editable install needs the source at run time"
    assert 'ENTRYPOINT ["cadenza"]' in lines
    assert "cadenza" in project["project"]["scripts"]
    ignore = (ROOT / ".dockerignore").read_text()
    assert "!pyproject.toml" in ignore and "!services/" in ignore


def test_every_deployment_runs_the_same_entry_point_as_the_same_user(
    compose: dict[str, Any], k8s: dict[str, dict[str, Any]]
) -> None:
    services = compose["services"]
    for name in ("broker", "recorder"):
        assert k8s[name]["args"] == services[name]["command"] == [name]
        assert "command" not in k8s[name], "k8s must keep the image's entry point (cadenza)"
        k_env = {e["name"]: e.get("value") for e in k8s[name]["env"]}
        c_env = _env(services[name])
        assert k_env["NATS_USER"] == c_env["NATS_USER"] == name
        assert set(k_env) >= set(c_env) - {"NATS_PASSWORD"}
        assert "NATS_PASSWORD" in k_env
    for unit, command in (("cadenza-broker.service", "broker"), ("cadenza-recorder.service", "recorder"),
                          ("cadenza-worker@.service", "worker")):  # fmt: skip
        text = (DEPLOY / "systemd" / unit).read_text()
        exec_start = next(ln for ln in text.splitlines() if ln.startswith("ExecStart="))
        argv = shlex.split(exec_start.removeprefix("ExecStart="))
        assert Path(argv[0]).name == "cadenza" and argv[1] == command, exec_start
    assert services["worker"]["command"][0] == "worker"
    assert "CADENZA_TOKEN_KEY" not in _env(services["worker"]), "workers never hold the token key"
