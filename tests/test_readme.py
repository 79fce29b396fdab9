"""Every YAML, JSON and shell example in the README runs (issue #13), so the documentation
cannot drift from the code: YAML documents go through the real loader and validator, settings
through the real settings loader; the demo walk-through runs against `./scripts/demo`, the
fleet walk-through as written with its own redis-server, backends and two instances. Ports
and /tmp paths are substituted with free ports and the test's own directory; nothing else
is changed. The two blocks that cannot run here (docker, and the whole test suite) are
checked against what they name. Every block must be claimed by one handler below, so a new
example cannot slip in untested."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from flags.document import Document, load_document
from stores.settings import Settings, load_settings
from stores.yamlfile import load_yaml
from tests.harness import free_port, wait_until

pytestmark = pytest.mark.timeout(180)

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
TURNOUT_BIN = REPO / ".venv" / "bin"
DEFAULT_PORTS = ("6390", "8080", "8081", "8180", "8181", "9001", "9002")
FLEET_DIR = "/tmp/turnout-fleet"


@dataclass(frozen=True)
class Block:
    lang: str
    text: str
    line: int

    def __str__(self) -> str:
        return f"README.md:{self.line} ({self.lang})"


def blocks() -> list[Block]:
    found: list[Block] = []
    lines = README.read_text().splitlines()
    i = 0
    while i < len(lines):
        match = re.match(r"^```(\w*)\s*$", lines[i])
        if match is None:
            i += 1
            continue
        start = i
        i += 1
        body: list[str] = []
        while not lines[i].startswith("```"):
            body.append(lines[i])
            i += 1
        found.append(Block(match.group(1), "\n".join(body) + "\n", start + 1))
        i += 1
    return found


def of_lang(*langs: str) -> list[Block]:
    return [b for b in blocks() if b.lang in langs]


def substitute(text: str, ports: dict[str, int], tmp: Path) -> str:
    for default, port in ports.items():
        text = re.sub(rf"\b{default}\b", str(port), text)
    return text.replace(FLEET_DIR, str(tmp / "fleet")).replace(".venv/bin/", f"{TURNOUT_BIN}/")


# -- which handler owns which shell block -----------------------------------------------------


def is_quick_start(block: Block) -> bool:
    return block.text.strip().startswith("./scripts/demo")


def is_demo_walk(block: Block) -> bool:
    return "curl -s localhost:8080/ -H 'X-User-Id: alice'" in block.text


def is_fleet_walk(block: Block) -> bool:
    return "redis-server" in block.text and "fleet.yaml" in block.text


def is_docker(block: Block) -> bool:
    return block.text.strip().startswith("docker build")


def is_development(block: Block) -> bool:
    return block.text.strip().startswith("./scripts/test")


SHELL_HANDLERS = (is_quick_start, is_demo_walk, is_fleet_walk, is_docker, is_development)


def test_every_shell_block_has_exactly_one_handler() -> None:
    """Each `sh` block of the README is run or checked by one test here, none left over."""
    shell = of_lang("sh", "bash", "shell", "console")
    assert len(shell) == len(SHELL_HANDLERS)
    for block in shell:
        owners = [h.__name__ for h in SHELL_HANDLERS if h(block)]
        assert len(owners) == 1, f"{block}: {owners}"
    for block in blocks():
        assert block.lang in ("sh", "yaml", "json", ""), f"{block}: unhandled language"


# -- YAML and JSON ----------------------------------------------------------------------------

DOCUMENT_KEYS = frozenset(Document.model_fields)


@pytest.mark.parametrize("block", of_lang("yaml"), ids=str)
def test_yaml_examples_load_and_validate(block: Block, tmp_path: Path) -> None:
    """A document example is a valid document through the real loader and validator (`off`
    is the stage off); a settings example is valid settings through the real settings
    loader."""
    raw = load_yaml(block.text, str(block))
    assert isinstance(raw, dict) and raw
    if set(raw) <= DOCUMENT_KEYS:
        document = load_document(raw)
        assert document.stages.get("off") == 0
        assert document.routes
    else:
        path = tmp_path / "settings.yaml"
        path.write_text(block.text)
        settings = load_settings(str(path))
        assert isinstance(settings, Settings)
        for key, value in raw.items():
            assert getattr(settings, key) == value, key


@pytest.mark.parametrize("block", of_lang("json"), ids=str)
def test_json_examples_are_access_log_lines(block: Block) -> None:
    """The access log line shown is JSON with exactly the fields the access log writes."""
    from edge.accesslog import AccessLog

    class Target:
        log_label = ("web", "stable")

    class Pool:
        label = "10.0.0.5:8000"

    import io

    sink = io.BytesIO()
    log = AccessLog(sink)
    log.record("GET", b"h", b"/", 200, 1, 0.001, Target(), Pool(), "u")  # type: ignore[arg-type]
    log.flush()
    assert set(json.loads(block.text)) == set(json.loads(sink.getvalue()))


# -- the demo -----------------------------------------------------------------------------------


def test_quick_start_and_demo_walk_through(tmp_path: Path) -> None:
    """`./scripts/demo` (with the README's port flags) starts; every line of the demo
    walk-through then runs from the repository root and exits 0, with the effects the
    comments promise."""
    (quick,) = [b for b in of_lang("sh") if is_quick_start(b)]
    (walk,) = [b for b in of_lang("sh") if is_demo_walk(b)]
    ports = {"8080": free_port(), "8081": free_port()}
    run_line, test_line = quick.text.strip().splitlines()
    command = run_line.split("#")[0].split()
    assert command == ["./scripts/demo"]
    # The second of the two newcomer commands runs this very suite (not run from inside it).
    assert test_line.split("#")[0].split() == ["./scripts/test"]
    assert os.access(REPO / "scripts" / "test", os.X_OK)
    env = {
        **os.environ,
        "TURNOUT_STATE_DIR": str(tmp_path / "state"),
        "TURNOUT_ADMIN_URL": f"http://127.0.0.1:{ports['8081']}",  # as the README says
    }
    env.pop("TURNOUT_ADMIN_TOKEN", None)
    env.pop("TURNOUT_CONFIG", None)
    demo = subprocess.Popen(
        [*command, "--edge-port", str(ports["8080"]), "--admin-port", str(ports["8081"])],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:

        def ready() -> bool:
            try:
                return httpx.get(f"{env['TURNOUT_ADMIN_URL']}/readyz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return demo.poll() is not None

        assert wait_until(ready, 60) and demo.poll() is None, "the demo did not start"
        outputs: list[str] = []
        for line in walk.text.splitlines():
            if not line.strip():
                continue
            result = subprocess.run(
                ["bash", "-o", "pipefail", "-c", substitute(line, ports, tmp_path)],
                cwd=REPO,
                env=env,
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )
            assert result.returncode == 0, f"{line}\n{result.stdout}{result.stderr}"
            outputs.append(result.stdout)
    finally:
        os.killpg(demo.pid, signal.SIGINT)
        try:
            log, _ = demo.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(demo.pid, signal.SIGKILL)
            log, _ = demo.communicate()
    assert '"version":"canary"' in outputs[0]  # alice: internal list
    assert "set-cookie: turnout_uid=" in outputs[2].lower()
    assert "40 % of its units change arm" in outputs[4]
    assert "version 5: restore content of version 3" in outputs[-1]
    assert "config version 2 applied" in log  # the demo shows config changes ...
    assert "ok release.stage web by" in log  # ... and audit lines


# -- the fleet ----------------------------------------------------------------------------------


def test_fleet_walk_through_runs_as_written(tmp_path: Path) -> None:
    """The fleet walk-through, run whole as written (its own redis-server, two backends, two
    instances): instance 2 answers from the canary, then from stable after the rollback made
    through instance 1; everything it started is stopped by its last line."""
    for tool in ("redis-server", "curl", "python3"):
        assert shutil.which(tool), f"the fleet walk-through needs {tool}"
    (walk,) = [b for b in of_lang("sh") if is_fleet_walk(b)]
    ports = {port: free_port() for port in DEFAULT_PORTS}
    script = substitute(walk.text, ports, tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TURNOUT_")}
    proc = subprocess.Popen(
        ["bash", "-e", "-c", script],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=120)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # anything the script's last line missed
        except ProcessLookupError:
            pass
    assert proc.returncode == 0, f"{out}\n{err}"
    answers = [line for line in out.splitlines() if line.startswith("hello from")]
    assert answers == ["hello from canary", "hello from stable"], out
    assert "version 2: web: rollback from ga (fleet drill)" in out


# -- what cannot run here -----------------------------------------------------------------------


def test_docker_example_matches_the_dockerfile() -> None:
    """No Docker engine here: the build/run example is valid shell, publishes the ports the
    image exposes, mounts its VOLUME and the seed file where the settings expect it, and
    every variable it sets is a real setting (tests/test_container.py runs the image's
    entrypoint itself)."""
    (block,) = [b for b in of_lang("sh") if is_docker(b)]
    subprocess.run(["bash", "-n", "-c", block.text], check=True)
    dockerfile = (REPO / "Dockerfile").read_text()
    exposed = re.search(r"^EXPOSE (.+)$", dockerfile, re.M)
    assert exposed is not None
    for port in exposed.group(1).split():
        assert f"-p {port}:{port}" in block.text
    volume = re.search(r'^VOLUME \["(.+)"\]$', dockerfile, re.M)
    assert volume is not None and f":{volume.group(1)}" in block.text
    settings = load_yaml((REPO / "examples" / "settings.yaml").read_text())
    assert f":{settings['seed_file']}:ro" in block.text
    for variable in re.findall(r"-e (TURNOUT_\w+)=", block.text):
        assert variable.removeprefix("TURNOUT_").lower() in Settings.model_fields


def test_development_commands_exist() -> None:
    """The development commands are valid shell naming scripts and files that exist (running
    the whole suite from inside the suite would recurse)."""
    (block,) = [b for b in of_lang("sh") if is_development(b)]
    subprocess.run(["bash", "-n", "-c", block.text], check=True)
    for script in re.findall(r"\./scripts/(\w+)", block.text):
        path = REPO / "scripts" / script
        assert path.is_file() and os.access(path, os.X_OK), script
    for test_file in re.findall(r"(tests/\w+\.py)", block.text):
        assert (REPO / test_file).is_file(), test_file
