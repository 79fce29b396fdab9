"""The container image without a Docker engine (issue #13): the Dockerfile is read, the same
wheel is built, and the image's entrypoint command runs from a fresh venv with the image's
environment, its example settings and seed file, then answers /readyz (through the image's
own HEALTHCHECK command) and proxies a request to real backends.

What differs from a real container, and why: the listeners bind 127.0.0.1 instead of the
image's 0.0.0.0 (tests listen on loopback only), on free ports instead of 8080/8081; the
image's paths (/etc/turnout, /var/lib/turnout) are mapped into a temporary directory; the
fresh venv borrows the dev venv's third-party packages through a .pth file instead of
downloading them again (Turnout itself comes only from the wheel, which the test checks).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import site
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.harness import LOOPBACK, backends, free_port

pytestmark = pytest.mark.timeout(240)

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile"
PACKAGES = ("flags", "stores", "edge", "admin", "turnout")
START_TIMEOUT_S = 30.0


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the final stage, continuation lines joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    stages: list[list[tuple[str, str]]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        if word.upper() == "FROM":
            stages.append([])
        stages[-1].append((word.upper(), rest.strip()))
    return stages[-1]


def image_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for word, rest in dockerfile_instructions():
        if word == "ENV":
            for pair in shlex.split(rest):
                key, _, value = pair.partition("=")
                env[key] = value
    return env


def exec_form(word: str) -> list[str]:
    """The exec-form (JSON array) command of ENTRYPOINT, CMD or HEALTHCHECK's CMD."""
    rest = next(rest for w, rest in dockerfile_instructions() if w == word)
    if word == "HEALTHCHECK":
        rest = rest[rest.index("CMD ") + 4 :]
    value = json.loads(rest)
    assert isinstance(value, list)
    return [str(part) for part in value]


def test_dockerfile_declares_what_operators_need() -> None:
    """Every package is copied into the build; the state directory is a VOLUME; the admin
    host is settable by environment; the health check asks /readyz; the examples ship."""
    instructions = DOCKERFILE.read_text()
    for package in PACKAGES:
        assert f"COPY {package} ./{package}" in instructions, package
    env = image_env()
    words = dict(dockerfile_instructions())
    assert env["TURNOUT_STATE_DIR"] in words["VOLUME"]
    assert env["TURNOUT_ADMIN_HOST"] == "0.0.0.0"
    assert "/readyz" in " ".join(exec_form("HEALTHCHECK"))
    assert any(
        w == "COPY" and "examples/settings.yaml examples/routing.yaml /etc/turnout/" in rest
        for w, rest in dockerfile_instructions()
    )
    assert env["TURNOUT_CONFIG"] == "/etc/turnout/settings.yaml"
    assert (REPO / "LICENSE").read_text().lstrip().startswith("Apache License")


@pytest.fixture(scope="module")
def fresh_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A new venv with the wheel `pip wheel .` builds, as the image's build stage does."""
    root = tmp_path_factory.mktemp("image")
    wheels = root / "wheels"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "-w",
            str(wheels),
            str(REPO),
        ],
        check=True,
        timeout=180,
        capture_output=True,
    )
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=60)
    # Third-party dependencies from the dev venv (no second download); not Turnout itself.
    purelib = next(venv.glob("lib/python*/site-packages"))
    (purelib / "dev-deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    wheel = next(wheels.glob("turnout-*.whl"))
    subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--no-deps", str(wheel)],
        check=True,
        timeout=120,
        capture_output=True,
    )
    return venv


def _image_layout(root: Path, stable: str, canary: str) -> dict[str, str]:
    """/etc/turnout with the shipped examples (backends pointed at the test's), the volume
    directory, and the image's environment mapped onto them."""
    etc = root / "etc-turnout"
    etc.mkdir()
    state = root / "var-lib-turnout"
    state.mkdir()
    routing = (REPO / "examples" / "routing.yaml").read_text()
    routing = routing.replace("http://stable.internal:8000", stable)
    routing = routing.replace("http://canary.internal:8000", canary)
    (etc / "routing.yaml").write_text(routing)
    settings = (REPO / "examples" / "settings.yaml").read_text()
    (etc / "settings.yaml").write_text(settings.replace("/etc/turnout", str(etc)))
    env = {
        key: value.replace("/etc/turnout", str(etc)).replace("/var/lib/turnout", str(state))
        for key, value in image_env().items()
    }
    return env


def _run_entrypoint(venv: Path, cwd: Path, env: dict[str, str]) -> subprocess.Popen[str]:
    argv = exec_form("ENTRYPOINT") + exec_form("CMD")
    argv[0] = str(venv / "bin" / argv[0])
    base = {"PATH": f"{venv / 'bin'}:{os.environ.get('PATH', '')}", "HOME": str(cwd)}
    return subprocess.Popen(
        argv,
        cwd=cwd,
        env={**base, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_wheel_has_every_package(fresh_venv: Path, tmp_path: Path) -> None:
    """Turnout in the fresh venv is the wheel's, with every package (stores/ included)."""
    code = "import flags, stores, edge, admin, turnout; print(stores.__file__)"
    out = subprocess.run(
        [str(fresh_venv / "bin" / "python"), "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert str(fresh_venv) in out


def test_entrypoint_without_a_token_names_the_variable(fresh_venv: Path, tmp_path: Path) -> None:
    """With the image's environment (admin on 0.0.0.0) and no TURNOUT_ADMIN_TOKEN, the
    entrypoint stops with one line saying what to set."""
    env = _image_layout(tmp_path, "http://127.0.0.1:1", "http://127.0.0.1:2")
    env.update(TURNOUT_EDGE_PORT=str(free_port()), TURNOUT_ADMIN_PORT=str(free_port()))
    proc = _run_entrypoint(fresh_venv, tmp_path, env)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2, err
    assert "TURNOUT_ADMIN_TOKEN" in err
    assert "Traceback" not in err


def test_entrypoint_serves_ready_and_proxies(fresh_venv: Path, tmp_path: Path) -> None:
    """The image's entrypoint with its settings and seed file: the HEALTHCHECK command says
    healthy once ready, a request is proxied to the seeded release, and the version history
    lands in the VOLUME directory."""
    with backends("stable", "canary") as servers:
        env = _image_layout(tmp_path, servers["stable"].url, servers["canary"].url)
        edge_port, admin_port = free_port(), free_port()
        env.update(
            TURNOUT_EDGE_HOST=LOOPBACK,
            TURNOUT_ADMIN_HOST=LOOPBACK,
            TURNOUT_EDGE_PORT=str(edge_port),
            TURNOUT_ADMIN_PORT=str(admin_port),
            TURNOUT_ADMIN_TOKEN="container-test-token",
        )
        proc = _run_entrypoint(fresh_venv, tmp_path, env)
        try:
            health = exec_form("HEALTHCHECK")
            health[0] = str(fresh_venv / "bin" / health[0])
            health = [part.replace(":8081/", f":{admin_port}/") for part in health]
            deadline = time.monotonic() + START_TIMEOUT_S
            healthy = False
            while time.monotonic() < deadline and proc.poll() is None:
                check = subprocess.run(health, capture_output=True, timeout=10, check=False)
                if check.returncode == 0:
                    healthy = True
                    break
                time.sleep(0.2)
            assert healthy, proc.stderr.read() if proc.poll() is not None else "not ready"
            response = httpx.get(
                f"http://{LOOPBACK}:{edge_port}/x", headers={"X-User-Id": "alice"}, timeout=10
            )
            assert response.status_code == 200
            assert response.json()["backend"] == "canary"  # alice is on the internal list
            assert list((Path(env["TURNOUT_STATE_DIR"]) / "store").rglob("*")), "no store files"
        finally:
            proc.terminate()
            try:
                proc.communicate(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
    shutil.rmtree(tmp_path / "var-lib-turnout", ignore_errors=True)
