"""Kong's checks on an external plugin's info and Schema, and Kong's config processing.

Two jobs, both done by Kong before a plugin server ever sees a config:

* `validate_plugin_schema(info)`: what `kong/db/dao/plugins.lua` and `MetaSchema.MetaSubSchema`
  (`kong/db/schema/metaschema.lua`) check on the query_cmd output (reference
  kong-plugin-server.md §1.2 and §2.9): Version a 1-3 part dotted string, Priority an integer,
  every field a known type with its required companions, only known attributes, attributes
  allowed for the type, `description` 10..500 characters.
* `process_config(schema_fields, config)`: what `Schema:process_auto_fields` + `Schema:validate`
  do to a plugin's `config` (reference §2.5): unknown keys rejected, types checked, validators
  applied, defaults filled, records filled recursively, unset fields as null, arrays keep `[]`.
  All field errors are collected and raised together, like Kong's "schema violation" message.

Vault references (`{vault://env/NAME}`) in `referenceable` fields are resolved by
`resolve_references` (Kong's env vault, reference §2.5, `kong/vaults/env/init.lua`).
"""
from __future__ import annotations

import copy
import json
import math
import os
import re
from typing import Any, Mapping

FIELD_TYPES = {"string", "number", "integer", "boolean", "array", "set", "map", "record",
               "json", "foreign"}

# Attributes MetaSchema accepts on a field (metaschema.lua `field_schema` + validators).
GENERIC_ATTRIBUTES = {
    "type", "required", "default", "description", "examples", "deprecation", "referenceable",
    "encrypted", "immutable", "auto", "unique", "err", "abstract", "generate_admin_api", "reference",
    "on_delete", "unique_across_ws",
}
# Validators and the types each applies to (metaschema.lua `attribute_types`).
VALIDATOR_TYPES: dict[str, set[str]] = {
    "between": {"integer", "number"},
    "gt": {"integer", "number"},
    "eq": {"string", "number", "integer", "boolean"},
    "ne": {"string", "number", "integer", "boolean"},
    "len_eq": {"string", "array", "set", "map"},
    "len_min": {"string", "array", "set", "map"},
    "len_max": {"string", "array", "set", "map"},
    "match": {"string"}, "not_match": {"string"}, "match_all": {"string"},
    "match_any": {"string"}, "match_none": {"string"}, "starts_with": {"string"},
    "is_regex": {"string"}, "uuid": {"string"},
    "one_of": {"string", "number", "integer"},
    "not_one_of": {"string", "number", "integer"},
    "contains": {"array", "set"},
    "timestamp": {"number", "integer"},
    "mutually_exclusive_subsets": {"set"},
}
COMPANIONS = {"array": ("elements",), "set": ("elements",), "map": ("keys", "values"),
              "record": ("fields",), "json": ("json_schema",)}
COMPANION_TYPES = {"elements": {"array", "set"}, "keys": {"map"}, "values": {"map"},
                   "fields": {"record"}, "entity_checks": {"record"}, "json_schema": {"json"},
                   "shorthand_fields": {"record"}}

DESCRIPTION_MIN, DESCRIPTION_MAX = 10, 500
_VERSION_RE = re.compile(r"^\d+(\.\d+){0,2}$")


class SchemaError(ValueError):
    """The plugin info or Schema would make Kong refuse to load the plugin."""

    def __init__(self, plugin: str, problems: list[str]) -> None:
        self.plugin = plugin
        self.problems = problems
        super().__init__(f"plugin '{plugin}': invalid plugin info: " + "; ".join(problems))


class ConfigError(ValueError):
    """A plugin config that Kong would reject; `errors` maps `config.a.b` paths to messages."""

    def __init__(self, errors: dict[str, str], plugin: str | None = None) -> None:
        self.errors = errors
        self.plugin = plugin
        listing = "; ".join(f"{path}: {msg}" for path, msg in sorted(errors.items()))
        prefix = f"plugin '{plugin}': " if plugin else ""
        super().__init__(f"{prefix}schema violation ({listing})")


# --------------------------------------------------------------------------- plugin info checks

def validate_plugin_schema(info: Mapping[str, Any]) -> None:
    """Raise SchemaError unless Kong would accept this query_cmd info object (§1.2, §2.9)."""
    name = str(info.get("Name") or "?")
    problems: list[str] = []
    if not isinstance(info.get("Name"), str) or not info.get("Name"):
        problems.append("Name must be a non-empty string")
    version = info.get("Version")
    if not isinstance(version, str) or not _VERSION_RE.match(version):
        problems.append(f"Version must be a dotted string of 1 to 3 numbers, got {version!r}")
    priority = info.get("Priority")
    if isinstance(priority, bool) or not isinstance(priority, (int, float)) \
            or not math.isfinite(priority) or int(priority) != priority:
        problems.append(f"Priority must be an integer, got {priority!r}")
    phases = info.get("Phases", [])
    if not isinstance(phases, list):
        problems.append("Phases must be an array")
    elif "response" in phases and ("header_filter" in phases or "body_filter" in phases):
        problems.append("a plugin cannot implement response together with header_filter/body_filter")
    schema = info.get("Schema")
    if not isinstance(schema, dict):
        problems.append("Schema must be an object")
    else:
        fields = schema.get("fields")
        if not isinstance(fields, list):
            problems.append("Schema.fields must be an array")
        else:
            _check_fields(fields, "Schema.fields", problems)
            if not any(isinstance(f, dict) and "config" in f for f in fields):
                problems.append("Schema.fields has no 'config' record")
    if problems:
        raise SchemaError(name, problems)


def config_fields(info: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The `config` record's field list of a validated plugin info object."""
    for item in info["Schema"]["fields"]:
        if "config" in item:
            return list(item["config"].get("fields") or [])
    return []


def _check_fields(fields: list[Any], path: str, problems: list[str]) -> None:
    seen: set[str] = set()
    for i, item in enumerate(fields):
        if not isinstance(item, dict) or len(item) != 1:
            problems.append(f"{path}[{i}]: each field must be a single-key object")
            continue
        (fname, spec), = item.items()
        if fname in seen:
            problems.append(f"{path}.{fname}: duplicate field name")
        seen.add(fname)
        _check_field(spec, f"{path}.{fname}", problems)


def _check_field(spec: Any, path: str, problems: list[str]) -> None:
    if not isinstance(spec, dict):
        problems.append(f"{path}: field definition must be an object")
        return
    ftype = spec.get("type")
    if ftype not in FIELD_TYPES:
        problems.append(f"{path}: unknown type {ftype!r}")
        return
    for companion in COMPANIONS.get(ftype, ()):
        if companion not in spec:
            problems.append(f"{path}: type {ftype} requires '{companion}'")
    for attr, value in spec.items():
        if attr in GENERIC_ATTRIBUTES:
            continue
        if attr in VALIDATOR_TYPES:
            if ftype not in VALIDATOR_TYPES[attr]:
                problems.append(f"{path}: attribute '{attr}' is not allowed for type {ftype}")
            elif attr == "between" and not (isinstance(value, list) and len(value) == 2):
                problems.append(f"{path}: 'between' must be [min, max]")
            elif attr in ("one_of", "not_one_of") and not isinstance(value, list):
                problems.append(f"{path}: '{attr}' must be an array")
            continue
        if attr in COMPANION_TYPES:
            if ftype not in COMPANION_TYPES[attr]:
                problems.append(f"{path}: attribute '{attr}' is not allowed for type {ftype}")
            continue
        problems.append(f"{path}: unknown attribute '{attr}'")
    desc = spec.get("description")
    if desc is not None:
        if not isinstance(desc, str) or not DESCRIPTION_MIN <= len(desc) <= DESCRIPTION_MAX:
            problems.append(f"{path}: description must be a string of {DESCRIPTION_MIN} to "
                            f"{DESCRIPTION_MAX} characters")
    if spec.get("referenceable") and ftype != "string":
        problems.append(f"{path}: 'referenceable' is only allowed for type string")
    if ftype in ("array", "set") and isinstance(spec.get("elements"), dict):
        _check_field(spec["elements"], f"{path}.elements", problems)
    if ftype == "map":
        for part in ("keys", "values"):
            if isinstance(spec.get(part), dict):
                _check_field(spec[part], f"{path}.{part}", problems)
    if ftype == "record":
        if isinstance(spec.get("fields"), list):
            _check_fields(spec["fields"], path, problems)
        elif "fields" in spec:
            problems.append(f"{path}: 'fields' must be an array")
    if "default" in spec and spec["default"] is not None:
        errs: dict[str, str] = {}
        _validate_value(spec, copy.deepcopy(spec["default"]), path + ".default", errs)
        problems.extend(f"{p}: {m}" for p, m in errs.items())


# --------------------------------------------------------------------------- config processing

def process_config(schema_fields: list[dict[str, Any]], config: Mapping[str, Any] | None,
                   plugin: str | None = None) -> dict[str, Any]:
    """Kong's processed plugin config: validated, defaults filled, unset fields as None.

    Raises ConfigError listing every field error (Kong reports them all at once).
    """
    if config is None:
        config = {}
    errors: dict[str, str] = {}
    if not isinstance(config, Mapping):
        raise ConfigError({"config": "expected a record"}, plugin)
    out = _process_record(schema_fields, dict(config), "config", errors)
    if errors:
        raise ConfigError(errors, plugin)
    return out


def _process_record(fields: list[dict[str, Any]], data: dict[str, Any], path: str,
                    errors: dict[str, str]) -> dict[str, Any]:
    known = {}
    for item in fields:
        (fname, spec), = item.items()
        known[fname] = spec
    for key in data:
        if key not in known:
            errors[f"{path}.{key}"] = "unknown field"
    out: dict[str, Any] = {}
    for fname, spec in known.items():
        fpath = f"{path}.{fname}"
        out[fname] = _process_field(spec, data.get(fname), fpath, errors, present=fname in data)
    return out


def _process_field(spec: dict[str, Any], value: Any, path: str, errors: dict[str, str],
                   present: bool = True) -> Any:
    ftype = spec["type"]
    if value is None:
        if "default" in spec and spec["default"] is not None:
            value = copy.deepcopy(spec["default"])
        elif ftype == "record" and (not present or spec.get("required")):
            # Kong builds absent records from their sub-fields' defaults (adjust_field_for_context).
            value = {}
        else:
            if spec.get("required"):
                errors[path] = "required field missing"
            return None
    return _validate_value(spec, value, path, errors)


def _validate_value(spec: dict[str, Any], value: Any, path: str, errors: dict[str, str]) -> Any:
    ftype = spec["type"]
    if ftype == "string":
        if not isinstance(value, str):
            errors[path] = "expected a string"
            return value
    elif ftype == "integer":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
            errors[path] = "expected an integer"
            return value
        value = int(value)
    elif ftype == "number":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            errors[path] = "expected a number"
            return value
    elif ftype == "boolean":
        if not isinstance(value, bool):
            errors[path] = "expected a boolean"
            return value
    elif ftype in ("array", "set"):
        if isinstance(value, dict) and not value:
            value = []  # an empty JSON object and an empty array are the same Lua table
        if not isinstance(value, list):
            errors[path] = f"expected {'an array' if ftype == 'array' else 'a set'}"
            return value
        elem = spec.get("elements") or {"type": "string"}
        value = [_validate_value(elem, v, f"{path}[{i + 1}]", errors) if v is not None else v
                 for i, v in enumerate(value)]
        if ftype == "set":
            deduped: list[Any] = []
            for v in value:
                if v not in deduped:
                    deduped.append(v)
            value = deduped
    elif ftype == "map":
        if isinstance(value, list) and not value:
            value = {}
        if not isinstance(value, dict):
            errors[path] = "expected a map"
            return value
        kspec, vspec = spec.get("keys") or {"type": "string"}, spec.get("values") or {"type": "string"}
        value = {_validate_value(kspec, k, f"{path}.{k}", errors):
                 _validate_value(vspec, v, f"{path}.{k}", errors) for k, v in value.items()}
    elif ftype == "record":
        if not isinstance(value, dict):
            errors[path] = "expected a record"
            return value
        record = _process_record(spec.get("fields") or [], value, path, errors)
        _run_entity_checks(spec, record, path, errors)
        return record
    elif ftype == "json":
        pass
    before = errors.get(path)
    _apply_validators(spec, value, path, errors)
    if spec.get("err") and errors.get(path) != before:
        errors[path] = spec["err"]  # Schema:validate_field returns `field.err or err` for a validator
    return value


# --------------------------------------------------------------------------- entity checks

def _run_entity_checks(spec: dict[str, Any], record: dict[str, Any], path: str,
                       errors: dict[str, str]) -> None:
    """A record's `entity_checks`, as Kong's Schema:validate runs them on a nested record after
    its fields (kong/db/schema/init.lua `entity_checkers`, `run_entity_check`). Field errors go
    to `path.field`; the check's own message to `path.@entity` (Kong's "@entity" list, joined).
    Unset fields are null here, as after Kong's process_auto_fields, so no check is skipped as
    missing. The checks a JSON schema can carry are run; any other name is refused loudly."""
    fields = {name: fspec for item in spec.get("fields") or [] for name, fspec in item.items()}
    entity: list[str] = []
    for check in spec.get("entity_checks") or []:
        (name, arg), = check.items()
        if name == "conditional":
            message = _conditional(arg, fields, record, path, errors)
        elif name == "conditional_at_least_one_of":
            message = _conditional_at_least_one_of(arg, fields, record)
        elif name == "mutually_exclusive_sets":
            sets = [[f for f in arg[key] if _is_nonempty(record.get(f))] for key in ("set1", "set2")]
            message = (f"these sets are mutually exclusive: ({_quoted(sets[0])}), ({_quoted(sets[1])})"
                       if sets[0] and sets[1] else None)
        elif name in _LIST_CHECKS:
            present = [f for f in arg if _is_nonempty(record.get(f))]
            ok, template = _LIST_CHECKS[name](present, arg, record)
            message = None if ok else template.format(_quoted(arg))
        else:
            message = f"the Kong stand-in does not run entity check {name!r}"
        if message and message not in entity:
            entity.append(message)
    if entity:
        errors[f"{path}.@entity"] = "; ".join(entity)


def _is_nonempty(value: Any) -> bool:
    return value is not None and value != "" and value != [] and value != {}


def _quoted(names: list[str]) -> str:
    return ", ".join(f"'{n}'" for n in names)


def _lua_format(template: str, arg: str) -> str:
    """string.format(template, arg) for a message template: %s is arg, %% a percent sign."""
    return re.sub(r"%(.)", lambda m: arg if m.group(1) == "s" else m.group(1) if m.group(1) == "%" else m.group(0),
                  template)


def _distinct(present: list[str], record: dict[str, Any]) -> bool:
    # Lua table keys: equal strings and numbers (1 and 1.0) collide; two tables never do.
    seen: set[Any] = set()
    for f in present:
        v = record[f]
        if isinstance(v, (dict, list)):
            continue
        key = (isinstance(v, bool), v)  # true and 1 are different Lua keys
        if key in seen:
            return False
        seen.add(key)
    return True


# name -> (present fields, all fields, record) -> (ok, Kong's message template)
_LIST_CHECKS: dict[str, Any] = {
    "at_least_one_of": lambda present, names, rec: (
        bool(present), "at least one of these fields must be non-empty: {}"),
    "only_one_of": lambda present, names, rec: (
        len(present) == 1, "only one of these fields must be non-empty: {}"),
    "mutually_required": lambda present, names, rec: (
        len(present) in (0, len(names)), "all or none of these fields must be set: {}"),
    "distinct": lambda present, names, rec: (
        _distinct(present, rec), "values of these fields must be distinct: {}"),
}


def _conditional_at_least_one_of(arg: dict[str, Any], fields: dict[str, Any], record: dict[str, Any]) -> str | None:
    """Kong's `conditional_at_least_one_of`: then_at_least_one_of when if_field passes if_match,
    else_then_at_least_one_of when it fails if_match and passes else_match."""
    if_value = record.get(arg["if_field"])
    base = fields.get(arg["if_field"], {})
    if _field_error({**base, **arg["if_match"]}, if_value) is None:
        names, err = arg.get("then_at_least_one_of") or [], arg.get("then_err")
    elif arg.get("else_match") is not None and _field_error({**base, **arg["else_match"]}, if_value) is None:
        names, err = arg.get("else_then_at_least_one_of") or [], arg.get("else_then_err")
    else:
        return None
    if any(_is_nonempty(record.get(f)) for f in names):
        return None
    return _lua_format(err, _quoted(names)) if err else f"at least one of these fields must be non-empty: {_quoted(names)}"


def _conditional(arg: dict[str, Any], fields: dict[str, Any], record: dict[str, Any], path: str,
                 errors: dict[str, str]) -> str | None:
    """Kong's `conditional`: when if_field passes if_match (over the field's own definition),
    then_field must pass then_match; `required` on a null then_field skips then_err."""
    if_field, then_field = arg["if_field"], arg["then_field"]
    if _field_error({**fields.get(if_field, {}), **arg["if_match"]}, record.get(if_field)) is not None:
        return None
    generic = f"failed conditional validation given value of field '{if_field}'"
    then_value = record.get(then_field)
    if arg["then_match"].get("required") is True and then_value is None:
        errors[f"{path}.{then_field}"] = "required field missing"
        return generic
    err = _field_error({**fields.get(then_field, {}), **arg["then_match"]}, then_value)
    if err is None:
        return None
    errors[f"{path}.{then_field}"] = err
    then_err = arg.get("then_err")
    return _lua_format(then_err, if_field) if then_err else generic


def _field_error(spec: dict[str, Any], value: Any) -> str | None:
    """Schema:validate_field on one value: None when it passes, else Kong's message."""
    if value is None:  # Kong's null branch: eq (unless null) and required fail, the rest pass
        if spec.get("eq") is not None:
            return f"value must be {spec['eq']}"
        return "required field missing" if spec.get("required") else None
    errs: dict[str, str] = {}
    _validate_value(spec, copy.deepcopy(value), "v", errs)
    return next(iter(errs.values()), None)


def _apply_validators(spec: dict[str, Any], value: Any, path: str, errors: dict[str, str]) -> None:
    ftype = spec["type"]
    if ftype == "string":
        # Kong strings are implicitly len_min = 1 (kong/db/schema/init.lua: empty strings fail).
        len_min = spec.get("len_min", 1)
        if len(value) < len_min:
            errors[path] = f"length must be at least {len_min}"
            return
        if isinstance(value, str) and value.startswith("{vault://") and spec.get("referenceable"):
            return  # a reference is checked after resolution
    elif "len_min" in spec and len(value) < spec["len_min"]:
        errors[path] = f"length must be at least {spec['len_min']}"
        return
    if "len_max" in spec and len(value) > spec["len_max"]:
        errors[path] = f"length must be at most {spec['len_max']}"
    if "len_eq" in spec and len(value) != spec["len_eq"]:
        errors[path] = f"length must be {spec['len_eq']}"
    if "between" in spec:
        lo, hi = spec["between"]
        if not lo <= value <= hi:
            errors[path] = f"value should be between {lo} and {hi}"
    if "gt" in spec and not value > spec["gt"]:
        errors[path] = f"value must be greater than {spec['gt']}"
    if "one_of" in spec and value not in spec["one_of"]:
        errors[path] = "expected one of: " + ", ".join(str(v) for v in spec["one_of"])
    if "not_one_of" in spec and value in spec["not_one_of"]:
        errors[path] = "must not be one of: " + ", ".join(str(v) for v in spec["not_one_of"])
    if "eq" in spec and value != spec["eq"]:
        errors[path] = f"value must be {spec['eq']}"
    if "ne" in spec and value == spec["ne"]:
        errors[path] = f"value must not be {spec['ne']}"
    # Kong's `match` family uses Lua patterns; the common subset (anchors, classes via %) is
    # close enough to regexes for plugin schemas, translated here.
    for attr, must in (("match", True), ("not_match", False)):
        if attr in spec and bool(re.search(_lua_pattern(spec[attr]), value)) != must:
            errors[path] = f"invalid value: {value}"
    if "starts_with" in spec and not value.startswith(spec["starts_with"]):
        errors[path] = f"should start with: {spec['starts_with']}"
    if spec.get("is_regex"):
        try:
            re.compile(value)
        except re.error:
            errors[path] = "not a valid regex: " + value
    if "contains" in spec and spec["contains"] not in value:
        errors[path] = f"expected to contain: {spec['contains']}"


def _lua_pattern(pattern: str) -> str:
    """Translate a Lua pattern's common subset (%d %a %w %s %c %z %. %-, [sets]) into a Python regex."""
    # The C-locale classes of Lua 5.1 (LuaJIT, Kong's Lua): %c is iscntrl, %z the NUL byte.
    classes = {"d": "0-9", "a": "A-Za-z", "w": "A-Za-z0-9", "s": " \\t\\n\\r\\f\\v",
               "l": "a-z", "u": "A-Z", "x": "0-9A-Fa-f", "p": "!-/:-@\\[-`{-~",
               "c": "\\x00-\\x1f\\x7f", "z": "\\x00"}
    out, i, in_set = [], 0, False
    while i < len(pattern):
        ch = pattern[i]
        if ch == "%" and i + 1 < len(pattern):
            nxt = pattern[i + 1]
            if nxt in classes:
                out.append(classes[nxt] if in_set else f"[{classes[nxt]}]")
            else:
                out.append(re.escape(nxt))
            i += 2
            continue
        if ch == "[" and not in_set:
            in_set = True
        elif ch == "]" and in_set:
            in_set = False
        elif ch == "-" and not in_set and out:
            ch = "*?"  # Lua's lazy repetition
        elif ch == "-" and in_set and i + 1 < len(pattern) and pattern[i + 1] == "]":
            ch = "\\-"
        elif ch == "$" and not in_set and i == len(pattern) - 1:
            ch = "\\Z"  # Lua's `$` anchors at the very end; a regex `$` also before a final newline
        out.append(ch)
        i += 1
    return "".join(out)


# --------------------------------------------------------------------------- vault references

_VAULT_RE = re.compile(r"^\{vault://([^/}]+)/([^}]+)\}$")


def resolve_references(schema_fields: list[dict[str, Any]], config: dict[str, Any],
                       environ: Mapping[str, str] | None = None,
                       plugin: str | None = None) -> tuple[dict[str, Any], list[str]]:
    """Replace `{vault://env/NAME}` in referenceable fields with the environment's value.

    Kong resolves references before the config reaches the plugin server (`kong.vault.update`,
    reference §2.5). The env vault upper-cases the name and turns `-` into `_`
    (`kong/vaults/env/init.lua`); `{vault://env/NAME/key}` reads `key` of a JSON value.
    Returns (resolved config, resolved secret values) so callers can redact the secrets.
    Raises ConfigError naming the field and the variable (never the value) when one is missing.
    """
    env = os.environ if environ is None else environ
    errors: dict[str, str] = {}
    secrets: list[str] = []
    out = _resolve_record(schema_fields, copy.deepcopy(config), "config", env, errors, secrets)
    if errors:
        raise ConfigError(errors, plugin)
    return out, secrets


def _resolve_value(spec: dict[str, Any], value: Any, path: str, env: Mapping[str, str],
                   errors: dict[str, str], secrets: list[str]) -> Any:
    ftype = spec.get("type")
    if ftype == "record" and isinstance(value, dict):
        return _resolve_record(spec.get("fields") or [], value, path, env, errors, secrets)
    if ftype in ("array", "set") and isinstance(value, list):
        elem = spec.get("elements") or {}
        return [_resolve_value(elem, v, f"{path}[{i + 1}]", env, errors, secrets)
                for i, v in enumerate(value)]
    if ftype == "string" and isinstance(value, str) and value.startswith("{vault://"):
        if not spec.get("referenceable"):
            errors[path] = "a vault reference is not allowed here (field is not referenceable)"
            return value
        resolved = resolve_reference(value, env, path, errors)
        if resolved is not None:
            secrets.append(resolved)
        return resolved
    return value


def _resolve_record(fields: list[dict[str, Any]], data: dict[str, Any], path: str,
                    env: Mapping[str, str], errors: dict[str, str],
                    secrets: list[str]) -> dict[str, Any]:
    for item in fields:
        (fname, spec), = item.items()
        if fname in data and data[fname] is not None:
            data[fname] = _resolve_value(spec, data[fname], f"{path}.{fname}", env, errors, secrets)
    return data


def resolve_reference(ref: str, env: Mapping[str, str], path: str,
                      errors: dict[str, str]) -> str | None:
    """One `{vault://env/...}` reference; other vaults are reported as unsupported."""
    match = _VAULT_RE.match(ref)
    if not match:
        errors[path] = "invalid vault reference (expected {vault://env/NAME})"
        return None
    vault, rest = match.groups()
    if vault != "env":
        errors[path] = f"vault '{vault}' is not available in the stand-in (only env)"
        return None
    name, _, key = rest.partition("/")
    var = name.upper().replace("-", "_")
    if var not in env:
        errors[path] = f"could not resolve vault reference: environment variable {var} is not set"
        return None
    raw = env[var]
    if not key:
        return raw
    try:
        doc = json.loads(raw)
        value = doc[key]
    except (ValueError, KeyError, TypeError):
        errors[path] = f"could not resolve vault reference: {var} has no JSON key '{key}'"
        return None
    return str(value)


def secret_paths(schema_fields: list[dict[str, Any]], prefix: str = "") -> list[str]:
    """Dotted paths of `encrypted` fields: their values are secrets, never logged."""
    out: list[str] = []
    for item in schema_fields:
        (fname, spec), = item.items()
        p = f"{prefix}{fname}"
        if spec.get("encrypted"):
            out.append(p)
        if spec.get("type") == "record":
            out.extend(secret_paths(spec.get("fields") or [], p + "."))
    return out
