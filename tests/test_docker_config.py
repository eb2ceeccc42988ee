"""docker/ and kong.conf.example, checked as far as this machine allows (no Docker engine here).

* The pluginserver entries in docker/Dockerfile (ENV, per build stage) and kong.conf.example agree
  for both variants (aigov serve; stock kong-pdk servers): names, sockets, start and query commands.
* The entries follow Kong 3.9's rules (kong/conf_loader/init.lua): a query_cmd for every entry,
  the env-var prefix Kong derives from the name, sockets `<prefix>/<name>.socket`.
* Every query_cmd really runs here (paths mapped from the image layout to this checkout) and prints
  the JSON Kong reads, whose first entry is the entry's plugin and passes Kong's metaschema.
* The aigov variant's start_cmd really starts one server that opens all three sockets, and
  docker/healthcheck.sh reports unhealthy before and healthy after.
* The Dockerfile builds with THE install script, with CPU-only torch; compose, Prometheus and the
  Grafana dashboard reference real things (service names, the metrics port, metric names).
"""
from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from aigov.pdk import READ_BODY_MAX_BYTES
from kongsim.gateway import RECOMMENDED_BODY_SIZES, nginx_size

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO / "docker" / "Dockerfile"
KONG_CONF = REPO / "kong.conf.example"
COMPOSE = REPO / "docker" / "compose.yml"
PLUGIN_NAMES = ["llm-semantic-cache", "llm-token-quota", "llm-semantic-router"]
IMAGE_ROOT = "/opt/aigov"
IMAGE_VENV_BIN = "/opt/aigov/venv/bin/"
KONG_PREFIX = "/usr/local/kong"


# --- parsers -------------------------------------------------------------------------------------

@dataclass
class Stage:
    name: str
    parent: str
    env: dict[str, str] = field(default_factory=dict)
    instructions: list[tuple[str, str]] = field(default_factory=list)


def parse_dockerfile(text: str) -> dict[str, Stage]:
    """Stages by name with their ENV and instructions (continuations joined, comments dropped)."""
    logical: list[str] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):  # Docker drops comment lines inside continuations
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    assert not pending, "Dockerfile ends inside a line continuation"

    stages: dict[str, Stage] = {}
    current: Stage | None = None
    for line in logical:
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            parts = rest.split()
            name = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else f"stage{len(stages)}"
            current = stages[name] = Stage(name=name, parent=parts[0])
            continue
        if current is None:
            continue  # ARG before the first FROM
        current.instructions.append((keyword, rest))
        if keyword == "ENV":
            for token in shlex.split(rest):
                key, sep, value = token.partition("=")
                assert sep, f"ENV without '=' (legacy form) is not used here: {token!r}"
                current.env[key] = value
    return stages


def stage_env(stages: dict[str, Stage], name: str) -> dict[str, str]:
    """ENV of a stage including what it inherits through `FROM <earlier stage>`."""
    stage = stages[name]
    inherited = stage_env(stages, stage.parent) if stage.parent in stages else {}
    return {**inherited, **stage.env}


def parse_kong_conf(text: str) -> dict[str, dict[str, str]]:
    """kong.conf keys per section: "common", then one section per `=== variant: NAME` marker.

    Inside a variant section commented `# key = value` lines count too (the stock variant is a
    commented-out alternative)."""
    sections: dict[str, dict[str, str]] = {"common": {}}
    current = "common"
    for raw in text.splitlines():
        marker = re.match(r"#\s*=+\s*variant:\s*(\w+)", raw)
        if marker:
            current = marker.group(1)
            sections[current] = {}
            continue
        line = raw.strip()
        if current != "common" and re.match(r"#\s*[a-z_]+\s*=", line) and current == "stock":
            line = line.lstrip("#").strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep, f"kong.conf line without '=': {raw!r}"
        sections[current][key.strip()] = value.strip()
    return sections


@dataclass(frozen=True)
class ServerEntry:
    name: str
    socket: str
    start_cmd: str | None
    query_cmd: str | None


def entries_from_env(env: dict[str, str]) -> list[ServerEntry]:
    """Kong's reading of KONG_PLUGINSERVER_* (names lowercased, '-' -> '_' in the key prefix)."""
    names = [n.strip().lower() for n in env["KONG_PLUGINSERVER_NAMES"].split(",")]
    out = []
    for name in names:
        prefix = "KONG_PLUGINSERVER_" + name.replace("-", "_").upper()
        out.append(ServerEntry(name, env.get(prefix + "_SOCKET", f"{KONG_PREFIX}/{name}.socket"),
                               env.get(prefix + "_START_CMD"), env.get(prefix + "_QUERY_CMD")))
    return out


def entries_from_conf(conf: dict[str, str]) -> list[ServerEntry]:
    names = [n.strip().lower() for n in conf["pluginserver_names"].split(",")]
    out = []
    for name in names:
        prefix = "pluginserver_" + name.replace("-", "_")
        out.append(ServerEntry(name, conf.get(prefix + "_socket", f"{KONG_PREFIX}/{name}.socket"),
                               conf.get(prefix + "_start_cmd"), conf.get(prefix + "_query_cmd")))
    return out


def nginx_env_directives(value: str) -> list[str]:
    """The variable names of the `env X;` directives Kong renders from nginx_main_env = value.

    Kong's template writes `$(el.name) $(el.value);`, i.e. `env <value>;` verbatim."""
    rendered = f"env {value};"
    names = []
    for directive in filter(None, (d.strip() for d in rendered.split(";"))):
        word, _, arg = directive.partition(" ")
        assert word == "env" and arg and " " not in arg.strip(), f"not an env directive: {directive!r}"
        names.append(arg.strip().split("=", 1)[0])
    return names


@pytest.fixture(scope="module")
def stages() -> dict[str, Stage]:
    return parse_dockerfile(DOCKERFILE.read_text())


@pytest.fixture(scope="module")
def kong_conf() -> dict[str, dict[str, str]]:
    return parse_kong_conf(KONG_CONF.read_text())


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


# --- Dockerfile ENV == kong.conf.example ----------------------------------------------------------

@pytest.mark.parametrize("variant", ["aigov", "stock"])
def test_pluginserver_entries_agree(stages, kong_conf, variant):
    from_docker = entries_from_env(stage_env(stages, variant))
    from_conf = entries_from_conf(kong_conf[variant])
    assert from_docker == from_conf
    assert [e.name for e in from_docker] == PLUGIN_NAMES


def test_shared_kong_settings_agree(stages, kong_conf):
    common = kong_conf["common"]
    for variant in ("aigov", "stock"):
        env = stage_env(stages, variant)
        assert env["KONG_PLUGINS"] == common["plugins"] == "bundled," + ",".join(PLUGIN_NAMES)
        assert env["KONG_LOG_LEVEL"] == common["log_level"] == "info"  # plugin output is INFO (§1.4)
        assert env["KONG_NGINX_MAIN_ENV"] == common["nginx_main_env"]
        assert env["KONG_NGINX_HTTP_CLIENT_BODY_BUFFER_SIZE"] == \
            common["nginx_http_client_body_buffer_size"]
        assert env["KONG_NGINX_HTTP_CLIENT_MAX_BODY_SIZE"] == common["nginx_http_client_max_body_size"]



def test_client_body_buffer_holds_the_bodies_the_plugins_read(stages, kong_conf):
    """Kong's default nginx_http_client_body_buffer_size is 8k (kong/templates/kong_defaults.lua).
    A body over it is spooled to a file, which the plugins read back up to 8 MiB (Kong 3.8+'s
    max_allowed_file_size, aigov.pdk.request_body), from disk; past that get_raw_body returns nil,
    which Kong's mp_rpc.lua `fix_raw` fails to pack: a 500. So the buffer holds max_body_bytes'
    default and nginx refuses what the plugins would not read."""
    from aigov.docs import dump_plugin_infos

    defaults = []
    for info in dump_plugin_infos(None):  # what the query_cmds print, from a fresh interpreter
        for item in info["Schema"]["fields"][0]["config"]["fields"]:
            (name, spec), = item.items()
            if name == "max_body_bytes":
                defaults.append(spec["default"])
    assert defaults, "no plugin declares max_body_bytes any more: revisit this check"
    common = kong_conf["common"]
    buffer = nginx_size(common["nginx_http_client_body_buffer_size"])
    maximum = nginx_size(common["nginx_http_client_max_body_size"])
    # No body nginx accepts is spooled (0 would mean no maximum), and the plugins' own limits come first.
    assert 0 < maximum <= buffer and min(buffer, maximum) >= max(defaults) > 8 * 1024
    assert maximum <= READ_BODY_MAX_BYTES  # whatever nginx accepts, the plugins read
    for variant in ("aigov", "stock"):
        env = stage_env(stages, variant)
        assert nginx_size(env["KONG_NGINX_HTTP_CLIENT_BODY_BUFFER_SIZE"]) == buffer
        assert nginx_size(env["KONG_NGINX_HTTP_CLIENT_MAX_BODY_SIZE"]) == maximum
    # The stand-in's harnesses (tests, demo) run Kong configured this way.
    assert {k: nginx_size(v) for k, v in RECOMMENDED_BODY_SIZES.items()} == \
        {"client_body_buffer_size": buffer, "client_max_body_size": maximum}


def test_aigov_variant_one_server_for_three_sockets(stages):
    entries = entries_from_env(stage_env(stages, "aigov"))
    started = [e for e in entries if e.start_cmd]
    assert len(started) == 1, "exactly one entry starts `aigov serve`; the others are external"
    assert started[0].start_cmd == f"{IMAGE_VENV_BIN}aigov serve -p {KONG_PREFIX}"
    for entry in entries:
        assert entry.socket == f"{KONG_PREFIX}/{entry.name}.socket"
        assert entry.query_cmd == f"{IMAGE_VENV_BIN}aigov dump {entry.name}"


def test_stock_variant_one_dedicated_server_per_plugin(stages):
    for entry in entries_from_env(stage_env(stages, "stock")):
        script = f"{IMAGE_ROOT}/plugins/{entry.name}.py"
        assert (REPO / "plugins" / f"{entry.name}.py").is_file()
        assert entry.socket == f"{KONG_PREFIX}/{entry.name}.socket"
        # kong-pdk's own default would be <name>.sock: the name must be explicit (§1.5).
        assert entry.start_cmd == (f"{IMAGE_VENV_BIN}python3 {script} "
                                   f"--socket-name {entry.name}.socket -p {KONG_PREFIX}")
        assert entry.query_cmd == f"{IMAGE_VENV_BIN}python3 {script} --dump"


def test_entries_satisfy_kong_39_config_loader(stages):
    """kong/conf_loader/init.lua (3.9): query_cmd is required; start_cmd may be absent."""
    for variant in ("aigov", "stock"):
        env = stage_env(stages, variant)
        for entry in entries_from_env(env):
            assert entry.query_cmd, f"{variant}/{entry.name}: Kong 3.9 refuses an entry without query_cmd"
            key = "KONG_PLUGINSERVER_" + entry.name.replace("-", "_").upper() + "_QUERY_CMD"
            assert key in env, f"{key} missing: Kong derives the key prefix from the name"
        # Two entries for one plugin name: 3.9+ silently keeps the last one (§1.2).
        assert len({e.name for e in entries_from_env(env)}) == len(entries_from_env(env))


def test_nginx_main_env_passes_what_the_plugin_server_reads(stages):
    value = stage_env(stages, "aigov")["KONG_NGINX_MAIN_ENV"]
    passed = set(nginx_env_directives(value))
    assert {"HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "TIKTOKEN_CACHE_DIR"} <= passed
    # Every AIGOV_* variable that the code run inside the plugin server reads must reach it, also
    # AIGOV_PLUGINS_DIR: query_cmd (in Kong's master) reads it from the full environment, so a
    # server without it would serve other plugins than Kong registered.
    server_code = [REPO / "plugins", *(REPO / "aigov" / d for d in
                                       ("plugins", "cache", "quota", "routing", "server"))]
    server_code += [REPO / "aigov" / f for f in ("embeddings.py", "tokens.py", "redis_client.py",
                                                 "pdk.py", "metrics.py", "request.py", "schema.py",
                                                 "llm_response.py", "prices.py", "sse.py")]
    read: set[str] = set()
    for root in server_code:
        for path in ([root] if root.is_file() else root.rglob("*.py")) if root.exists() else []:
            read |= set(re.findall(r"AIGOV_[A-Z0-9_]+", path.read_text()))
    assert "AIGOV_PLUGINS_DIR" in read
    assert read <= passed, "add them to KONG_NGINX_MAIN_ENV and kong.conf.example"
    # The values the image bakes in must be set where nginx_main_env can pass them on.
    env = stage_env(stages, "aigov")
    assert env["HF_HUB_OFFLINE"] == "1" and env["TRANSFORMERS_OFFLINE"] == "1"
    assert env["TIKTOKEN_CACHE_DIR"] == f"{IMAGE_ROOT}/tiktoken"


# --- the commands really work (image paths mapped onto this checkout) -----------------------------

def local_command(cmd: str) -> str:
    """An image command rewritten for this machine: the venv's aigov/python and plugins/."""
    cmd = cmd.replace(f"{IMAGE_VENV_BIN}aigov ", f"{shlex.quote(sys.executable)} -m aigov.cli ")
    cmd = cmd.replace(f"{IMAGE_VENV_BIN}python3 ", f"{shlex.quote(sys.executable)} ")
    cmd = cmd.replace(f"{IMAGE_ROOT}/plugins/", f"{REPO}/plugins/")
    assert IMAGE_ROOT not in cmd, f"unmapped image path in {cmd!r}"
    return cmd


def kong_like_env() -> dict[str, str]:
    """What the image passes to the plugin server: nginx_main_env's variables, plus PYTHONPATH
    because this checkout is not pip-installed (the image installs it)."""
    return {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "TIKTOKEN_CACHE_DIR": os.environ.get("TIKTOKEN_CACHE_DIR", ""), "PYTHONPATH": str(REPO)}


@pytest.mark.parametrize("variant", ["aigov", "stock"])
def test_every_query_cmd_prints_its_plugin_for_kong(stages, variant):
    from kongsim.metaschema import validate_plugin_schema

    for entry in entries_from_env(stage_env(stages, variant)):
        # Kong runs query_cmd with io.popen, i.e. through /bin/sh, and reads all of stdout.
        proc = subprocess.run(["/bin/sh", "-c", local_command(entry.query_cmd)], env=kong_like_env(),
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        dump = json.loads(proc.stdout)
        first = (dump["Plugins"] if isinstance(dump, dict) else dump)[0]  # Kong uses [1] only
        assert first["Name"] == entry.name
        validate_plugin_schema(first)


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def _run_healthcheck(sockets: dict[str, str], fake_kong: Path) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "KONG_BIN": str(fake_kong), "AIGOV_PYTHON": sys.executable}
    for name, path in sockets.items():
        env["KONG_PLUGINSERVER_" + name.replace("-", "_").upper() + "_SOCKET"] = path
    return subprocess.run(["/bin/sh", str(REPO / "docker" / "healthcheck.sh")], env=env,
                          capture_output=True, text=True, timeout=30)


def test_aigov_start_cmd_serves_all_sockets_and_healthcheck_sees_them(stages, tmp_path):
    entries = entries_from_env(stage_env(stages, "aigov"))
    (start_cmd,) = [e.start_cmd for e in entries if e.start_cmd]
    prefix = tmp_path / "prefix"
    prefix.mkdir()
    sockets = {e.name: e.socket.replace(KONG_PREFIX, str(prefix)) for e in entries}
    fake_kong = tmp_path / "kong"  # Kong itself cannot run here: `kong health` answers "running"
    fake_kong.write_text("#!/bin/sh\n[ \"$1\" = health ] && exit 0\nexit 64\n")
    fake_kong.chmod(0o755)

    before = _run_healthcheck(sockets, fake_kong)
    assert before.returncode == 1 and "not listening" in before.stderr

    cmd = local_command(start_cmd).replace(f"-p {KONG_PREFIX}", f"-p {prefix}")
    # Kong's worker runs `exec <start_cmd>` through a shell (process.lua).
    server = subprocess.Popen(["/bin/sh", "-c", "exec " + cmd], env=kong_like_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        _wait_for(lambda: all(Path(p).exists() for p in sockets.values()) or server.poll() is not None,
                  60, "the three plugin sockets")
        assert server.poll() is None, server.stderr.read().decode(errors="replace")
        after = _run_healthcheck(sockets, fake_kong)
        assert after.returncode == 0, after.stderr
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            out, _err = server.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            out, _err = server.communicate()
    assert out == b"", "the plugin server wrote to stdout (Kong logs it, and query output must be JSON)"


def test_healthcheck_fails_when_kong_is_down(tmp_path):
    fake_kong = tmp_path / "kong"
    fake_kong.write_text("#!/bin/sh\necho 'Error: Kong is not running' >&2\nexit 1\n")
    fake_kong.chmod(0o755)
    result = _run_healthcheck({"llm-semantic-cache": str(tmp_path / "none.socket")}, fake_kong)
    assert result.returncode != 0


# --- the image is built with THE install script ---------------------------------------------------

def test_dockerfile_installs_with_the_ci_install_script(stages):
    base = stages["base"]
    assert base.parent.startswith("${KONG_IMAGE}")
    arg = re.search(r"^ARG KONG_IMAGE=(\S+)", DOCKERFILE.read_text(), re.M)
    assert arg, "the Kong base image is an ARG with a default"
    image, _, tag = arg.group(1).partition(":")
    assert image == "kong" and re.fullmatch(r"3\.(9|[1-9]\d)\.\d+(@sha256:[0-9a-f]{64})?", tag), \
        "pinned OSS Kong 3.9 or newer"
    runs = [rest for kw, rest in base.instructions if kw == "RUN"]
    install_runs = [r for r in runs if "scripts/install.sh" in r]
    assert len(install_runs) == 1
    assert 'TORCH_INDEX_URL="${TORCH_INDEX_URL}"' in install_runs[0]
    assert re.search(r"^ARG TORCH_INDEX_URL=https://download\.pytorch\.org/whl/cpu$",
                     DOCKERFILE.read_text(), re.M), "CPU-only torch index"
    # The variables the Dockerfile hands to install.sh are ones the script reads.
    script = (REPO / "scripts" / "install.sh").read_text()
    for var in ("VENV", "TORCH_INDEX_URL", "TIKTOKEN_CACHE_DIR", "PYTHON"):
        assert re.search(r"\$\{?" + var + r"\b", script), f"install.sh ignores {var}"
    assert base.env["VENV"] == IMAGE_VENV_BIN.removesuffix("/bin/")


def test_dockerfile_copies_what_the_install_needs_before_running_it(stages):
    base = stages["base"]
    copied: list[str] = []
    install_index = None
    for i, (kw, rest) in enumerate(base.instructions):
        if kw == "COPY":
            copied += [p for p in rest.split()[:-1] if not p.startswith("--")]
        if kw == "RUN" and "scripts/install.sh" in rest:
            install_index = i
            before_install = list(copied)
    assert install_index is not None
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    packages = pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    needed = {"pyproject.toml", "scripts/install.sh", pyproject["project"]["readme"]}
    needed |= {p.rstrip("*") for p in packages}
    assert needed <= set(before_install)
    for source in copied:
        assert (REPO / source).exists(), f"COPY {source}: no such file in the repository"
    ignore = (REPO / "docker" / "Dockerfile.dockerignore").read_text().split()
    assert ".venv" in ignore and ".git" in ignore


def test_healthcheck_and_user(stages):
    base_text = [rest for kw, rest in stages["base"].instructions if kw == "HEALTHCHECK"]
    assert base_text and "/usr/local/bin/aigov-healthcheck" in base_text[0]
    for variant in ("aigov", "stock"):
        users = [rest for kw, rest in stages[variant].instructions if kw == "USER"]
        assert users[-1] == "kong", "serve as the image's unprivileged user"
    assert list(stages)[-1] == "aigov", "a plain `docker build` gives the aigov variant"


# --- compose, Prometheus, Grafana -----------------------------------------------------------------

def test_compose_kong_service(stages, compose):
    kong = compose["services"]["kong"]
    assert kong["build"] == {"context": "..", "dockerfile": "docker/Dockerfile", "target": "aigov"}
    env = kong["environment"]
    assert env["KONG_DATABASE"] == "off"
    mount = next(v for v in kong["volumes"] if v.startswith("../spec/kong.yml:"))
    assert mount.split(":")[1] == env["KONG_DECLARATIVE_CONFIG"]
    # The override is the image's start_cmd plus the metrics endpoint, nothing else.
    image_start = stage_env(stages, "aigov")["KONG_PLUGINSERVER_LLM_SEMANTIC_CACHE_START_CMD"]
    override = env["KONG_PLUGINSERVER_LLM_SEMANTIC_CACHE_START_CMD"]
    assert override == image_start + " --metrics-listen 0.0.0.0:9542"


def test_compose_ports_are_local_and_metrics_private(compose):
    for name, service in compose["services"].items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond localhost"
            assert ":9542" not in str(port), "the metrics port stays on the compose network"
        image = service.get("image", "")
        assert image and ":" in image and not image.endswith(":latest"), f"{name}: pin the image"
    assert compose["services"]["grafana"]["profiles"] == ["grafana"]


def test_prometheus_scrapes_the_plugin_server(compose):
    prom = yaml.safe_load((REPO / "docker" / "prometheus.yml").read_text())
    targets = [t for job in prom["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]]
    override = compose["services"]["kong"]["environment"]["KONG_PLUGINSERVER_LLM_SEMANTIC_CACHE_START_CMD"]
    port = re.search(r"--metrics-listen \S+:(\d+)", override).group(1)
    assert targets == [f"kong:{port}"]
    mounts = compose["services"]["prometheus"]["volumes"]
    assert "./prometheus.yml:/etc/prometheus/prometheus.yml:ro" in mounts


def test_mock_llm_service_runs_from_the_same_image(compose):
    mock = compose["services"]["mock-llm"]
    assert mock["image"] == compose["services"]["kong"]["image"]
    assert mock["command"][:2] == [f"{IMAGE_VENV_BIN}aigov", "mock-llm"]
    assert mock["command"][2:] == ["--listen", "0.0.0.0:8080"]
    from aigov.mockllm import add_arguments
    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert parser.parse_args(mock["command"][2:]).listen == ("0.0.0.0", 8080)


def _metric_labels() -> dict[str, set[str]]:
    """Sample name -> label names, for every metric aigov.metrics defines."""
    from prometheus_client.metrics import MetricWrapperBase

    from aigov import metrics

    out: dict[str, set[str]] = {}
    for obj in vars(metrics).values():
        if not isinstance(obj, MetricWrapperBase):
            continue
        base, labels = obj._name, set(obj._labelnames)
        kind = obj._type
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_count", "_sum"]}.get(kind, [""])
        for suffix in suffixes:
            out[base + suffix] = labels | ({"le"} if suffix == "_bucket" else set())
    return out


def test_grafana_dashboard_uses_real_metric_names():
    dashboard = json.loads((REPO / "docker" / "grafana" / "dashboards" / "aigov.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    known = _metric_labels()
    referenced: set[str] = set()
    for expr in exprs:
        # A metric name is followed by a selector, a range, or ends the expression.
        names = set(re.findall(r"\b(ai_[a-z0-9_]+)\s*(?=[{\[]|$)", expr))
        assert names, f"no metric in {expr!r}"
        unknown = names - set(known)
        assert not unknown, f"{expr!r} uses metrics aigov.metrics does not define: {unknown}"
        referenced |= names
        # Every label the query groups or filters by exists on (one of) its metrics.
        labels = {l.strip() for group in re.findall(r"by \(([^)]*)\)", expr) for l in group.split(",")}
        labels |= set(re.findall(r"[{,]\s*([a-z_]+)\s*=~?", expr))
        available = set().union(*(known[n] for n in names))
        assert labels <= available, f"{expr!r}: labels {labels - available} do not exist"
    # Cache, tokens, cost, quota and routing are all on the dashboard.
    for family in ("ai_llm_requests_total", "ai_cache_tokens_saved_total", "ai_llm_tokens_total",
                   "ai_llm_cost_total", "ai_quota_rejections_total", "ai_router_decisions_total"):
        assert family in referenced
    datasource = yaml.safe_load(
        (REPO / "docker" / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text())
    uid = datasource["datasources"][0]["uid"]
    assert {p["datasource"]["uid"] for p in dashboard["panels"] if "datasource" in p} == {uid}
    provider = yaml.safe_load(
        (REPO / "docker" / "grafana" / "provisioning" / "dashboards" / "aigov.yml").read_text())
    grafana = yaml.safe_load(COMPOSE.read_text())["services"]["grafana"]
    assert f"./grafana/dashboards:{provider['providers'][0]['options']['path']}:ro" in grafana["volumes"]


def test_stand_in_reads_kong_conf_example_the_same_way(kong_conf):
    """The stand-in's own kong.conf reader (kongsim.process) sees the same aigov entries."""
    from kongsim import process

    conf, entries = process.load_kong_conf(KONG_CONF, {})
    ours = entries_from_conf(kong_conf["aigov"])
    assert [(e.name, e.socket, e.start_cmd, e.query_cmd) for e in entries] == \
        [(e.name, e.socket, e.start_cmd, e.query_cmd) for e in ours]
    assert conf["plugins"] == kong_conf["common"]["plugins"]
