"""Plugin-server entries, discovery through query_cmd, and process management like Kong 3.9+.

Follows `kong/runloop/plugin_servers/process.lua` (reference kong-plugin-server.md §1.2, §1.4):

* entries come from kong.conf keys `pluginserver_names`, `pluginserver_<n>_socket|start_cmd|
  query_cmd` (and the `KONG_*` environment forms), or are given programmatically; an entry
  without start_cmd is managed externally (Kong only warns);
* discovery runs query_cmd through a shell with the full environment (the nginx master's),
  reads stdout only, decodes JSON, takes
  `(dump.Plugins or dump)[1]` and checks Version/Priority/Schema (kongsim.metaschema);
* the server is spawned as `exec <start_cmd>` through /bin/sh with a near-empty environment
  (nginx keeps only TZ, plus the `env NAME` / `env NAME=value` directives Kong renders from
  `nginx_main_env`, see `nginx_env_directives`), stdout+stderr merged and copied into the
  log line by line as `[<name>:<pid>] ...`, respawned no faster than once per second, and
  stopped with SIGTERM.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Mapping

from kongsim import metaschema, redact

log = redact.get_logger("kongsim.process")

DEFAULT_PREFIX = "/usr/local/kong"
RESPAWN_INTERVAL_S = 1.0  # process.lua: next_spawn = now + 1


class DiscoveryError(RuntimeError):
    """query_cmd failed or printed something Kong would not accept."""


@dataclasses.dataclass
class PluginServerEntry:
    """One `pluginserver_names` entry. `start_cmd=None` means managed externally."""
    name: str
    socket: str
    query_cmd: str
    start_cmd: str | None = None
    # arguments of nginx `env` directives: "NAME" copies NAME from our environment,
    # "NAME=value" sets it (nginx_env_directives reads them from nginx_main_env)
    env_passthrough: tuple[str, ...] = ()


@dataclasses.dataclass
class PluginInfo:
    """The first plugin of a query_cmd dump, validated."""
    name: str
    priority: int
    version: str
    schema: dict[str, Any]
    phases: list[str]
    server: str  # the entry name

    @property
    def config_fields(self) -> list[dict[str, Any]]:
        return metaschema.config_fields({"Schema": self.schema})


# ----------------------------------------------------------------------------- kong.conf

def _conf_value(raw: str) -> str:
    # kong.conf: `#` starts a comment unless escaped as `\#` (kong/conf_loader).
    out = re.split(r"(?<!\\)#", raw, maxsplit=1)[0]
    return out.replace("\\#", "#").strip()


def parse_kong_conf(text: str, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """`key = value` lines; KONG_<KEY> environment variables override the file, like Kong."""
    conf: dict[str, str] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if "=" not in stripped:
            raise ValueError(f"kong.conf line {lineno}: expected 'key = value'")
        key, value = stripped.split("=", 1)
        conf[key.strip().lower()] = _conf_value(value)
    for key, value in (environ or {}).items():
        if key.startswith("KONG_"):
            conf[key[5:].lower()] = value
    return conf


def entries_from_conf(conf: Mapping[str, str]) -> list[PluginServerEntry]:
    """Pluginserver entries from parsed kong.conf keys (defaults as in Kong 3.9, §1.1)."""
    names_raw = conf.get("pluginserver_names", "")
    if not names_raw or names_raw.lower() == "off" or names_raw == "NONE":
        return []
    prefix = conf.get("prefix", DEFAULT_PREFIX)
    passthrough = nginx_env_directives(conf.get("nginx_main_env", ""))
    entries = []
    for name in [n.strip() for n in names_raw.split(",") if n.strip()]:
        key = "pluginserver_" + name.lower().replace("-", "_")
        query_cmd = conf.get(key + "_query_cmd")
        default_bin = f"/usr/local/bin/{name}"
        if not query_cmd and os.path.exists(default_bin):
            query_cmd = default_bin + " -dump"
        if not query_cmd:
            raise ValueError(f"query_command undefined for pluginserver {name}")
        start_cmd = conf.get(key + "_start_cmd") or (default_bin if os.path.exists(default_bin) else None)
        socket_path = conf.get(key + "_socket") or f"{prefix}/{name}.socket"
        entries.append(PluginServerEntry(name, socket_path, query_cmd, start_cmd, passthrough))
    return entries


def load_kong_conf(path: str | Path, environ: Mapping[str, str] | None = None
                   ) -> tuple[dict[str, str], list[PluginServerEntry]]:
    conf = parse_kong_conf(Path(path).read_text(), environ)
    return conf, entries_from_conf(conf)


# ----------------------------------------------------------------------------- environment

_NGINX_SPACE = " \t\r\n"
_NGINX_ESCAPES = {'"': '"', "'": "'", "\\": "\\", "t": "\t", "r": "\r", "n": "\n"}


def _nginx_unescape(raw: str) -> str:
    # ngx_conf_read_token copies a token turning \" \' \\ \t \r \n into the character; any
    # other backslash stays as it is.
    out, i = [], 0
    while i < len(raw):
        if raw[i] == "\\" and i + 1 < len(raw) and raw[i + 1] in _NGINX_ESCAPES:
            out.append(_NGINX_ESCAPES[raw[i + 1]])
            i += 2
        else:
            out.append(raw[i])
            i += 1
    return "".join(out)


def _nginx_directives(text: str) -> list[list[str]]:
    """Split nginx.conf text into directives (lists of tokens) like ngx_conf_read_token.

    Raises ValueError where nginx would refuse to start (a stray `;`, a block, an open quote, no
    final `;`)."""
    directives: list[list[str]] = []
    args: list[str] = []
    i, n = 0, len(text)
    while True:
        while i < n and text[i] in _NGINX_SPACE:
            i += 1
        if i >= n:
            if args:
                raise ValueError('unexpected end of file, expecting ";" or "}"')
            return directives
        ch = text[i]
        if ch == "#":  # a comment only where a token starts; `A#B` is one token
            while i < n and text[i] != "\n":
                i += 1
            continue
        if ch in ";{}":
            if ch == ";" and args:
                directives.append(args)
                args = []
                i += 1
                continue
            if ch == "{" and args:
                raise ValueError(f'directive "{args[0]}" is not terminated by ";"')
            raise ValueError(f'unexpected "{ch}"')
        if ch in "\"'":
            j = i + 1
            while j < n and text[j] != ch:
                j += 2 if text[j] == "\\" else 1
            if j >= n:
                raise ValueError("unexpected end of file, expecting \";\" or \"}\"")
            args.append(_nginx_unescape(text[i + 1:j]))
            i = j + 1
            # nginx wants a space, `;` or `{` right after a closing quote
            if i < n and text[i] not in _NGINX_SPACE + ";{":
                raise ValueError(f'unexpected "{text[i]}"')
            continue
        j, variable = i, False
        while j < n:
            c = text[j]
            if c == "\\":
                j += 2
                variable = False
                continue
            if c == "{" and variable:  # ${name} stays inside the token
                j += 1
                continue
            variable = c == "$"
            if c in _NGINX_SPACE or c in ";{":
                break
            j += 1
        args.append(_nginx_unescape(text[i:min(j, n)]))
        i = j


def nginx_env_directives(value: str) -> tuple[str, ...]:
    """The arguments of the `env` directives nginx reads from kong.conf's `nginx_main_env`.

    Kong renders every `nginx_main_<directive> = <value>` as `<directive> <value>;` in
    nginx.conf's main block (templates/nginx.lua), so `A; env B=1; env C` becomes three `env`
    directives: ("A", "B=1", "C"). `NONE` (Kong) or an empty value renders nothing. Raises
    ValueError for what nginx would refuse at startup: a stray `;` (`A;`), an `env` without
    exactly one argument, a block, an open quote, or a directive name nginx cannot know (all
    nginx directives are lower case, so `A; B` is "unknown directive "B""). Other lower-case
    directives are not about the environment and are left out.
    """
    if not value.strip() or value == "NONE":
        return ()
    rendered = f"env {value};"
    try:
        directives = _nginx_directives(rendered)
    except ValueError as exc:
        raise ValueError(f"nginx_main_env: nginx rejects `{rendered}`: {exc}") from None
    out = []
    for args in directives:
        name = args[0]
        if name == "env":
            if len(args) != 2:
                raise ValueError(f'nginx_main_env: invalid number of arguments in "env" directive '
                                 f"(env {' '.join(args[1:])}); one variable per `env`, e.g. "
                                 f'"A; env B"')
            out.append(args[1])
        elif name != name.lower():
            raise ValueError(f'nginx_main_env: unknown directive "{name}" (write "...; env {name}")')
        else:
            log.debug("nginx_main_env renders a %r directive; it does not touch the environment",
                      name)
    return tuple(out)


def child_environment(entry: PluginServerEntry, environ: Mapping[str, str] | None = None
                      ) -> dict[str, str]:
    """The environment nginx gives a worker, and so start_cmd (ngx_set_environment).

    Only TZ survives unless an `env` directive names it; `env NAME` copies NAME from `environ`
    when set there, `env NAME=value` sets it. nginx puts duplicates into the environment in
    directive order and /bin/sh (which runs the commands) keeps the last, so later ones win.
    """
    env_src = os.environ if environ is None else environ
    args = list(entry.env_passthrough)
    if not any(a == "TZ" or a.startswith("TZ=") for a in args):
        args.append("TZ")
    env: dict[str, str] = {}
    for arg in args:
        name, eq, value = arg.partition("=")
        if not name:
            continue  # nginx would pass "=value", which no shell imports as a variable
        if eq:
            env[name] = value
        elif name in env_src:
            env[name] = env_src[name]
    return env


# ----------------------------------------------------------------------------- discovery

def discover(entry: PluginServerEntry, timeout_s: float = 60.0,
             environ: Mapping[str, str] | None = None) -> PluginInfo:
    """Run query_cmd like Kong (shell, stdout only, JSON, first plugin) and validate it.

    Kong runs it with io.popen from the nginx master's init (reference §1.2), and the master keeps
    the environment it was started with: only the workers (and so start_cmd) get nginx's cleared
    environment. So query_cmd sees all of `environ`, and a variable missing from nginx_main_env
    reaches query_cmd but not the plugin server, exactly as on Kong."""
    try:
        proc = subprocess.run(["/bin/sh", "-c", entry.query_cmd], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, env=dict(os.environ if environ is None else environ),
                              timeout=timeout_s, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise DiscoveryError(f"pluginserver '{entry.name}': query_cmd did not finish in "
                             f"{timeout_s:.0f} s") from None
    if proc.stderr:
        log.debug("[%s] query_cmd stderr: %s", entry.name,
                  proc.stderr.decode("utf-8", "replace")[-2000:])
    out = proc.stdout.decode("utf-8", "replace")
    try:
        dump = json.loads(out)
    except ValueError:
        snippet = out.strip()[:200] or "(empty stdout)"
        raise DiscoveryError(f"pluginserver '{entry.name}': Not a plugin info table "
                             f"(query_cmd exit status {proc.returncode}, stdout: {snippet!r})") from None
    plugins = dump.get("Plugins") if isinstance(dump, dict) else dump
    if not isinstance(plugins, list) or not plugins or not isinstance(plugins[0], dict):
        raise DiscoveryError(f"pluginserver '{entry.name}': Not a plugin info table "
                             f"(expected a JSON array of plugin info objects)")
    if isinstance(dump, dict) and dump.get("Protocol", "MsgPack:1") != "MsgPack:1":
        raise DiscoveryError(f"pluginserver '{entry.name}': protocol {dump['Protocol']!r} is not "
                             f"supported (only MsgPack:1)")
    if len(plugins) > 1:
        # Kong 3.9+ registers only the first one (reference §1.2)
        log.warning("pluginserver '%s' reports %d plugins; Kong 3.9+ uses only the first (%s)",
                    entry.name, len(plugins), plugins[0].get("Name"))
    info = plugins[0]
    try:
        metaschema.validate_plugin_schema(info)
    except metaschema.SchemaError as exc:
        raise DiscoveryError(f"pluginserver '{entry.name}': {exc}") from None
    return PluginInfo(info["Name"], int(info["Priority"]), info["Version"], info["Schema"],
                      list(info.get("Phases") or []), entry.name)


# ----------------------------------------------------------------------------- processes

class ManagedServer:
    """Spawns, watches and respawns one plugin server like Kong's worker 0 does."""

    def __init__(self, entry: PluginServerEntry, environ: Mapping[str, str] | None = None) -> None:
        if not entry.start_cmd:
            raise ValueError(f"pluginserver '{entry.name}' has no start_cmd (managed externally)")
        self.entry = entry
        self.environ = environ
        self.proc: subprocess.Popen[bytes] | None = None
        self.spawn_count = 0
        self.spawn_times: list[float] = []  # monotonic; respawn is limited to once a second
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"kongsim-ps-{self.entry.name}",
                                        daemon=True)
        self._thread.start()

    def _spawn(self) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(["/bin/sh", "-c", "exec " + str(self.entry.start_cmd)],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL,
                                env=child_environment(self.entry, self.environ))
        self.spawn_count += 1
        self.spawn_times.append(time.monotonic())
        log.info("started pluginserver '%s', pid %d", self.entry.name, proc.pid)
        threading.Thread(target=self._pump, args=(proc,), daemon=True,
                         name=f"kongsim-ps-log-{self.entry.name}").start()
        return proc

    def _pump(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        for raw in iter(proc.stdout.readline, b""):
            line = raw.decode("utf-8", "replace").rstrip("\n")
            # Kong logs these at INFO (invisible at the default log_level=notice).
            log.info("[%s:%d] %s", self.entry.name, proc.pid, line)
        proc.stdout.close()

    def _run(self) -> None:
        next_spawn = 0.0
        while not self._stopping.is_set():
            wait = next_spawn - time.monotonic()
            if wait > 0 and self._stopping.wait(wait):
                break
            next_spawn = time.monotonic() + RESPAWN_INTERVAL_S
            with self._lock:
                if self._stopping.is_set():
                    break
                try:
                    self.proc = self._spawn()
                except OSError as exc:
                    log.error("pluginserver '%s' could not be spawned: %s", self.entry.name, exc)
                    continue
            code = self.proc.wait()
            if self._stopping.is_set():
                break
            level = log.error if code == 127 else log.warning
            level("external pluginserver '%s' terminated: exit code %s", self.entry.name, code)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """For tests: kill the current process (the watcher respawns it)."""
        with self._lock:
            if self.proc and self.proc.poll() is None:
                self.proc.send_signal(sig)

    def stop(self, timeout_s: float = 5.0) -> None:
        """SIGTERM like Kong's exit_worker; SIGKILL if it is still alive after timeout_s."""
        self._stopping.set()
        with self._lock:
            proc = self.proc
        if proc and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout_s)
            log.info("successfully stopped pluginserver '%s', pid %d", self.entry.name, proc.pid)
        if self._thread:
            self._thread.join(timeout_s)


def wait_for_socket(path: str, timeout_s: float = 30.0, proc: ManagedServer | None = None) -> None:
    """Block until something accepts connections on the Unix socket (Kong does not wait, §1.4)."""
    deadline = time.monotonic() + timeout_s
    last_err: Exception | None = None
    while time.monotonic() < deadline:
        if os.path.exists(path):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.settimeout(1.0)
                s.connect(path)
                return
            except OSError as exc:
                last_err = exc
            finally:
                s.close()
        time.sleep(0.05)
    raise TimeoutError(f"plugin server socket {path} not ready after {timeout_s:.0f} s"
                       + (f" ({last_err})" if last_err else "")
                       + (f"; process spawned {proc.spawn_count} time(s)" if proc else ""))
