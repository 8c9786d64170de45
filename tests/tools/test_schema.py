"""Tool schemas from typed functions: exact JSON schema structure in each format.

No ``from __future__ import annotations`` here on purpose: the tools below
are defined with real annotation objects, and one test checks that string
annotations naming module-level types resolve too.
"""

import dataclasses
import enum
from typing import Annotated, Literal

import pytest
from pydantic import BaseModel, Field
from typing_extensions import TypedDict

from conclave.llm.types import ChatRequest, Message, ToolSpec
from conclave.tools import (
    StrictSchemaError,
    ToolDefinitionError,
    inline_refs,
    parse_docstring,
    tool,
)


class Color(enum.Enum):
    """A paint colour."""

    RED = "red"
    BLUE = "blue"


class Address(BaseModel):
    street: str
    zip_code: str | None = None


class Person(BaseModel):
    name: str
    address: Address
    tags: list[str] = []


@tool(namespace="crm", timeout_s=5, max_concurrency=2)
def add_person(person: Person, color: Color = Color.RED, mode: Literal["fast", "safe"] = "safe",
               limit: int = 10, note: str | None = None, scores: list[float] | None = None,
               ) -> str:
    """Add a person to the address book.

    The person is stored once; a second call updates it.

    Args:
        person: who to add.
        color: their favourite colour.
        mode: how careful to be,
            over two lines.
        limit: at most this many matches.

    Returns:
        the new record id.
    """
    return person.name


def test_openai_format_exact_schema() -> None:
    assert add_person.openai_schema() == {
        "type": "function",
        "function": {
            "name": "crm__add_person",
            "description": "Add a person to the address book.\n\n"
                           "The person is stored once; a second call updates it.\n\n"
                           "Returns: the new record id.",
            "parameters": {
                "$defs": {
                    "Address": {
                        "properties": {
                            "street": {"type": "string"},
                            "zip_code": {"anyOf": [{"type": "string"}, {"type": "null"}],
                                         "default": None},
                        },
                        "required": ["street"],
                        "type": "object",
                    },
                    "Color": {"description": "A paint colour.", "enum": ["red", "blue"],
                              "type": "string"},
                    "Person": {
                        "properties": {
                            "name": {"type": "string"},
                            "address": {"$ref": "#/$defs/Address"},
                            "tags": {"default": [], "items": {"type": "string"},
                                     "type": "array"},
                        },
                        "required": ["name", "address"],
                        "type": "object",
                    },
                },
                "additionalProperties": False,
                "properties": {
                    "person": {"$ref": "#/$defs/Person", "description": "who to add."},
                    "color": {"$ref": "#/$defs/Color", "default": "red",
                              "description": "their favourite colour."},
                    "mode": {"default": "safe", "description": "how careful to be, over two "
                                                               "lines.",
                             "enum": ["fast", "safe"], "type": "string"},
                    "limit": {"default": 10, "description": "at most this many matches.",
                              "type": "integer"},
                    "note": {"anyOf": [{"type": "string"}, {"type": "null"}], "default": None},
                    "scores": {"anyOf": [{"items": {"type": "number"}, "type": "array"},
                                         {"type": "null"}], "default": None},
                },
                "required": ["person"],
                "type": "object",
            },
        },
    }


def test_anthropic_format_and_spec_share_the_schema() -> None:
    anthropic = add_person.anthropic_schema()
    assert set(anthropic) == {"name", "description", "input_schema"}
    assert anthropic["name"] == "crm__add_person"
    assert anthropic["input_schema"] == add_person.openai_schema()["function"]["parameters"]
    spec = add_person.to_spec()
    assert isinstance(spec, ToolSpec)
    assert spec.name == "crm__add_person"
    assert spec.parameters == anthropic["input_schema"]
    # a ChatRequest accepts it as is
    ChatRequest(messages=[Message.user("hi")], tools=[spec])


def test_inline_refs_gives_a_self_contained_schema() -> None:
    schema = add_person.anthropic_schema(inline_refs=True)["input_schema"]
    assert "$defs" not in schema
    assert "$ref" not in str(schema)
    person = schema["properties"]["person"]
    assert person["description"] == "who to add."  # the sibling survives inlining
    assert person["required"] == ["name", "address"]
    assert person["properties"]["address"] == {
        "properties": {"street": {"type": "string"},
                       "zip_code": {"anyOf": [{"type": "string"}, {"type": "null"}],
                                    "default": None}},
        "required": ["street"], "type": "object"}
    assert schema["properties"]["color"] == {"description": "their favourite colour.",
                                             "enum": ["red", "blue"], "type": "string",
                                             "default": "red"}


def test_strict_schema_closes_objects_and_makes_optionals_nullable() -> None:
    fn = add_person.openai_schema(strict=True)["function"]
    assert fn["strict"] is True
    params = fn["parameters"]
    assert params["additionalProperties"] is False
    assert params["required"] == ["person", "color", "mode", "limit", "note", "scores"]
    props = params["properties"]
    assert props["limit"] == {"type": ["integer", "null"],
                              "description": "at most this many matches. Default: 10."}
    assert props["mode"] == {
        "anyOf": [{"enum": ["fast", "safe"], "type": "string"}, {"type": "null"}],
        "description": "how careful to be, over two lines. Default: \"safe\"."}
    assert props["color"] == {
        # the property's own description replaces the enum's ("A paint colour.")
        "anyOf": [{"enum": ["red", "blue"], "type": "string"}, {"type": "null"}],
        "description": "their favourite colour. Default: \"red\"."}
    assert props["note"] == {"anyOf": [{"type": "string"}, {"type": "null"}]}
    # a $ref with a sibling description is inlined (strict mode refuses siblings of $ref)
    assert props["person"]["additionalProperties"] is False
    assert props["person"]["required"] == ["name", "address", "tags"]
    assert props["person"]["properties"]["address"] == {"$ref": "#/$defs/Address"}
    assert params["$defs"] == {"Address": {
        "properties": {"street": {"type": "string"},
                       "zip_code": {"anyOf": [{"type": "string"}, {"type": "null"}]}},
        "required": ["street", "zip_code"], "type": "object", "additionalProperties": False}}
    assert "default" not in str(params)


def test_strict_refuses_a_free_form_dict_and_auto_falls_back() -> None:
    @tool
    def tag(labels: dict[str, int]) -> str:
        """Tag things."""
        return ""

    with pytest.raises(StrictSchemaError, match="labels is a free-form object"):
        tag.openai_schema(strict=True)
    assert tag.strict_problem is not None
    auto = tag.openai_schema(strict="auto")["function"]
    assert "strict" not in auto
    assert auto["parameters"]["properties"]["labels"] == {
        "additionalProperties": {"type": "integer"}, "type": "object"}
    assert add_person.openai_schema(strict="auto")["function"]["strict"] is True


class Tree(BaseModel):
    value: int
    children: list["Tree"] = []


def test_recursive_model_keeps_its_definition_when_inlined() -> None:
    @tool
    def walk(tree: Tree, depth: int = 1) -> int:
        """Walk a tree."""
        return depth

    schema = walk.parameters_schema(inline_refs=True)
    assert schema["properties"]["tree"] == {
        "properties": {"value": {"type": "integer"},
                       "children": {"default": [], "items": {"$ref": "#/$defs/Tree"},
                                    "type": "array"}},
        "required": ["value"], "type": "object"}
    assert set(schema["$defs"]) == {"Tree"}
    strict = walk.parameters_schema(strict=True)
    assert strict["$defs"]["Tree"]["required"] == ["value", "children"]


@dataclasses.dataclass
class Window:
    start: int
    end: int = 100


class Filters(TypedDict):
    author: str
    year: int


def test_dataclass_and_typeddict_parameters() -> None:
    @tool
    def search(window: Window, filters: Filters) -> str:
        """Search."""
        return f"{window!r} {filters!r}"

    schema = search.parameters_schema(inline_refs=True)
    assert schema["properties"]["window"] == {
        "additionalProperties": False,  # the dataclass takes the arguments model's extra=forbid
        "properties": {"start": {"type": "integer"}, "end": {"default": 100, "type": "integer"}},
        "required": ["start"], "type": "object"}
    assert schema["properties"]["filters"] == {
        "additionalProperties": False,  # pydantic closes a TypedDict
        "properties": {"author": {"type": "string"}, "year": {"type": "integer"}},
        "required": ["author", "year"], "type": "object"}
    args, kwargs = search.prepare({"window": {"start": 3}, "filters": {"author": "a",
                                                                        "year": "2020"}})
    assert args == []
    assert kwargs["window"] == Window(3, 100)
    assert kwargs["filters"] == {"author": "a", "year": 2020}


def test_annotated_field_description_wins_and_constraints_show() -> None:
    @tool
    def page(
        n: Annotated[int, Field(description="page number, from 1", ge=1)],
        size: Annotated[int, Field(le=100)] = 20,
    ) -> str:
        """Get a page.

        Args:
            n: docstring text that loses to Field(description=...).
            size: rows per page.
        """
        return ""

    props = page.parameters_schema()["properties"]
    assert props["n"] == {"description": "page number, from 1", "minimum": 1, "type": "integer"}
    assert props["size"] == {"default": 20, "description": "rows per page.", "maximum": 100,
                             "type": "integer"}


def test_parameter_names_that_clash_with_pydantic_keep_their_name() -> None:
    @tool
    def odd(schema: str, model_config: int = 1, copy: bool = False) -> str:
        """Odd names."""
        return f"{schema}|{model_config}|{copy}"

    assert list(odd.parameters_schema()["properties"]) == ["schema", "model_config", "copy"]
    args, kwargs = odd.prepare({"schema": "s", "model_config": 5, "copy": True})
    assert odd(*args, **kwargs) == "s|5|True"


def test_field_defaults_and_private_names() -> None:
    @tool
    def cfg(schema: str = Field("x", description="which schema", max_length=3),
            items: list[int] = Field(default_factory=list), _level: int = 2) -> str:
        """Configure.

        Args:
            items: the items.
        """
        return f"{schema}|{items}|{_level}"

    assert cfg.parameters_schema() == {
        "additionalProperties": False,
        "properties": {
            "schema": {"default": "x", "description": "which schema", "maxLength": 3,
                       "type": "string"},
            "items": {"description": "the items.", "items": {"type": "integer"},
                      "type": "array"},
            "_level": {"default": 2, "type": "integer"}},
        "type": "object"}
    assert cfg(*cfg.prepare({})[0], **cfg.prepare({})[1]) == "x|[]|2"
    args, kwargs = cfg.prepare({"schema": "abc", "items": [1], "_level": 5})
    assert cfg(*args, **kwargs) == "abc|[1]|5"


def test_positional_only_parameters_are_passed_positionally() -> None:
    @tool
    def pos(a: int, /, b: int, *, c: int = 0) -> str:
        """Positional."""
        return f"{a}{b}{c}"

    args, kwargs = pos.prepare({"a": 1, "b": 2, "c": 3})
    assert args == [1]
    assert kwargs == {"b": 2, "c": 3}
    assert pos(*args, **kwargs) == "123"


def test_string_annotations_resolve_against_the_module() -> None:
    def later(person: "Person", color: "Color") -> "str":
        """Forward refs."""
        return ""

    t = tool(later)
    assert t.parameters_schema()["properties"]["person"] == {"$ref": "#/$defs/Person"}


def test_definition_errors_are_clear() -> None:
    def untyped(x):  # type: ignore[no-untyped-def]
        return x

    with pytest.raises(ToolDefinitionError, match="parameter 'x' has no type annotation"):
        tool(untyped)

    def star(*items: int) -> int:
        return 0

    with pytest.raises(ToolDefinitionError, match=r"\*items cannot be described"):
        tool(star)

    class Holder:
        def method(self, x: int) -> int:
            return x

    with pytest.raises(ToolDefinitionError, match=r"tool\(instance\.method\)"):
        tool(Holder.method)
    assert tool(Holder().method).parameters_schema()["required"] == ["x"]

    with pytest.raises(ToolDefinitionError, match="cannot name a tool"):
        tool(lambda x: x)

    def _private(x: int) -> int:
        return x

    with pytest.raises(ToolDefinitionError, match="pass name="):
        tool(_private)
    assert tool(_private, name="private").name == "private"

    def unresolved(x: "NoSuchType") -> int:  # type: ignore[name-defined]  # noqa: F821
        return 0

    with pytest.raises(ToolDefinitionError, match="cannot resolve its type annotations"):
        tool(unresolved)

    with pytest.raises(ToolDefinitionError, match="not valid"):
        tool(name="bad__name")(_private)
    with pytest.raises(ToolDefinitionError, match="at most 64"):
        tool(name="x" * 65)(_private)


def test_google_numpy_and_rest_docstrings() -> None:
    google = parse_docstring("""Summary.

    More text.

    Args:
        a (int): first,
            continued.
        b: second.

    Raises:
        ValueError: never.
    """)
    assert google.description == "Summary.\n\nMore text."
    assert google.params == {"a": "first, continued.", "b": "second."}

    numpy = parse_docstring("""Summary.

    Parameters
    ----------
    a : int
        the first.
    b : str
        the second,
        two lines.
    """)
    assert numpy.description == "Summary."
    assert numpy.params == {"a": "the first.", "b": "the second, two lines."}

    rest = parse_docstring("""Summary.

    :param a: the first.
    :param str b: the second.
    :returns: nothing.
    """)
    assert rest.description == "Summary."
    assert rest.params == {"a": "the first.", "b": "the second."}


def test_inline_refs_on_a_plain_schema() -> None:
    schema = {"type": "object",
              "properties": {"a": {"$ref": "#/$defs/A"}, "b": {"$ref": "#/$defs/A",
                                                               "description": "b"}},
              "$defs": {"A": {"type": "object", "properties": {"title": {"type": "string"}}}}}
    assert inline_refs(schema) == {
        "type": "object",
        "properties": {
            "a": {"type": "object", "properties": {"title": {"type": "string"}}},
            "b": {"type": "object", "properties": {"title": {"type": "string"}},
                  "description": "b"}}}


def test_a_property_named_title_survives_title_cleaning() -> None:
    @tool
    def book(title: str, subtitle: str = "") -> str:
        """Book."""
        return title

    props = book.parameters_schema()["properties"]
    assert props["title"] == {"type": "string"}
    assert "title" not in props["subtitle"]
