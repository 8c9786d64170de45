"""Errors of the tools layer, in the project's one hierarchy (:mod:`conclave.errors`).

Two audiences, two paths.  A *programmer* who defines or registers a tool
badly gets an exception at import or registration time
(:class:`ToolDefinitionError`), because that is a bug to fix before any model
sees the tool.  A *model* that calls a tool badly never gets an exception: the
registry turns every failure into an error :class:`~conclave.tools.ToolResult`
the model can read and correct.  :class:`WorkbenchError` is raised inside
workbench tool bodies and reaches the model that way.
"""

from __future__ import annotations

from conclave.errors import ConclaveError, InvalidRequest


class ToolDefinitionError(ConclaveError):
    """A tool cannot be built or registered: bad name, unannotated parameter, duplicate."""

    code = "tool_definition_error"
    http_status = 500


class StrictSchemaError(ToolDefinitionError):
    """A tool's arguments cannot be expressed in OpenAI's ``strict`` schema subset."""

    code = "strict_schema_error"


class ToolNotFound(InvalidRequest):
    """``ToolRegistry.get`` was asked for a name no tool has."""

    code = "tool_not_found"
    http_status = 404


class WorkbenchError(InvalidRequest):
    """A workbench tool refused its input: a path outside the root, a missing file, ..."""

    code = "workbench_error"
