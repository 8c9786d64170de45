"""Chat messages to a completion prompt, for base (non-chat) models.

A base model has no chat template: given one, it continues the template
tokens with noise.  It does answer a ``Question: ...\\nAnswer:`` prompt well,
so chat turns are rendered in that form and generation stops at the next
``Question:`` (or a blank-line run), which a base model otherwise emits
to keep the pattern going.
"""

from __future__ import annotations

from conclave.llm.types import Message, Role

QUESTION = "Question:"
ANSWER = "Answer:"
#: sequences that end a base-model answer
BASE_STOPS = ["\nQuestion:", "\n\n\n"]


def completion_prompt(messages: list[Message]) -> tuple[str, list[str]]:
    """Render ``messages`` as a Question/Answer prompt; return it with its stop sequences.

    System messages become a preamble; tool results become context lines, so a
    base model can still use them when answering the next question.
    """
    preamble: list[str] = []
    turns: list[str] = []
    for msg in messages:
        text = (msg.content or "").strip()
        if msg.role is Role.SYSTEM:
            if text:
                preamble.append(text)
        elif msg.role is Role.USER:
            turns.append(f"{QUESTION} {text}\n{ANSWER}")
        elif msg.role is Role.ASSISTANT:
            if turns and turns[-1].endswith(ANSWER):
                turns[-1] = f"{turns[-1]} {text}\n"
            else:
                turns.append(f"{ANSWER} {text}\n")
        elif msg.role is Role.TOOL:
            turns.append(f"Tool result ({msg.name or msg.tool_call_id or 'tool'}): {text}\n")
    if not turns or not turns[-1].endswith(ANSWER):
        turns.append(ANSWER)
    head = "\n\n".join(preamble)
    body = "\n".join(turns)
    prompt = f"{head}\n\n{body}" if head else body
    return prompt, list(BASE_STOPS)
