"""The deployment artefacts, checked without a container engine or a cluster.

* Dockerfile: parsed; the builder stage's steps are run for real in a fresh
  venv (same COPY sources, filtered by .dockerignore; same RUN commands with
  /opt/venv and /src mapped into a temp dir), which must hold exactly the
  versions requirements.lock pins; the runtime stage's CMD is then
  started from that venv with the runtime stage's ENV, its HEALTHCHECK command
  is run against it, and SIGTERM is sent while a request is in flight.
* the Markdown documents: every link stays inside the repository and
  resolves; none gives another exit status after SIGTERM than the one measured.
* docker-compose.yml: structure (services, ports, healthchecks, depends_on
  conditions, the Redis notification flags after Compose interpolation), and
  the inline gateway server block is run through `nginx -t` with the repo's
  gateway file.
* deploy/kubernetes/*.yaml: every document parsed; probes, ports, selectors,
  security context, HPA/PDB consistency; probe paths are served by the real app.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from prometheus_client.parser import text_string_to_metric_families
from starlette.routing import Route

from session_sidecar.app import create_app
from session_sidecar.demo import DEMO_USER
from session_sidecar.embedded import NOTIFY_FLAGS, EmbeddedRedis, free_port
from session_sidecar.settings import Settings
from tests.dockerfile import Stage, apply_env, build_context, exec_form, healthcheck_command, parse_dockerfile

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO / "Dockerfile"
LOCK = REPO / "requirements.lock"
REGENERATE_LOCK = "uv pip compile pyproject.toml --universal --python-version 3.11 -o requirements.lock"
COMPOSE = REPO / "docker-compose.yml"
K8S = REPO / "deploy" / "kubernetes"
GATEWAY_CONF = REPO / "deploy" / "nginx" / "sidecar-gateway.conf"
SIDECAR_ROUTE = re.compile(r"/api/v1/conversations/[A-Za-z0-9._-]+/(active-session|task-status)")

# --- the Dockerfile and its build context, as tests/dockerfile.py reads them ----------------------


@pytest.fixture(scope="module")
def dockerfile() -> list[Stage]:
    _, stages = parse_dockerfile(DOCKERFILE.read_text())
    return stages


def test_build_context_is_the_package_sources_only() -> None:
    context = build_context(REPO)
    top = ("pyproject.toml", "README.md", "requirements.lock")
    assert set(top) <= set(context)
    assert "session_sidecar/app.py" in context
    for rel in context:
        assert rel in top or rel.startswith("session_sidecar/"), rel
        assert "__pycache__" not in rel and not rel.endswith(".pyc"), rel


# --- requirements.lock: the versions the image installs -------------------------------------------


def lock_pins() -> dict[str, Requirement]:
    """requirements.lock by normalised name; every entry pins one version (`name==1.2.3 ; marker`)."""
    pins: dict[str, Requirement] = {}
    for line in LOCK.read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        pin = Requirement(line)
        assert [spec.operator for spec in pin.specifier] == ["=="], f"not a pin: {line}"
        pins[canonicalize_name(pin.name)] = pin
    return pins


def test_the_image_installs_from_a_lock_that_pins_every_dependency(dockerfile: list[Stage]) -> None:
    builder = dockerfile[0]
    copied = [source for copy in builder.all("COPY") for source in copy.args.split()[:-1]]
    assert "requirements.lock" in copied
    (install,) = [run.args for run in builder.all("RUN") if "pip install" in run.args]
    assert re.search(r"\s-c requirements\.lock\s", install), install
    pins = lock_pins()
    for dependency in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]:
        wanted = Requirement(dependency)
        pin = pins.get(canonicalize_name(wanted.name))
        assert pin is not None, f"{wanted.name} is not in requirements.lock; regenerate it: {REGENERATE_LOCK}"
        (version,) = [spec.version for spec in pin.specifier]
        assert wanted.specifier.contains(version), (
            f"requirements.lock pins {pin} outside {dependency}; regenerate it: {REGENERATE_LOCK}"
        )


# --- Dockerfile: structure ------------------------------------------------------------------------


def test_dockerfile_is_multi_stage_on_slim_python(dockerfile: list[Stage]) -> None:
    assert len(dockerfile) >= 2
    builder, runtime = dockerfile[0], dockerfile[-1]
    assert builder.name == "builder"
    assert runtime.base == "python:3.11-slim"
    # The venv's interpreter is a symlink into the base image: both stages must share it.
    assert builder.base == runtime.base
    # The runtime stage gets the venv and nothing else from the builder.
    copies = runtime.all("COPY")
    assert [c.args for c in copies] == ["--from=builder /opt/venv /opt/venv"]


def test_runtime_stage_has_no_build_tools_and_runs_as_non_root(dockerfile: list[Stage]) -> None:
    runtime = dockerfile[-1]
    for run in runtime.all("RUN"):
        for forbidden in ("pip", "apt-get", "apk", "gcc", "build-essential", "make "):
            assert forbidden not in run.args, f"runtime stage runs {forbidden!r}: {run.args}"
    builder = dockerfile[0]
    for run in builder.all("RUN"):
        assert "apt-get" not in run.args, "the builder needs no system build tools: wheels only"
    user = runtime.one("USER").args
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) > 0, "USER must be a numeric non-root uid (runAsNonRoot checks it)"
    assert gid.isdigit() and int(gid) > 0
    keywords = [i.keyword for i in runtime.instructions]
    assert keywords.index("USER") < keywords.index("CMD")


def test_runtime_stage_serves_on_8080_with_healthcheck_and_sigterm(dockerfile: list[Stage]) -> None:
    runtime = dockerfile[-1]
    assert runtime.one("EXPOSE").args == "8080"
    assert runtime.env()["SIDECAR_PORT"] == "8080"
    assert runtime.one("STOPSIGNAL").args == "SIGTERM"
    # Exec form: the signal reaches the Python process, not a shell that ignores it.
    assert exec_form(runtime.one("CMD").args) == ["session-sidecar", "serve"]
    flags, command = healthcheck_command(runtime)
    assert command[0] == "python", "slim images have no curl: the healthcheck uses Python"
    assert "/healthz" in " ".join(command)
    assert set(flags) >= {"interval", "timeout", "start-period", "retries"}


# --- Dockerfile: the builder's steps, for real -----------------------------------------------------


@dataclass
class ImageVenv:
    root: Path  # stands for `/` of the image: holds opt/venv and src
    venv: Path
    runtime_env: dict[str, str]
    cmd: list[str]
    healthcheck: list[str]


def _host_path(root: Path, text: str) -> str:
    return text.replace("/opt/venv", str(root / "opt" / "venv")).replace("/src", str(root / "src"))


@pytest.fixture(scope="module")
def image_venv(dockerfile: list[Stage], tmp_path_factory: pytest.TempPathFactory) -> ImageVenv:
    """Replays the builder stage: WORKDIR, COPY (from the filtered context), ENV, RUN."""
    builder, runtime = dockerfile[0], dockerfile[-1]
    tag = builder.base.split(":", 1)[1].split("-")[0]
    assert f"{sys.version_info.major}.{sys.version_info.minor}" == tag, (
        f"the image uses Python {tag}; this test replays its steps with {sys.version.split()[0]}"
    )
    root = tmp_path_factory.mktemp("image")
    context = build_context(REPO)
    bin_dir = root / "base-bin"  # the base image's `python` on PATH
    bin_dir.mkdir()
    base_python = getattr(sys, "_base_executable", sys.executable)
    (bin_dir / "python").symlink_to(base_python)
    inherited = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    env = {**inherited, "PATH": f"{bin_dir}:/usr/local/bin:/usr/bin:/bin"}
    cwd = root
    for instruction in builder.instructions:
        if instruction.keyword == "WORKDIR":
            cwd = Path(_host_path(root, instruction.args))
            cwd.mkdir(parents=True, exist_ok=True)
        elif instruction.keyword == "ENV":
            apply_env(env, instruction.args)
            # The one deviation, for speed only: reuse this machine's pip cache.
            env.pop("PIP_NO_CACHE_DIR", None)
        elif instruction.keyword == "COPY":
            *sources, dest = instruction.args.split()
            assert not any(s.startswith("--") for s in sources), instruction.args
            dest_dir = cwd / dest
            for source in sources:
                src = source.rstrip("/")
                chosen = [f for f in context if f == src or f.startswith(src + "/")]
                assert chosen, f"COPY {source}: not in the build context (.dockerignore?)"
                for rel in chosen:
                    # A file lands in the destination directory; a directory's contents do.
                    target = dest_dir / (Path(rel).name if rel == src else Path(rel).relative_to(src))
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(REPO / rel, target)
        elif instruction.keyword == "RUN":
            command = _host_path(root, instruction.args)
            done = subprocess.run(
                ["sh", "-c", command], cwd=cwd, env=env, capture_output=True, text=True, timeout=240
            )
            assert done.returncode == 0, (
                f"RUN {instruction.args}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
            )
        else:
            assert instruction.keyword in ("LABEL",), f"replay does not know {instruction.keyword}"
    venv = root / "opt" / "venv"
    runtime_env = runtime.env({"PATH": "/usr/local/bin:/usr/bin:/bin"})
    runtime_env["PATH"] = _host_path(root, runtime_env["PATH"])
    return ImageVenv(
        root,
        venv,
        runtime_env,
        exec_form(runtime.one("CMD").args),
        healthcheck_command(runtime)[1],
    )


@pytest.mark.timeout(300)  # the first one builds the venv: pip may download on a cold cache
def test_builder_steps_install_a_self_contained_venv(image_venv: ImageVenv) -> None:
    python = image_venv.venv / "bin" / "python"
    probe = subprocess.run(
        [
            str(python),
            "-c",
            "import importlib.util as u, json, session_sidecar, uvicorn;"
            "print(json.dumps({'file': session_sidecar.__file__,"
            " 'uvloop': bool(u.find_spec('uvloop')), 'httptools': bool(u.find_spec('httptools')),"
            " 'pip': bool(u.find_spec('pip'))}))",
        ],
        capture_output=True,
        text=True,
        cwd="/",
        env={"PATH": "/usr/bin:/bin"},
        timeout=60,
    )
    assert probe.returncode == 0, probe.stderr
    found = json.loads(probe.stdout)
    # A real install inside the venv, not a link back to the source tree.
    assert Path(found["file"]).is_relative_to(image_venv.venv), found["file"]
    assert found["uvloop"] and found["httptools"]
    assert not found["pip"], "the runtime venv still carries pip"
    assert (image_venv.venv / "bin" / "session-sidecar").exists()


@pytest.mark.timeout(300)  # builds the venv when run alone
def test_builder_steps_install_exactly_the_locked_versions(image_venv: ImageVenv) -> None:
    probe = subprocess.run(
        [
            str(image_venv.venv / "bin" / "python"),
            "-c",
            "import importlib.metadata as m, json;"
            "print(json.dumps({d.metadata['Name']: d.version for d in m.distributions()}))",
        ],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin"},
        timeout=60,
    )
    assert probe.returncode == 0, probe.stderr
    installed = {canonicalize_name(name): version for name, version in json.loads(probe.stdout).items()}
    assert installed.pop(canonicalize_name("session-sidecar"))
    # Both ways: nothing unpinned slipped in, and no pin that applies here is missing or stale.
    locked = {
        name: str(pin.specifier).removeprefix("==")
        for name, pin in lock_pins().items()
        if pin.marker is None or pin.marker.evaluate()
    }
    assert installed == locked, f"regenerate requirements.lock: {REGENERATE_LOCK}"


@pytest.fixture(scope="module")
def private_redis() -> Iterator[str]:
    # Its own server: the shutdown test pauses it.
    with EmbeddedRedis() as server:
        yield server.url


@dataclass
class Served:
    proc: subprocess.Popen[bytes]
    port: int
    env: dict[str, str]
    log: Path


def start_cmd(image: ImageVenv, redis_url: str, log: Path) -> Served:
    port = free_port()
    env = {
        **image.runtime_env,
        "SIDECAR_HOST": "127.0.0.1",  # loopback only on this machine; the image says 0.0.0.0
        "SIDECAR_PORT": str(port),
        "SIDECAR_REDIS_URL": redis_url,
        "SIDECAR_REDIS_TIMEOUT_MS": "5000",
        "SIDECAR_INDEX_MODE": "scan",  # every request reads Redis: the shutdown test needs that
        "isDevelopmentMode": "enabled",
        "defaultUsername": "alice",
    }
    with log.open("wb") as out:
        proc = subprocess.Popen(
            image.cmd, env=env, cwd=image.root, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    return Served(proc, port, env, log)


def run_healthcheck(image: ImageVenv, env: dict[str, str]) -> int:
    return subprocess.run(image.healthcheck, env=env, capture_output=True, timeout=10).returncode


@pytest.fixture
def served(image_venv: ImageVenv, private_redis: str, tmp_path: Path) -> Iterator[Served]:
    served = start_cmd(image_venv, private_redis, tmp_path / "sidecar.log")
    try:
        deadline = time.monotonic() + 20
        while run_healthcheck(image_venv, served.env) != 0:
            if served.proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the image's CMD did not become healthy:\n{served.log.read_text()}")
            time.sleep(0.1)
        yield served
    finally:
        if served.proc.poll() is None:
            served.proc.kill()
            served.proc.wait(timeout=10)


@pytest.mark.timeout(300)
def test_healthcheck_passes_on_the_running_cmd_and_fails_without_it(
    image_venv: ImageVenv, served: Served
) -> None:
    assert run_healthcheck(image_venv, served.env) == 0
    assert run_healthcheck(image_venv, {**served.env, "SIDECAR_PORT": str(free_port())}) != 0


@pytest.mark.timeout(300)
def test_sigterm_lets_the_in_flight_request_finish_then_exits(
    image_venv: ImageVenv, served: Served, private_redis: str
) -> None:
    pause_ms = 1500
    control = redis.Redis.from_url(private_redis)
    answer: dict[str, Any] = {}

    def request() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", served.port, timeout=15)
        try:
            conn.request("GET", "/api/v1/conversations/conv-sigterm/active-session")
            resp = conn.getresponse()
            answer["status"] = resp.status
            answer["body"] = json.loads(resp.read())
            answer["at"] = time.monotonic()
        except Exception as exc:  # recorded, asserted below
            answer["error"] = repr(exc)
        finally:
            conn.close()

    # Redis holds every command for a while: the request is in flight, waiting on it.
    control.client_pause(pause_ms)
    started = time.monotonic()
    client = threading.Thread(target=request)
    client.start()
    time.sleep(0.3)
    served.proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    # Stopped accepting new connections at once...
    with pytest.raises(OSError):
        conn = http.client.HTTPConnection("127.0.0.1", served.port, timeout=1)
        conn.request("GET", "/healthz")
        conn.getresponse()
    # ...but the request in flight gets its real answer once Redis is back,
    deadline = time.monotonic() + 15
    while served.proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    exited_at = time.monotonic()
    code = served.proc.poll()
    client.join(timeout=15)
    control.close()
    log = served.log.read_text()
    assert "error" not in answer, f"{answer['error']}\n{log}"
    assert answer["status"] == 404, (answer, log)
    assert answer["body"] == {"error": "No active session found", "conversationId": "conv-sigterm"}
    assert answer["at"] - started >= pause_ms / 1000 - 0.1, "the request did not wait for Redis"
    # ...and only then does the process exit, by itself, with status 0.
    assert code == 0, (code, log)
    assert answer["at"] <= exited_at


# --- the documents -----------------------------------------------------------------------------------

# An inline link's target, or a reference definition's.
MARKDOWN_LINK = re.compile(r"\]\(([^)\s]+)\)|^\[[^\]]+\]:\s*(\S+)", re.MULTILINE)


def documents() -> list[Path]:
    """The repository's Markdown files (not those of venvs, caches or benchmark output)."""
    found: list[Path] = []
    for root, dirs, files in os.walk(REPO):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d != "out"]
        found += [Path(root, name) for name in files if name.endswith(".md")]
    return found


def test_documents_link_only_inside_the_repository() -> None:
    docs = documents()
    assert REPO / "docs" / "contract.md" in docs, "the contract is the project's own document"
    for doc in docs:
        text = doc.read_text()
        # A user with only the repository must be able to read everything it points to.
        assert "../shared" not in text, doc
        for match in MARKDOWN_LINK.finditer(text):
            target = (match[1] or match[2]).split("#", 1)[0]
            if not target or re.match(r"[a-z]+:", target):  # a heading, or https:, mailto:
                continue
            path = (doc.parent / target).resolve()
            assert path.is_relative_to(REPO) and path.exists(), f"{doc.relative_to(REPO)} links to {target}"


def test_documents_give_the_exit_status_the_sigterm_test_measures() -> None:
    # test_sigterm_lets_the_in_flight_request_finish_then_exits sees status 0.
    for doc in [*documents(), DOCKERFILE]:
        assert not re.search(r"(exit|status)[^.]{0,40}\b143\b", doc.read_text()), doc


# --- docker-compose.yml ---------------------------------------------------------------------------


def interpolate(value: str, env: dict[str, str] | None = None) -> str:
    """Compose's interpolation: `$$` is a literal `$`, `${VAR:-default}` / `${VAR}` / `$VAR`."""
    env = env or {}

    def sub(match: re.Match[str]) -> str:
        if match[0] == "$$":
            return "$"
        name = match[1] or match[3]
        default = match[2]
        return env.get(name) or (default if default is not None else "")

    return re.sub(r"\$\$|\$\{(\w+)(?::-([^}]*))?\}|\$(\w+)", sub, value)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


def test_compose_has_the_four_services_with_healthchecks(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {"redis", "simulator", "sidecar", "gateway"}
    for name, service in services.items():
        check = service.get("healthcheck")
        assert check, f"{name} has no healthcheck"
        assert check["test"][0] in ("CMD", "CMD-SHELL"), name
        assert {"interval", "timeout", "retries"} <= set(check), name


def test_compose_depends_on_uses_conditions(compose: dict[str, Any]) -> None:
    services = compose["services"]
    expected = {
        "simulator": {"redis": "service_healthy"},
        "sidecar": {"redis": "service_healthy", "simulator": "service_started"},
        "gateway": {"sidecar": "service_healthy"},
    }
    for name, deps in expected.items():
        declared = services[name]["depends_on"]
        assert isinstance(declared, dict), f"{name}: depends_on must be the long form with conditions"
        assert {dep: spec["condition"] for dep, spec in declared.items()} == deps
    for service in services.values():
        for dep in service.get("depends_on", {}):
            assert dep in services


def test_compose_redis_has_the_notification_flags(compose: dict[str, Any]) -> None:
    command = [interpolate(part) for part in compose["services"]["redis"]["command"]]
    assert command[0] == "redis-server"
    flag = command.index("--notify-keyspace-events")
    assert command[flag + 1] == NOTIFY_FLAGS == "Eg$xtn"
    assert compose["services"]["redis"]["image"].startswith("redis:7")


def test_compose_runs_the_image_built_from_this_dockerfile(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name in ("simulator", "sidecar"):
        assert services[name]["build"]["dockerfile"] == "Dockerfile"
        assert (REPO / services[name]["build"]["context"] / "Dockerfile").exists()
        assert services[name]["image"] == services["sidecar"]["image"]
    assert services["simulator"]["command"][:2] == ["session-sidecar", "simulate"]
    redis_url = services["simulator"]["command"][services["simulator"]["command"].index("--redis-url") + 1]
    assert redis_url == services["sidecar"]["environment"]["SIDECAR_REDIS_URL"] == "redis://redis:6379/0"
    assert services["sidecar"]["command"] == ["session-sidecar", "serve"]
    env = services["sidecar"]["environment"]
    # Settings must accept the environment as written.
    Settings.from_env({k: interpolate(str(v)) for k, v in env.items()})
    # The simulator's featured runs belong to the development-mode user.
    assert env["isDevelopmentMode"] == "enabled"
    assert env["defaultUsername"] == DEMO_USER


def test_compose_ports_give_the_production_urls(compose: dict[str, Any]) -> None:
    services = compose["services"]

    def published(name: str) -> list[tuple[str, str]]:
        out = []
        for entry in services[name].get("ports", []):
            *host, container = interpolate(entry).split(":")
            out.append((host[-1], container))
        return out

    assert published("gateway") == [("8080", "8080")]
    assert published("sidecar") == [("8081", services["sidecar"]["environment"]["SIDECAR_PORT"])]
    assert published("redis") == [("6379", "6379")]
    # Loopback only, the gateway too: the stack's sidecar runs in development mode (no token).
    for name in ("gateway", "sidecar", "redis"):
        assert all(interpolate(p).startswith("127.0.0.1:") for p in services[name]["ports"]), name
    assert "simulator" not in [n for n in services if services[n].get("ports")]


def test_compose_gateway_uses_the_reference_file(compose: dict[str, Any], tmp_path: Path) -> None:
    gateway = compose["services"]["gateway"]
    assert gateway["image"].startswith("nginx:")
    (mount,) = gateway["volumes"]
    source, target, mode = mount.split(":")
    assert (REPO / source).resolve() == GATEWAY_CONF
    assert mode == "ro"
    (config,) = gateway["configs"]
    server_block = interpolate(compose["configs"][config["source"]]["content"])
    assert f"include {target};" in server_block
    assert "server sidecar:8080;" in server_block
    assert "upstream session_sidecar" in server_block and "upstream chat_backend" in server_block
    port = free_port()
    # `nginx -t` with the same server block, names that resolve here, and the repo's file.
    local = (
        server_block.replace("sidecar:8080", "127.0.0.1:8080")
        .replace("host.docker.internal:8000", "127.0.0.1:8000")
        .replace("listen 8080;", f"listen 127.0.0.1:{port};")
        .replace(f"include {target};", f"include {GATEWAY_CONF};")
    )
    temp = "\n".join(
        f"{n}_temp_path {tmp_path / n};" for n in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    conf = tmp_path / "nginx.conf"
    conf.write_text(
        f"pid {tmp_path / 'nginx.pid'};\nerror_log stderr;\nevents {{}}\n"
        f"http {{\naccess_log off;\n{temp}\n{local}\n}}\n"
    )
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if not os.access(nginx, os.X_OK):
        pytest.fail("nginx is not installed: `apt-get install nginx` (Debian package; .ci/run installs it)")
    check = subprocess.run(
        [nginx, "-t", "-p", str(tmp_path), "-c", str(conf)], capture_output=True, text=True
    )
    assert check.returncode == 0, check.stderr


# --- Kubernetes ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def manifests() -> dict[str, dict[str, Any]]:
    by_kind: dict[str, dict[str, Any]] = {}
    files = sorted(K8S.glob("*.yaml"))
    assert files, "no manifests in deploy/kubernetes"
    for path in files:
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is None:
                continue
            assert {"apiVersion", "kind", "metadata"} <= set(doc), path
            assert doc["kind"] not in by_kind, f"two {doc['kind']} manifests"
            by_kind[doc["kind"]] = doc
    assert set(by_kind) == {
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "HorizontalPodAutoscaler",
        "HTTPRoute",
    }
    return by_kind


def container(manifests: dict[str, dict[str, Any]]) -> dict[str, Any]:
    (only,) = manifests["Deployment"]["spec"]["template"]["spec"]["containers"]
    assert isinstance(only, dict)
    return only


def probe_paths(manifests: dict[str, dict[str, Any]]) -> dict[str, str]:
    c = container(manifests)
    return {kind: c[kind]["httpGet"]["path"] for kind in ("startupProbe", "livenessProbe", "readinessProbe")}


def test_k8s_api_versions(manifests: dict[str, dict[str, Any]]) -> None:
    assert {kind: doc["apiVersion"] for kind, doc in manifests.items()} == {
        "Deployment": "apps/v1",
        "Service": "v1",
        "PodDisruptionBudget": "policy/v1",
        "HorizontalPodAutoscaler": "autoscaling/v2",
        "HTTPRoute": "gateway.networking.k8s.io/v1",
    }


def test_k8s_probes(manifests: dict[str, dict[str, Any]], dockerfile: list[Stage]) -> None:
    assert probe_paths(manifests) == {
        "startupProbe": "/healthz",
        "livenessProbe": "/healthz",
        "readinessProbe": "/readyz",
    }
    c = container(manifests)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
        port = c[kind]["httpGet"]["port"]
        assert ports.get(port, port) == 8080, kind
        assert c[kind]["timeoutSeconds"] <= c[kind]["periodSeconds"], kind
    # The image's port and command.
    assert int(dockerfile[-1].one("EXPOSE").args) == 8080
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["SIDECAR_PORT"] == "8080"
    assert c.get("args", exec_form(dockerfile[-1].one("CMD").args)) == exec_form(
        dockerfile[-1].one("CMD").args
    )
    # The startup probe allows the liveness probe's patience at least.
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 10


def test_k8s_security_and_resources(manifests: dict[str, dict[str, Any]], dockerfile: list[Stage]) -> None:
    pod = manifests["Deployment"]["spec"]["template"]["spec"]
    c = container(manifests)
    security = c["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["runAsNonRoot"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    uid = dockerfile[-1].one("USER").args.split(":")[0]
    assert security["runAsUser"] == pod["securityContext"]["runAsUser"] == int(uid)
    resources = c["resources"]
    assert {"cpu", "memory"} <= set(resources["requests"])
    assert "memory" in resources["limits"]
    # Graceful stop fits: preStop pause + the app's drain < the grace period.
    env = {e["name"]: e.get("value") for e in c["env"]}
    pre_stop = " ".join(c["lifecycle"]["preStop"]["exec"]["command"])
    pause = int(re.search(r"sleep\((\d+)\)", pre_stop)[1])  # type: ignore[index]
    assert pause + int(env["SIDECAR_SHUTDOWN_TIMEOUT_S"]) < pod["terminationGracePeriodSeconds"]
    # Token verification is configured, and acceptable to the app's own settings checks.
    Settings.from_env(
        {k: v for k, v in env.items() if v is not None} | {"SIDECAR_REDIS_URL": "redis://redis:6379/0"}
    )


def test_k8s_selectors_and_references_line_up(manifests: dict[str, dict[str, Any]]) -> None:
    deployment = manifests["Deployment"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= labels.items()
    service = manifests["Service"]
    assert service["spec"]["selector"].items() <= labels.items()
    (port,) = service["spec"]["ports"]
    c = container(manifests)
    assert port["targetPort"] in {p["name"] for p in c["ports"]} | {p["containerPort"] for p in c["ports"]}
    pdb = manifests["PodDisruptionBudget"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    hpa = manifests["HorizontalPodAutoscaler"]
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    # A drain can always evict one pod: the PDB never pins every replica.
    assert hpa["spec"]["minReplicas"] > pdb["spec"]["minAvailable"]
    assert deployment["spec"]["replicas"] >= hpa["spec"]["minReplicas"]
    # CPU utilisation needs a CPU request.
    assert "cpu" in c["resources"]["requests"]


def test_k8s_route_matches_the_nginx_split(manifests: dict[str, dict[str, Any]]) -> None:
    route = manifests["HTTPRoute"]
    sidecar_rules = [
        r for r in route["spec"]["rules"] if any(b["name"] == "session-sidecar" for b in r["backendRefs"])
    ]
    nginx_locations = re.findall(r"location ~ (\S+) \{", GATEWAY_CONF.read_text())
    assert len(sidecar_rules) == len(nginx_locations) == 2
    for rule in sidecar_rules:
        (backend_ref,) = rule["backendRefs"]
        assert backend_ref["port"] == manifests["Service"]["spec"]["ports"][0]["port"]
        (match,) = rule["matches"]
        assert match["path"]["type"] == "RegularExpression"
    route_regexes = [re.compile(r["matches"][0]["path"]["value"]) for r in sidecar_rules]
    # PCRE -> Python
    nginx_regexes = [re.compile(x.replace("(?<", "(?P<").replace(r"\z", r"\Z")) for x in nginx_locations]

    def routed(path: str, regexes: list[re.Pattern[str]]) -> bool:
        return any(regex.search(path) for regex in regexes)

    # The same split as the nginx file: both accept and refuse the same paths.
    for path in (
        "/api/v1/conversations/abc-1/active-session",
        "/api/v1/conversations/a.b_c/task-status",
        "/api/v1/conversations/abc/events",
        "/api/v1/conversations/abc/resume/conversation:current_user_id:1700000000000-1",
    ):
        assert routed(path, route_regexes) and routed(path, nginx_regexes), path
    for path in (
        "/api/v1/conversations/abc/info/",
        "/api/v1/conversations/abc/message/",
        "/api/v1/conversations/abc/",
        "/api/v1/conversations/a/b/task-status",
        "/api/v1/conversations/a%2Fb/task-status",
        "/api/v1/conversations/abc/active-session/",
        "/api/v1/conversations/abc/active-sessions",
        "/api/v1/conversations//active-session",
        "/api/v1/conversations/abc/resume/",
        "/api/v1/conversations/abc/resume/a/b",
        "/api/v1/conversations/abc/events/x",
        "/api/v2/conversations/abc/active-session",
        "/x/api/v1/conversations/abc/active-session",
        "/healthz",
        "/metrics",
    ):
        assert not routed(path, route_regexes) and not routed(path, nginx_regexes), path
    # Held watch requests need more than SIDECAR_WATCH_MAX_S; streams need no request timeout.
    assert [r["timeouts"]["request"] for r in sidecar_rules] == ["70s", "0s"]
    others = [r for r in route["spec"]["rules"] if r not in sidecar_rules]
    assert [m["path"] for r in others for m in r["matches"]] == [{"type": "PathPrefix", "value": "/api/v1/"}]


# --- probe paths are real --------------------------------------------------------------------------


@pytest.fixture
async def app_client(redis_url: str) -> AsyncIterator[tuple[set[str], httpx.AsyncClient]]:
    env = {
        "SIDECAR_REDIS_URL": redis_url,
        "SIDECAR_JWT_SECRET": "x" * 40,
        "SIDECAR_ACCESS_POLICY": "run-owner",
    }
    app = create_app(Settings.from_env(env))
    routes = {r.path for r in app.routes if isinstance(r, Route)}
    async with asyncio.timeout(30), app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://sidecar") as client:
            yield routes, client


async def test_every_probe_path_is_a_route_that_answers_200(
    app_client: tuple[set[str], httpx.AsyncClient],
    manifests: dict[str, dict[str, Any]],
    dockerfile: list[Stage],
    compose: dict[str, Any],
) -> None:
    routes, client = app_client
    paths = set(probe_paths(manifests).values())
    paths |= set(re.findall(r"/[a-z]+z\b", " ".join(healthcheck_command(dockerfile[-1])[1])))
    paths |= set(
        re.findall(
            r"127\.0\.0\.1:8080(/\w+)", " ".join(compose["services"]["sidecar"]["healthcheck"]["test"])
        )
    )
    assert paths == {"/healthz", "/readyz"}
    for path in sorted(paths):
        assert path in routes, f"{path} is not a route of the app: {sorted(routes)}"
        # Readiness may take a moment after start (Redis connection, index); liveness may not.
        for _ in range(100 if path == "/readyz" else 1):
            response = await client.get(path)
            if response.status_code == 200:
                break
            await asyncio.sleep(0.1)
        assert response.status_code == 200, (path, response.text)
    # The gateway's sidecar paths are the app's routes too.
    assert any(SIDECAR_ROUTE.fullmatch(r.replace("{conversation_id}", "x")) for r in routes)
    assert {r for r in routes if not r.startswith("/api/")} >= {"/healthz", "/readyz", "/metrics"}


# --- monitoring: Prometheus Operator objects and the Grafana dashboard ---------------------------

MONITORING = REPO / "deploy" / "monitoring"
DASHBOARD = MONITORING / "grafana" / "session-sidecar.json"
# Every metric the service exports starts with one of these; PromQL names series (a counter's `_total`).
METRIC_NAME = re.compile(r"\b(?:sidecar|process|python)_[a-z_]+\b")
API_ROUTES = 'route=~"active-session|task-status"'


@pytest.fixture(scope="module")
def monitoring() -> dict[str, dict[str, Any]]:
    by_kind: dict[str, dict[str, Any]] = {}
    for path in sorted(MONITORING.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                assert doc["apiVersion"] == "monitoring.coreos.com/v1", path
                by_kind[doc["kind"]] = doc
    assert set(by_kind) == {"ServiceMonitor", "PrometheusRule"}
    return by_kind


def alert_rules(monitoring: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    groups = monitoring["PrometheusRule"]["spec"]["groups"]
    return {rule["alert"]: rule for group in groups for rule in group["rules"]}


def dashboard() -> dict[str, Any]:
    data = json.loads(DASHBOARD.read_text())
    assert isinstance(data, dict)
    return data


def all_exprs(monitoring: dict[str, dict[str, Any]]) -> list[str]:
    panels = dashboard()["panels"]
    return [rule["expr"] for rule in alert_rules(monitoring).values()] + [
        target["expr"] for panel in panels for target in panel["targets"]
    ]


def seconds(duration: str) -> int:
    value, unit = re.fullmatch(r"(\d+)([smh])", duration).groups()  # type: ignore[union-attr]
    return int(value) * {"s": 1, "m": 60, "h": 3600}[unit]


def test_service_monitor_scrapes_the_service(
    monitoring: dict[str, dict[str, Any]], manifests: dict[str, dict[str, Any]]
) -> None:
    monitor = monitoring["ServiceMonitor"]
    service = manifests["Service"]
    # A ServiceMonitor selects Services by the Service's own labels, and names its port.
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {port["name"] for port in service["spec"]["ports"]}
    assert endpoint["path"] == "/metrics"
    assert seconds(endpoint["scrapeTimeout"]) <= seconds(endpoint["interval"])
    # No jobLabel: the job is the Service's name, which the rules and the dashboard filter on.
    assert "jobLabel" not in monitor["spec"]
    job = service["metadata"]["name"]
    for expr in all_exprs(monitoring):
        assert set(re.findall(r'job="([^"]*)"', expr)) in ({job}, {"$job"}), expr
    (variable,) = [v for v in dashboard()["templating"]["list"] if v["name"] == "job"]
    assert variable["query"] == variable["current"]["value"] == job


def test_alert_rules_cover_errors_unavailability_and_the_index(monitoring: dict[str, dict[str, Any]]) -> None:
    alerts = alert_rules(monitoring)
    assert set(alerts) == {
        "SessionSidecarServerErrors",
        "SessionSidecarUnavailable",
        "SessionSidecarIndexOff",
        "SessionSidecarIndexLagging",
    }
    for name, alert in alerts.items():
        assert alert["labels"]["severity"] in ("critical", "warning"), name
        assert alert["annotations"]["summary"] and alert["annotations"]["description"], name
        assert seconds(alert["for"]) >= 60, name
    # Ratios over the conversation routes only: /readyz answers 503 by design while a pod is unready.
    for name in ("SessionSidecarServerErrors", "SessionSidecarUnavailable"):
        assert alerts[name]["expr"].count(API_ROUTES) == 2, name
    assert 'status!="503"' in alerts["SessionSidecarServerErrors"]["expr"]
    assert 'status="503"' in alerts["SessionSidecarUnavailable"]["expr"]
    assert "sidecar_index_enabled" in alerts["SessionSidecarIndexOff"]["expr"]
    lagging = alerts["SessionSidecarIndexLagging"]["expr"]
    assert "sidecar_index_lag_seconds" in lagging and "sidecar_index_enabled" in lagging


def test_dashboard_shows_traffic_latency_503s_memory_and_the_index() -> None:
    board = dashboard()
    assert board["uid"] and board["title"]
    panels = board["panels"]
    assert len({panel["id"] for panel in panels}) == len(panels)
    assert {v["name"] for v in board["templating"]["list"]} == {"datasource", "job"}
    exprs = " ".join(target["expr"] for panel in panels for target in panel["targets"])
    for needed in (
        "sum by (route, status) (rate(sidecar_requests_total",
        "histogram_quantile(0.5,",
        "histogram_quantile(0.99,",
        'status="503"',
        "process_resident_memory_bytes",
        "sidecar_index_runs",
        "sidecar_index_lag_seconds",
    ):
        assert needed in exprs, needed
    for panel in panels:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert all(t["refId"] and t["expr"] for t in panel["targets"]), panel["title"]


async def test_monitoring_names_only_series_the_app_exports(
    app_client: tuple[set[str], httpx.AsyncClient], monitoring: dict[str, dict[str, Any]]
) -> None:
    _, client = app_client
    await client.get("/api/v1/conversations/x/task-status")  # labelled series appear once used
    exported: set[str] = set()
    for family in text_string_to_metric_families((await client.get("/metrics")).text):
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_count", "_sum"]}.get(family.type, [])
        exported |= {family.name} | {family.name + s for s in suffixes}
        exported |= {sample.name for sample in family.samples}
    used = {name for expr in all_exprs(monitoring) for name in METRIC_NAME.findall(expr)}
    assert len(used) >= 8, used
    assert used <= exported, sorted(used - exported)
