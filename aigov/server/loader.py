"""Finding and loading plugin modules (the kong-pdk module contract, reference §3.1).

A plugin module is a `<kong-name>.py` file defining `class Plugin`, `version`, `priority` and
`Schema`. The info object built here is exactly what kong-pdk's `get_plugin_info` returns, so
`aigov dump` and `--dump` of the stock dedicated server print the same JSON.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Iterator

# kong-pdk's fixed phase order (module.py); the dump lists the ones the Plugin class defines.
PHASES = ("certificate", "rewrite", "log", "access", "preread", "response")
PLUGINS_DIR_ENV = "AIGOV_PLUGINS_DIR"
_VERSION_RE = re.compile(r"^\d+(\.\d+){0,2}$")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


class PluginLoadError(Exception):
    """A plugin module that cannot be served; the message names the file and the reason."""


@dataclass
class LoadedPlugin:
    name: str
    path: Path
    module: ModuleType
    plugin_class: type
    version: str
    priority: int
    schema: list[Any]
    phases: list[str]
    load_time: float = field(default_factory=time.time)
    mtime: float = 0.0

    def info(self) -> dict[str, Any]:
        """The plugin info object Kong reads from query_cmd (§1.2) and GetPluginInfo returns."""
        return {
            "Name": self.name,
            "Phases": list(self.phases),
            "Priority": self.priority,
            "Version": self.version,
            "Schema": {
                "name": self.name,
                "fields": [{"config": {"type": "record", "fields": self.schema}}],
            },
        }


def default_plugins_dir() -> Path:
    """$AIGOV_PLUGINS_DIR, else the repository's plugins/ next to the aigov package."""
    env = os.environ.get(PLUGINS_DIR_ENV)
    if env:
        return Path(env)
    return Path(__file__).resolve().parent.parent.parent / "plugins"


def discover(plugins_dir: Path) -> dict[str, Path]:
    """Plugin name -> file for every `*.py` in the directory (sorted, unlike os.listdir)."""
    if not plugins_dir.is_dir():
        raise PluginLoadError(f"plugins directory {plugins_dir} does not exist")
    found: dict[str, Path] = {}
    for path in sorted(plugins_dir.iterdir()):
        if path.suffix == ".py" and path.is_file() and _NAME_RE.match(path.stem):
            found[path.stem] = path
    return found


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """Send everything written to stdout (Python and C level) to stderr for the duration.

    Kong parses all of query_cmd's stdout as JSON (§1.3); a plugin that prints at import time
    must not corrupt it.
    """
    sys.stdout.flush()
    saved_fd = os.dup(1)
    try:
        os.dup2(2, 1)
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved_fd, 1)
        os.close(saved_fd)


def _module_name(name: str) -> str:
    return "aigov_kong_plugin_" + re.sub(r"\W", "_", name)


def load_plugin(name: str, path: Path) -> LoadedPlugin:
    """Import one plugin module and validate what Kong validates (§1.2): version, priority."""
    module_name = _module_name(name)
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise PluginLoadError(f"{path}: not a loadable Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        with stdout_to_stderr():
            spec.loader.exec_module(module)
    except BaseException as exc:  # noqa: BLE001 - SystemExit at import must not end `aigov serve`
        sys.modules.pop(module_name, None)
        raise PluginLoadError(f"{path}: import failed: {type(exc).__name__}: {exc}") from exc

    plugin_class = getattr(module, "Plugin", None)
    if not isinstance(plugin_class, type):
        raise PluginLoadError(f"{path}: defines no class Plugin")
    version = getattr(module, "version", None)
    if not isinstance(version, str) or not _VERSION_RE.match(version):
        raise PluginLoadError(
            f"{path}: version must be a string of 1 to 3 dotted numbers (Kong rejects {version!r})")
    priority = getattr(module, "priority", 0)
    if not isinstance(priority, int) or isinstance(priority, bool):
        raise PluginLoadError(f"{path}: priority must be an integer (Kong rejects {priority!r})")
    schema = getattr(module, "Schema", [])
    if not isinstance(schema, (list, tuple)) or not all(
            isinstance(item, dict) and len(item) == 1 for item in schema):
        raise PluginLoadError(f"{path}: Schema must be a list of single-key dicts")
    phases = [phase for phase in PHASES if hasattr(plugin_class, phase)]
    return LoadedPlugin(
        name=name, path=path, module=module, plugin_class=plugin_class, version=version,
        priority=priority, schema=list(schema), phases=phases, mtime=path.stat().st_mtime,
    )


def load_plugins(plugins_dir: Path, names: list[str] | None = None) -> dict[str, LoadedPlugin]:
    """Load the named plugins (all of the directory when `names` is None); fail on the first error."""
    available = discover(plugins_dir)
    if names is None:
        names = list(available)
    missing = [n for n in names if n not in available]
    if missing:
        raise PluginLoadError(
            f"no plugin module {', '.join(missing)} in {plugins_dir} "
            f"(available: {', '.join(available) or 'none'})")
    if not names:
        raise PluginLoadError(f"no plugin modules (*.py) in {plugins_dir}")
    return {name: load_plugin(name, available[name]) for name in names}
