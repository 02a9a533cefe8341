"""Prompt formatting: chat templates, system prompts and the BOS a plain prompt needs.

One function, :func:`format_prompt`, turns a data row's prompt (text or a list of
``{"role", "content"}`` messages) into the exact text the model is given. Training rollouts,
``tools/eval_math.py`` and ``mtp-rl heal`` all call it, so a model is evaluated and healed on the
prompts it was trained on. The chat template is the tokenizer's own, rendered by
``transformers``' ``apply_chat_template`` (never re-implemented here).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from megatron_mtp_rl.errors import ConfigError

Prompt = str | list[dict]


class ChatFormatError(ConfigError):
    """The prompt cannot be formatted as asked (no chat template, malformed messages)."""


def parse_chat_template_kwargs(text: str | None) -> dict:
    """``--chat-template-kwargs '{"enable_thinking": false}'`` → a dict (one-line error otherwise)."""
    if not text:
        return {}
    try:
        out = json.loads(text)
    except json.JSONDecodeError as e:
        raise ChatFormatError(
            f"--chat-template-kwargs is not valid JSON ({e.msg} at column {e.colno}): {text}"
        ) from None
    if not isinstance(out, dict):
        raise ChatFormatError(f"--chat-template-kwargs must be a JSON object, got {type(out).__name__}: {text}")
    return out


def check_messages(messages: object) -> str | None:
    """What is wrong with a message list (None when it is a usable chat prompt)."""
    if not isinstance(messages, list) or not messages:
        return "expected a non-empty list of {role, content} messages"
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            return f"message {i} is not a {{'role': str, 'content': str}} object: {str(m)[:80]}"
    if not any(m["content"].strip() for m in messages):
        return "every message is empty"
    return None


@dataclass(frozen=True)
class PromptFormat:
    """How prompts become model text; checked once against the tokenizer (``validate``).

    ``apply_chat_template``: None = automatic (on for message-list prompts when the tokenizer
    has a template), True = always (a text prompt becomes one user message), False = never.
    """

    apply_chat_template: bool | None = None
    system_prompt: str | None = None
    chat_template_kwargs: dict = field(default_factory=dict)

    def validate(self, tokenizer) -> None:
        has = bool(getattr(tokenizer, "chat_template", None))
        if self.apply_chat_template and not has:
            raise ChatFormatError(
                "--apply-chat-template needs a tokenizer with a chat template; "
                f"{_name(tokenizer)} has none (pass --tokenizer DIR of an instruct model)"
            )
        if self.system_prompt and not has:
            raise ChatFormatError(f"--system-prompt needs a chat template; {_name(tokenizer)} has none")
        if self.system_prompt and self.apply_chat_template is False:
            raise ChatFormatError("--system-prompt needs the chat template; drop --no-apply-chat-template")


def _name(tokenizer) -> str:
    path = getattr(tokenizer, "path", None)
    return f"the tokenizer in {path}" if path else f"the {type(tokenizer).__name__}"


def format_prompt(
    prompt: Prompt,
    tokenizer,
    fmt: PromptFormat | None = None,
) -> str:
    """The text the model is prompted with (tokenize it with ``tokenizer.encode``).

    With a chat template the result equals ``tokenizer.apply_chat_template(messages,
    tokenize=False, add_generation_prompt=True, **chat_template_kwargs)``; ``--system-prompt``
    is prepended as a system message unless the row brings its own. Without one, a text
    prompt is returned as is, behind the BOS text the tokenizer's own ``encode`` would add.
    """
    fmt = fmt or PromptFormat()
    has = bool(getattr(tokenizer, "chat_template", None))
    is_list = isinstance(prompt, list)
    use = fmt.apply_chat_template if fmt.apply_chat_template is not None else (is_list and has)
    if is_list:
        problem = check_messages(prompt)
        if problem:
            raise ChatFormatError(problem)
    elif not isinstance(prompt, str):
        raise ChatFormatError(f"expected a string or a list of messages, got {type(prompt).__name__}")
    if use:
        if not has:
            raise ChatFormatError(f"a chat template is needed but {_name(tokenizer)} has none")
        messages = [{"role": m["role"], "content": m["content"]} for m in prompt] if is_list else []
        if not is_list:
            messages = [{"role": "user", "content": prompt}]
        if fmt.system_prompt and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": fmt.system_prompt})
        try:
            return tokenizer.hf.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True, **fmt.chat_template_kwargs
            )
        except Exception as e:  # a jinja error in the model's template: say which and why
            raise ChatFormatError(f"the chat template failed: {type(e).__name__}: {e}") from None
    if is_list:
        raise ChatFormatError(
            "the prompt is a list of messages but no chat template is applied "
            + ("(drop --no-apply-chat-template)" if has else f"({_name(tokenizer)} has none)")
        )
    return getattr(tokenizer, "bos_text", "") + prompt


def prompt_format(data_cfg) -> PromptFormat:
    """The :class:`PromptFormat` of a run config's data section (``--apply-chat-template`` ...)."""
    return PromptFormat(
        apply_chat_template=data_cfg.apply_chat_template,
        system_prompt=data_cfg.system_prompt,
        chat_template_kwargs=parse_chat_template_kwargs(data_cfg.chat_template_kwargs),
    )
