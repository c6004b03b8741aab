"""DeepSeek-V4 chat encoding (the prompt string format of the V3.1 / V3.2 / V4 chat models).

    <｜begin▁of▁sentence｜>{system}<｜User｜>{user 1}<｜Assistant｜></think>{answer 1}<｜end▁of▁sentence｜>
    <｜User｜>{user 2}<｜Assistant｜><think>                      (thinking mode, generation prompt)
    <｜User｜>{user 2}<｜Assistant｜></think>                     (non-thinking mode)

* The system prompt follows BOS directly, without a role tag (several system messages follow one
  another with nothing between them, as the release's ``encoding_dsv4`` renders each message's content);
  there is none if the conversation has no system message.
* Every user turn is ``<｜User｜>`` + text; every assistant turn is ``<｜Assistant｜>`` + reply +
  ``<｜end▁of▁sentence｜>``. Completed assistant turns of the history are written in the
  non-thinking form ``</think>{content}``: the reasoning of earlier turns is not fed back.
* The generation prompt opens the assistant turn: ``<think>`` (the model writes its reasoning,
  closes it with ``</think>`` and answers) or ``</think>`` (it answers directly).

Tool calls and the V4 "quick instruction" / reminder roles are not covered.
"""
from __future__ import annotations

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


class ChatError(ValueError):
    """A conversation that cannot be encoded (unknown role, wrong order, missing content)."""


def encode_chat(messages: list[dict], *, thinking: bool = False, add_generation_prompt: bool = True,
                bos: bool = True) -> str:
    """Messages ``[{"role": "system"|"user"|"assistant", "content": str}, ...]`` -> prompt string.

    System messages may only come before the first user message. With ``add_generation_prompt`` the
    conversation must end with a user message and the string ends with the opened assistant turn
    (``<think>`` if ``thinking`` else ``</think>``).
    """
    system, turns = [], []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m:
            raise ChatError(f"message {i}: expected a mapping with 'role' and 'content', got {m!r}")
        role, content = m["role"], m.get("content")
        if not isinstance(content, str):
            raise ChatError(f"message {i} ({role}): 'content' must be a string, got {type(content).__name__}")
        if role == "system":
            if turns:
                raise ChatError(f"message {i}: a system message must come before the first user message")
            system.append(content)
        elif role in ("user", "assistant"):
            prev = turns[-1][0] if turns else None
            if role == "assistant" and prev != "user":
                raise ChatError(f"message {i}: an assistant message must follow a user message")
            if role == "user" and prev == "user":
                raise ChatError(f"message {i}: two user messages in a row; merge them or add the reply")
            turns.append((role, content))
        else:
            raise ChatError(f"message {i}: unknown role {role!r} (system, user or assistant)")
    out = [BOS if bos else "", *system]
    for role, content in turns:
        if role == "user":
            out.append(USER + content)
        else:
            out.append(ASSISTANT + THINK_CLOSE + _strip_reasoning(content) + EOS)
    if add_generation_prompt:
        if not turns or turns[-1][0] != "user":
            raise ChatError("the conversation must end with a user message to add the generation prompt")
        out.append(ASSISTANT + (THINK_OPEN if thinking else THINK_CLOSE))
    return "".join(out)


def _strip_reasoning(content: str) -> str:
    """A reply given with its reasoning (``...</think>answer``) keeps only the answer."""
    return content.split(THINK_CLOSE, 1)[1] if THINK_CLOSE in content else content


def split_reply(text: str, *, thinking: bool) -> tuple[str, str]:
    """A generated continuation -> (reasoning, answer); the answer stops at ``<｜end▁of▁sentence｜>``.

    In thinking mode the reasoning is what precedes ``</think>`` (all of it if the model never closed it).
    """
    text = text.split(EOS, 1)[0]
    if not thinking:
        return "", text
    if THINK_CLOSE not in text:
        return text, ""
    reasoning, answer = text.split(THINK_CLOSE, 1)
    return reasoning, answer
