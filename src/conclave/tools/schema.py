"""From a typed Python function to a JSON schema a model can fill in, and back.

The arguments of a tool are described once, by the function's signature and
docstring.  :func:`build_arguments` turns them into a pydantic model created on
the fly, so the schema the model sees and the validation its answer goes
through come from the same source and cannot drift apart.

Schema post-processing lives here too:

* :func:`clean_schema` drops pydantic's ``title`` keywords (tokens the model
  pays for and learns nothing from);
* :func:`inline_refs` replaces ``$ref`` pointers with the definitions they name
  (grammar converters such as llama.cpp's prefer a self-contained schema);
  a recursive definition cannot be inlined and stays under ``$defs``;
* :func:`to_strict` rewrites a schema into OpenAI's ``strict`` subset: every
  object closed (``additionalProperties: false``), every property required,
  optional ones made nullable, ``default`` removed (it is named in the
  description instead) and constraint keywords the subset lacks dropped (the
  pydantic validation that follows still enforces them);
* :func:`drop_null_defaults` undoes the nullable trick on the way back: a
  ``null`` sent for a parameter that has a default but does not accept
  ``None`` means "use the default".
"""

from __future__ import annotations

import copy
import inspect
import json
import keyword
import re
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Annotated, Any

import pydantic
from pydantic import BaseModel, ConfigDict
from pydantic.fields import FieldInfo

from conclave.tools.errors import StrictSchemaError, ToolDefinitionError

# --- docstrings -------------------------------------------------------------------------

_PARAM_SECTIONS = {"args", "arguments", "parameters", "params", "keyword args",
                   "keyword arguments", "other parameters"}
_RETURN_SECTIONS = {"returns", "return", "yields", "yield"}
_OTHER_SECTIONS = {"raises", "raise", "examples", "example", "note", "notes", "see also",
                   "warning", "warnings", "todo", "attributes", "references"}
_ALL_SECTIONS = _PARAM_SECTIONS | _RETURN_SECTIONS | _OTHER_SECTIONS
_GOOGLE_HEADER = re.compile(r"^([A-Za-z][A-Za-z ]*):\s*$")
_GOOGLE_PARAM = re.compile(r"^\*{0,2}(\w+)\s*(?:\(([^)]*)\))?\s*:\s*(.*)$")
_NUMPY_PARAM = re.compile(r"^\*{0,2}(\w+)\s*(?::\s*(.*))?$")
_REST_PARAM = re.compile(r"^:param\s+(?:[^:]*\s)?(\w+)\s*:\s*(.*)$")
_REST_FIELD = re.compile(r"^:(?:returns?|rtype|raises?|type)\b.*$")


@dataclass(frozen=True)
class Docstring:
    """What a docstring says: a description for the tool and one per parameter."""

    description: str
    params: dict[str, str]


def parse_docstring(doc: str | None) -> Docstring:
    """Read a Google-style (also NumPy or reST ``:param:``) docstring.

    The description is the text before the first section, plus the Returns
    section as a sentence (what comes back helps a model decide to call).
    """
    if not doc:
        return Docstring("", {})
    lines = inspect.cleandoc(doc).splitlines()
    params: dict[str, str] = {}
    intro: list[str] = []
    returns: list[str] = []
    i = 0
    section: str | None = None
    numpy = False
    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        header = _section_header(lines, i)
        if header is not None:
            section, skip = header
            numpy = skip == 2
            i += skip
            continue
        rest = _REST_PARAM.match(stripped)
        if rest:
            params[rest.group(1)], i = _continued(lines, i, rest.group(2), indent=_indent(line))
            continue
        if _REST_FIELD.match(stripped):
            i += 1
            while i < len(lines) and lines[i].strip() and _indent(lines[i]) > _indent(line):
                i += 1
            continue
        if section is None:
            intro.append(line)
            i += 1
        elif section in _PARAM_SECTIONS:
            i = _read_param(lines, i, params, numpy=numpy)
        elif section in _RETURN_SECTIONS:
            if stripped:
                returns.append(stripped)
            i += 1
        else:
            i += 1
    description = "\n".join(intro).strip()
    if returns:
        description = f"{description}\n\nReturns: {' '.join(returns)}".strip()
    return Docstring(description, params)


def _section_header(lines: list[str], i: int) -> tuple[str, int] | None:
    """``(section name, lines to skip)`` if a section starts at line ``i``."""
    line = lines[i]
    if _indent(line) > 0:
        return None
    m = _GOOGLE_HEADER.match(line.strip())
    if m and m.group(1).strip().lower() in _ALL_SECTIONS:
        return m.group(1).strip().lower(), 1
    name = line.strip().lower()
    if (name in _ALL_SECTIONS and i + 1 < len(lines)
            and re.fullmatch(r"-{3,}", lines[i + 1].strip())):
        return name, 2
    return None


def _read_param(lines: list[str], i: int, params: dict[str, str], *, numpy: bool) -> int:
    """Read one ``name (type): text`` (or NumPy ``name : type``) entry starting at ``i``."""
    line = lines[i]
    stripped = line.strip()
    if not stripped:
        return i + 1
    google = None if numpy else _GOOGLE_PARAM.match(stripped)
    if google:
        params[google.group(1)], nxt = _continued(lines, i, google.group(3),
                                                  indent=_indent(line))
        return nxt
    numpy = _NUMPY_PARAM.match(stripped)
    if numpy:
        params[numpy.group(1)], nxt = _continued(lines, i, "", indent=_indent(line))
        return nxt
    return i + 1


def _continued(lines: list[str], i: int, first: str, *, indent: int) -> tuple[str, int]:
    """Join the continuation lines (indented deeper than ``indent``) after line ``i``."""
    parts = [first.strip()] if first.strip() else []
    j = i + 1
    while j < len(lines):
        nxt = lines[j]
        if nxt.strip() and _indent(nxt) <= indent:
            break
        if not nxt.strip():
            # a blank line ends the entry unless the next line is still a continuation
            if j + 1 < len(lines) and lines[j + 1].strip() and _indent(lines[j + 1]) > indent:
                j += 1
                continue
            break
        parts.append(nxt.strip())
        j += 1
    return " ".join(parts), j


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


# --- arguments model --------------------------------------------------------------------


@dataclass(frozen=True)
class Param:
    """One parameter of a tool function, as the registry needs it at call time."""

    #: the parameter's name: the JSON property the model fills in
    name: str
    #: the field name in the generated pydantic model (differs when ``name`` would clash)
    field: str
    kind: inspect._ParameterKind
    required: bool


@dataclass(frozen=True)
class Arguments:
    """The arguments of one tool: a pydantic model and how to call the function with it."""

    model: type[BaseModel]
    params: tuple[Param, ...]

    def schema(self) -> dict[str, Any]:
        """The JSON schema of the arguments object, titles removed."""
        return clean_schema(self.model.model_json_schema(by_alias=True))

    def bind(self, values: BaseModel) -> tuple[list[Any], dict[str, Any]]:
        """Positional and keyword arguments for the function, from validated values."""
        args: list[Any] = []
        kwargs: dict[str, Any] = {}
        for p in self.params:
            value = getattr(values, p.field)
            if p.kind is inspect.Parameter.POSITIONAL_ONLY:
                args.append(value)
            else:
                kwargs[p.name] = value
        return args, kwargs


_MODEL_CONFIG = ConfigDict(extra="forbid", protected_namespaces=(), arbitrary_types_allowed=False,
                           populate_by_name=False)


def build_arguments(func: Callable[..., Any], *, tool_name: str,
                    param_docs: dict[str, str] | None = None) -> Arguments:
    """Build the pydantic model of ``func``'s parameters.

    Descriptions come from ``Annotated[..., Field(description=...)]`` first,
    then from the docstring's Args section.  ``*args``/``**kwargs`` and
    unannotated parameters are refused: a model cannot fill in what has no type.
    """
    param_docs = param_docs or {}
    where = f"tool {tool_name!r} ({_qualname(func)})"
    try:
        signature = inspect.signature(func)
    except (TypeError, ValueError) as exc:
        raise ToolDefinitionError(f"{where}: cannot read its signature: {exc}") from exc
    try:
        hints = typing.get_type_hints(func, include_extras=True)
    except Exception as exc:  # NameError for forward refs, TypeError for bad annotations
        raise ToolDefinitionError(
            f"{where}: cannot resolve its type annotations: {type(exc).__name__}: {exc}",
            hint="define the types the annotations name at module level, before the function",
        ) from exc
    fields: dict[str, Any] = {}
    params: list[tuple[inspect.Parameter, str]] = []
    for p in signature.parameters.values():
        if p.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
            star = "*" if p.kind is inspect.Parameter.VAR_POSITIONAL else "**"
            raise ToolDefinitionError(
                f"{where}: parameter {star}{p.name} cannot be described to a model",
                hint="name every argument the tool takes, with a type annotation",
            )
        if p.name not in hints:
            hint = "annotate it, e.g. `name: str`"
            if p.name in ("self", "cls"):
                hint = "make the tool from the bound method: tool(instance.method)"
            raise ToolDefinitionError(f"{where}: parameter {p.name!r} has no type annotation",
                                      hint=hint)
        field_name = _field_name(p.name, set(signature.parameters) | set(fields))
        fields[field_name] = _field(hints[p.name], p, param_docs.get(p.name), field_name)
        params.append((p, field_name))
    try:
        model = pydantic.create_model(  # type: ignore[call-overload]
            f"{_camel(tool_name)}Arguments", __config__=_MODEL_CONFIG, **fields)
        model.model_json_schema()  # fail now, not when the model first asks for it
    except (pydantic.PydanticSchemaGenerationError, pydantic.PydanticUserError,
            TypeError) as exc:
        raise ToolDefinitionError(
            f"{where}: its argument types cannot be turned into a JSON schema: {exc}",
            hint="use JSON-friendly types: str, int, float, bool, list, dict, Literal, Enum, "
                 "pydantic models, dataclasses, typing_extensions.TypedDict",
        ) from exc
    return Arguments(model, tuple(
        Param(p.name, name, p.kind, required=model.model_fields[name].is_required())
        for p, name in params))


def _field(annotation: Any, p: inspect.Parameter, doc: str | None,
           field_name: str) -> tuple[Any, FieldInfo]:
    """``(annotation, FieldInfo)`` for one parameter: its default, alias and description.

    A ``Field(...)`` used as the parameter's default moves into the annotation
    (``Annotated[T, Field(...)]``), where pydantic keeps its default and
    constraints, so the outer FieldInfo can still add the alias and the
    docstring's description.
    """
    default = p.default
    metadata = _annotated_metadata(annotation)
    if isinstance(default, FieldInfo):
        annotation = Annotated[annotation, default]
        metadata = (*metadata, default)
        default = inspect.Parameter.empty
    described = any(isinstance(m, FieldInfo) and m.description for m in metadata)
    kwargs: dict[str, Any] = {}
    if field_name != p.name:
        kwargs["alias"] = p.name
    if doc and not described:
        kwargs["description"] = doc
    if default is not inspect.Parameter.empty:
        kwargs["default"] = default
    return annotation, pydantic.Field(**kwargs)


def _annotated_metadata(annotation: Any) -> tuple[Any, ...]:
    if typing.get_origin(annotation) is Annotated:
        return tuple(annotation.__metadata__)
    return ()


def _field_name(name: str, taken: set[str]) -> str:
    """A model field name for parameter ``name`` that cannot clash with BaseModel itself.

    Pydantic reserves leading underscores (private attributes), the ``model_``
    prefix and BaseModel's own attribute names; such parameters get a neutral
    field name and keep their own name as the alias the model sees.
    """
    if not (name.startswith("_") or hasattr(BaseModel, name) or name.startswith("model_")
            or keyword.iskeyword(name)):
        return name
    base = f"arg_{name.lstrip('_') or 'value'}"
    candidate, n = base, 1
    while candidate in taken:
        n += 1
        candidate = f"{base}{n}"
    return candidate


def _camel(name: str) -> str:
    return "".join(part[:1].upper() + part[1:] for part in re.split(r"[^A-Za-z0-9]+", name)) \
        or "Tool"


def _qualname(func: Callable[..., Any]) -> str:
    return getattr(func, "__qualname__", None) or getattr(func, "__name__", repr(func))


# --- schema walking ---------------------------------------------------------------------

_SUB_DICT = ("properties", "$defs", "definitions", "patternProperties", "dependentSchemas")
_SUB_ONE = ("items", "additionalProperties", "not", "if", "then", "else", "contains",
            "propertyNames", "unevaluatedProperties", "unevaluatedItems", "additionalItems")
_SUB_LIST = ("anyOf", "oneOf", "allOf", "prefixItems")


def _children(node: dict[str, Any]) -> Iterator[tuple[str, str | int | None, Any]]:
    """``(keyword, key or index or None, subschema)`` for every direct subschema."""
    for kw in _SUB_DICT:
        sub = node.get(kw)
        if isinstance(sub, dict):
            for k, v in sub.items():
                yield kw, k, v
    for kw in _SUB_ONE:
        sub = node.get(kw)
        if isinstance(sub, dict):
            yield kw, None, sub
    for kw in _SUB_LIST:
        sub = node.get(kw)
        if isinstance(sub, list):
            for idx, v in enumerate(sub):
                yield kw, idx, v


def map_schema(node: Any, fn: Callable[[dict[str, Any]], dict[str, Any]]) -> Any:
    """A copy of ``node`` with ``fn`` applied to every schema node, children first.

    Only schema positions are visited: a property *named* ``title`` is a key
    of ``properties`` and is never mistaken for the ``title`` keyword.
    """
    if not isinstance(node, dict):
        return node
    out = dict(node)
    for kw in _SUB_DICT:
        if isinstance(out.get(kw), dict):
            out[kw] = {k: map_schema(v, fn) for k, v in out[kw].items()}
    for kw in _SUB_ONE:
        if isinstance(out.get(kw), dict):
            out[kw] = map_schema(out[kw], fn)
    for kw in _SUB_LIST:
        if isinstance(out.get(kw), list):
            out[kw] = [map_schema(v, fn) for v in out[kw]]
    return fn(out)


def clean_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """Drop ``title`` keywords everywhere (keeps properties that are named ``title``)."""

    def drop_title(node: dict[str, Any]) -> dict[str, Any]:
        node.pop("title", None)
        return node

    return map_schema(schema, drop_title)  # type: ignore[no-any-return]


def _ref_name(ref: str) -> str:
    for prefix in ("#/$defs/", "#/definitions/"):
        if ref.startswith(prefix):
            return ref[len(prefix):]
    raise ToolDefinitionError(f"cannot resolve schema reference {ref!r}: only local "
                              "'#/$defs/...' references are supported")


def _defs(schema: dict[str, Any]) -> dict[str, Any]:
    return {**schema.get("definitions", {}), **schema.get("$defs", {})}


def inline_refs(schema: dict[str, Any]) -> dict[str, Any]:
    """Replace every ``$ref`` with the definition it names.

    Sibling keywords of a ``$ref`` (a description, a default) win over the
    definition's.  A definition that refers to itself, directly or through
    others, cannot be inlined: it stays under ``$defs`` and its own inner
    references are kept, everything else becomes self-contained.
    """
    defs = _defs(schema)
    kept: set[str] = set()

    def resolve(node: Any, expanding: frozenset[str]) -> Any:
        if isinstance(node, list):
            return [resolve(v, expanding) for v in node]
        if not isinstance(node, dict):
            return node
        ref = node.get("$ref")
        if isinstance(ref, str):
            name = _ref_name(ref)
            if name not in defs:
                raise ToolDefinitionError(f"schema reference {ref!r} names no definition")
            if name in expanding:
                kept.add(name)
                return dict(node)
            siblings = {k: v for k, v in node.items() if k != "$ref"}
            target = resolve(copy.deepcopy(defs[name]), expanding | {name})
            return resolve({**target, **siblings}, expanding) if siblings else target
        out: dict[str, Any] = {}
        for k, v in node.items():
            if k in ("$defs", "definitions"):
                continue
            if k in _SUB_DICT and isinstance(v, dict):
                out[k] = {kk: resolve(vv, expanding) for kk, vv in v.items()}
            elif k in _SUB_ONE or k in _SUB_LIST:
                out[k] = resolve(v, expanding)
            else:
                out[k] = v
        return out

    result = resolve(schema, frozenset())
    done: dict[str, Any] = {}
    while kept - done.keys():
        for name in sorted(kept - done.keys()):
            done[name] = resolve(copy.deepcopy(defs[name]), frozenset({name}))
    if done:
        result["$defs"] = {name: done[name] for name in sorted(done)}
    return result  # type: ignore[no-any-return]


# --- OpenAI strict mode -----------------------------------------------------------------

#: constraint keywords outside OpenAI's strict subset; pydantic still enforces them
_STRICT_DROP = ("default", "title", "minLength", "maxLength", "uniqueItems", "minProperties",
                "maxProperties", "discriminator", "examples", "deprecated", "readOnly",
                "writeOnly", "contentEncoding", "contentMediaType")
_STRICT_REFUSE = ("prefixItems", "patternProperties", "not", "if", "then", "else",
                  "dependentSchemas", "contains", "propertyNames", "unevaluatedProperties")
_STRICT_FORMATS = {"date-time", "time", "date", "duration", "email", "hostname", "ipv4", "ipv6",
                   "uuid"}


def is_nullable(node: dict[str, Any]) -> bool:
    """True when the schema node admits ``null``."""
    typ = node.get("type")
    if typ == "null" or (isinstance(typ, list) and "null" in typ):
        return True
    if node.get("const", ...) is None or None in node.get("enum", [...]):
        return True
    return any(isinstance(v, dict) and is_nullable(v) for v in node.get("anyOf", []))


def _nullable(node: dict[str, Any]) -> dict[str, Any]:
    if is_nullable(node):
        return node
    typ = node.get("type")
    if isinstance(typ, str) and not ({"enum", "const", "anyOf"} & node.keys()):
        return {**node, "type": [typ, "null"]}
    if "anyOf" in node:
        return {**node, "anyOf": [*node["anyOf"], {"type": "null"}]}
    outer = {k: node[k] for k in ("description",) if k in node}
    inner = {k: v for k, v in node.items() if k != "description"}
    return {"anyOf": [inner, {"type": "null"}], **outer}


def to_strict(schema: dict[str, Any]) -> dict[str, Any]:
    """Rewrite an arguments schema into OpenAI's ``strict`` subset.

    Raises :class:`StrictSchemaError` naming the first place that cannot be
    expressed (a free-form ``dict``, a tuple, ...).  Optional parameters
    become required-but-nullable; the registry maps their ``null`` back to
    the default (:func:`drop_null_defaults`).
    """
    root = copy.deepcopy(schema)
    defs = _defs(root)

    def walk(node: Any, path: str, expanding: frozenset[str]) -> Any:
        if not isinstance(node, dict):
            return node
        node = dict(node)
        ref = node.get("$ref")
        if isinstance(ref, str) and len(node) > 1:
            name = _ref_name(ref)
            if name in expanding:  # recursive: keep the bare pointer
                return {"$ref": ref}
            siblings = {k: v for k, v in node.items() if k != "$ref"}
            return walk({**defs[name], **siblings}, path, expanding | {name})
        for kw in _STRICT_REFUSE:
            if kw in node:
                raise StrictSchemaError(
                    f"{path or 'arguments'} uses {kw!r}, which OpenAI strict mode does not "
                    "support", hint="send this tool with strict=False")
        if "oneOf" in node:
            node["anyOf"] = node.pop("oneOf")
        all_of = node.get("allOf")
        if isinstance(all_of, list) and len(all_of) == 1 and isinstance(all_of[0], dict):
            node.pop("allOf")
            node = {**all_of[0], **node}
            return walk(node, path, expanding)
        for kw in _STRICT_DROP:
            node.pop(kw, None)
        if node.get("format") not in (None, *_STRICT_FORMATS):
            node.pop("format")
        if "const" in node:
            node["enum"] = [node.pop("const")]
        is_object = node.get("type") == "object" or "properties" in node
        if is_object:
            extra = node.get("additionalProperties")
            if "properties" not in node or extra not in (None, False):
                raise StrictSchemaError(
                    f"{path or 'arguments'} is a free-form object (a dict), which OpenAI "
                    "strict mode cannot express", hint="use a pydantic model with named fields, "
                    "or send this tool with strict=False")
            required = set(node.get("required", []))
            props: dict[str, Any] = {}
            for key, sub in node["properties"].items():
                sub_default = sub.get("default", ...) if isinstance(sub, dict) else ...
                new = walk(sub, f"{path}.{key}" if path else key, expanding)
                if key not in required:
                    new = _nullable(new)
                    if sub_default is not ... and sub_default is not None:
                        note = f"Default: {_json_repr(sub_default)}."
                        desc = new.get("description")
                        new["description"] = f"{desc} {note}" if desc else note
                props[key] = new
            node["properties"] = props
            node["required"] = list(props)
            node["additionalProperties"] = False
        if isinstance(node.get("items"), dict):
            node["items"] = walk(node["items"], f"{path}[]", expanding)
        if isinstance(node.get("anyOf"), list):
            node["anyOf"] = [walk(v, path, expanding) for v in node["anyOf"]]
        if isinstance(node.get("allOf"), list):
            node["allOf"] = [walk(v, path, expanding) for v in node["allOf"]]
        return node

    body = {k: v for k, v in root.items() if k not in ("$defs", "definitions")}
    out: dict[str, Any] = walk(body, "", frozenset())
    if defs:
        used = _used_refs(out)
        frontier = set(used)
        while frontier:
            nxt: set[str] = set()
            for name in frontier:
                nxt |= _used_refs(defs[name]) - used
            used |= nxt
            frontier = nxt
        if used:
            out["$defs"] = {name: walk(defs[name], f"$defs.{name}", frozenset({name}))
                            for name in sorted(used)}
    return out


def _used_refs(node: Any) -> set[str]:
    found: set[str] = set()
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str):
            found.add(_ref_name(ref))
        for v in node.values():
            found |= _used_refs(v)
    elif isinstance(node, list):
        for v in node:
            found |= _used_refs(v)
    return found


def _json_repr(value: Any) -> str:
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)


# --- arguments on the way back ------------------------------------------------------------


def drop_null_defaults(arguments: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    """Remove ``null`` values the schema does not admit where a default exists.

    Weak models (and strict mode, by design) send ``null`` for an argument
    they mean to leave out.  Where the property is optional and not nullable,
    dropping the key lets the default apply instead of failing validation.
    Nested objects and arrays of objects are cleaned the same way.
    """
    defs = _defs(schema)

    def resolve(node: Any) -> Any:
        seen = 0
        while isinstance(node, dict) and isinstance(node.get("$ref"), str) and seen < 32:
            siblings = {k: v for k, v in node.items() if k != "$ref"}
            node = {**defs.get(_ref_name(node["$ref"]), {}), **siblings}
            seen += 1
        if isinstance(node, dict) and isinstance(node.get("anyOf"), list):
            options = [o for o in node["anyOf"] if not (isinstance(o, dict)
                                                         and o.get("type") == "null")]
            if len(options) == 1:
                return resolve(options[0])
        return node

    def clean(value: Any, node: Any) -> Any:
        node = resolve(node)
        if not isinstance(node, dict):
            return value
        if isinstance(value, dict) and isinstance(node.get("properties"), dict):
            props = node["properties"]
            required = set(node.get("required", []))
            out: dict[str, Any] = {}
            for k, v in value.items():
                sub = props.get(k)
                if v is None and sub is not None and k not in required \
                        and not is_nullable(resolve(sub)) and not is_nullable(sub):
                    continue
                out[k] = clean(v, sub) if sub is not None else v
            return out
        if isinstance(value, list) and isinstance(node.get("items"), dict):
            return [clean(v, node["items"]) for v in value]
        return value

    return clean(arguments, schema)  # type: ignore[no-any-return]


# --- a short type description, for error messages -------------------------------------------


def describe_type(node: Any, schema: dict[str, Any]) -> str:
    """A few words for what a schema node expects: ``integer``, ``list of string``, ..."""
    defs = _defs(schema)

    def desc(n: Any, depth: int) -> str:
        if not isinstance(n, dict) or depth > 4:
            return "value"
        if isinstance(n.get("$ref"), str):
            name = _ref_name(n["$ref"])
            target = defs.get(name, {})
            if "enum" in target:
                return desc(target, depth + 1)
            return f"object {name}"
        if "enum" in n:
            return "one of " + ", ".join(_json_repr(v) for v in n["enum"][:12])
        if "const" in n:
            return _json_repr(n["const"])
        for kw in ("anyOf", "oneOf"):
            if isinstance(n.get(kw), list):
                return " or ".join(desc(v, depth + 1) for v in n[kw])
        typ = n.get("type")
        if isinstance(typ, list):
            return " or ".join(typ)
        if typ == "array":
            return f"list of {desc(n.get('items'), depth + 1)}" if n.get("items") else "list"
        if typ == "object" and isinstance(n.get("additionalProperties"), dict):
            return f"object with {desc(n['additionalProperties'], depth + 1)} values"
        return str(typ) if typ else "value"

    return desc(node, 0)


# --- structural check against a foreign schema ----------------------------------------------

_JSON_TYPES: dict[str, Callable[[Any], bool]] = {
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: (isinstance(v, int) and not isinstance(v, bool))
    or (isinstance(v, float) and v.is_integer()),
    "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
    "array": lambda v: isinstance(v, list),
    "object": lambda v: isinstance(v, dict),
}


def check_json(value: Any, schema: dict[str, Any]) -> list[str]:
    """Problems of ``value`` against ``schema``'s structure, as lines for a model.

    Covers ``type``, ``enum``/``const``, ``properties``/``required``/
    ``additionalProperties: false``, ``items`` and ``anyOf``/``oneOf`` (any
    branch passing); other keywords are the tool's own business.  Used for
    tools whose schema comes from elsewhere, where no pydantic model exists.
    """
    defs = _defs(schema)
    problems: list[str] = []

    def check(v: Any, node: Any, path: str, depth: int) -> None:
        if not isinstance(node, dict) or depth > 32:
            return
        ref = node.get("$ref")
        if isinstance(ref, str):
            name = _ref_name(ref)
            node = {**defs.get(name, {}), **{k: x for k, x in node.items() if k != "$ref"}}
        here = path or "arguments"
        branches = node.get("anyOf") or node.get("oneOf")
        if isinstance(branches, list) and branches:
            attempts: list[list[str]] = []
            for branch in branches:
                before = len(problems)
                check(v, branch, path, depth + 1)
                if len(problems) == before:
                    return
                attempts.append(problems[before:])
                del problems[before:]
            if len(branches) == 1:
                problems.extend(attempts[0])
                return
            closest = min(attempts, key=len)
            problems.append(f"`{here}`: matches none of the {len(branches)} allowed forms; "
                            f"closest: {'; '.join(closest[:3])}")
            return
        if "enum" in node and v not in node["enum"]:
            allowed = ", ".join(json.dumps(x) for x in node["enum"][:12])
            problems.append(f"`{here}`: must be one of {allowed}; got {_brief(v)}")
            return
        if "const" in node and v != node["const"]:
            problems.append(f"`{here}`: must be {json.dumps(node['const'])}; got {_brief(v)}")
            return
        typ = node.get("type")
        if typ is not None:
            types = typ if isinstance(typ, list) else [typ]
            if not any(_JSON_TYPES.get(t, lambda _: True)(v) for t in types):
                problems.append(f"`{here}`: expected {' or '.join(types)}; got {_brief(v)}")
                return
        if isinstance(v, dict):
            props = node.get("properties", {})
            for key in node.get("required", []):
                if key not in v:
                    problems.append(f"`{_join(path, key)}`: required argument is missing")
            for key, item in v.items():
                if key in props:
                    check(item, props[key], _join(path, key), depth + 1)
                elif node.get("additionalProperties") is False:
                    known = ", ".join(props) or "none"
                    problems.append(f"`{_join(path, key)}`: unexpected argument "
                                    f"(allowed: {known})")
                elif isinstance(node.get("additionalProperties"), dict):
                    check(item, node["additionalProperties"], _join(path, key), depth + 1)
        if isinstance(v, list) and isinstance(node.get("items"), dict):
            for i, item in enumerate(v):
                check(item, node["items"], f"{path}[{i}]", depth + 1)

    check(value, schema, "", 0)
    return problems


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _brief(value: Any, limit: int = 80) -> str:
    text = _json_repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def subschema(schema: dict[str, Any], loc: tuple[Any, ...]) -> dict[str, Any] | None:
    """The schema node at a validation-error location (``("addr", "street")``), or None."""
    defs = _defs(schema)

    def resolve(node: Any) -> Any:
        for _ in range(32):
            if isinstance(node, dict) and isinstance(node.get("$ref"), str):
                node = defs.get(_ref_name(node["$ref"]))
                continue
            if isinstance(node, dict) and isinstance(node.get("anyOf"), list):
                options = [o for o in node["anyOf"]
                           if not (isinstance(o, dict) and o.get("type") == "null")]
                if len(options) == 1:
                    node = options[0]
                    continue
            break
        return node

    node: Any = schema
    for part in loc:
        node = resolve(node)
        if not isinstance(node, dict):
            return None
        node = node.get("items") if isinstance(part, int) \
            else node.get("properties", {}).get(part)
    return node if isinstance(node, dict) else None
