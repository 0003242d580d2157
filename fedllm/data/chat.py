"""Chat templates without a system role: the system prompt is folded into the first user turn.

Some families' chat templates have no system role. Gemma 1 and 2 raise ("System role not
supported"); Mistral's older templates raise on anything but alternating user/assistant turns;
others drop a system message silently. Gemma 3's own template instead prepends the system text and
a blank line to the first user turn, Google's documented convention for Gemma ("Gemma formatting and
system instructions", ai.google.dev/gemma/docs/formatting: the instruction-tuned models know only the
user and model roles; system-level instructions go at the start of the first user prompt, followed
by a blank line). fedllm does the same for every template that cannot show a system message, so ``data.system_prompt`` reaches the
model the same way in training (:func:`fedllm.data.text.tokenize`) and in ``fedllm generate`` /
``chat`` (:func:`fedllm.data.text.prompt_token_ids`).

Whether a template shows a system message is probed once per template: render a system message
with a marker text and one user turn; a template that raises, or whose output lacks the marker,
has no system role. A template that shows it is used exactly as before (numbers unchanged).
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)

_MARKER = "fedllm-system-probe-7f3a"
_PROBED: dict[tuple[str, str], bool] = {}  # (chat template, bos token) -> shows a system message


def system_role_ok(tokenizer: Any) -> bool:
    """Whether the tokenizer's chat template renders a system message (cached per template)."""
    template = getattr(tokenizer, "chat_template", None)
    if not isinstance(template, str):
        return True  # no template, or several named ones: nothing to probe, rendered as before
    key = (template, str(getattr(tokenizer, "bos_token", "")))
    if key not in _PROBED:
        probe = [{"role": "system", "content": _MARKER}, {"role": "user", "content": "hello"}]
        try:
            text = tokenizer.apply_chat_template(probe, tokenize=False, add_generation_prompt=True)
            ok = _MARKER in text
        except Exception:  # jinja's raise_exception (TemplateError) or a template bug on this shape
            ok = False
        if not ok:
            log.info("the tokenizer's chat template has no system role: the system prompt is folded into "
                     "the first user turn (as Gemma's own template does)")
        _PROBED[key] = ok
    return _PROBED[key]


def fold_system(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """``[system: s, user: u, ...]`` -> ``[user: s + "\\n\\n" + u, ...]`` (Gemma 3's own convention)."""
    system = [m["content"] for m in messages if m["role"] == "system"]
    rest = [dict(m) for m in messages if m["role"] != "system"]
    if not system:
        return rest
    first_user = next((i for i, m in enumerate(rest) if m["role"] == "user"), None)
    if first_user is None:
        return rest
    rest[first_user]["content"] = "\n\n".join([*system, rest[first_user]["content"]])
    return rest


def chat_messages(tokenizer: Any, messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """``messages`` as the tokenizer's chat template can render them: unchanged, or the system
    prompt folded into the first user turn when the template has no system role."""
    if any(m["role"] == "system" for m in messages) and not system_role_ok(tokenizer):
        return fold_system(messages)
    return messages
