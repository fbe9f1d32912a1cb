"""An Ollama Modelfile for a GGUF export: FROM, a Go TEMPLATE translated from the chat template,
the default SYSTEM prompt the chat template inserts, and a stop parameter per end-of-turn token.

The translation is derived, not guessed: the model's own chat template renders a probe conversation
with marker contents, and each role's text before and after its content is read off the result.
That works for templates that wrap every message the same way per role (ChatML as SmolLM2 and Qwen
use, Llama 3's header blocks); a template whose wrapping depends on more than the role (position,
a tool call, a content-dependent branch) is refused with the reason, and the GGUF alone is written.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from loft.core.errors import ConfigError

_MARK = "\u2063LOFT{}\u2063"  # invisible separators: no template writes them


@dataclass
class Wrappers:
    """Per-role text around a message's content, the generation prompt, the default system."""

    before: dict[str, str]
    after: dict[str, str]
    prefix: str  # once, before the first message (the bos text some templates write)
    generation: str  # after the last message, to make the model answer
    default_system: str | None


ROLES = ("system", "user", "assistant")


def _render(tok: Any, messages: list[dict[str, str]], gen: bool) -> str:
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)


def probe(tok: Any) -> Wrappers:
    """Read each role's wrapping off the model's own chat template; refused when the wrappers do
    not reproduce the template on a multi-turn conversation and on a bare user turn."""
    if not getattr(tok, "chat_template", None):
        raise ConfigError("the tokenizer has no chat template to translate for Ollama")
    msgs = [{"role": r, "content": _MARK.format(i)} for i, r in enumerate(ROLES)]
    msgs.append({"role": "user", "content": _MARK.format(3)})
    text = _render(tok, msgs, gen=True)
    spans = []
    for i in range(len(msgs)):
        at = text.find(_MARK.format(i))
        if at < 0 or text.count(_MARK.format(i)) != 1:
            raise ConfigError("the chat template does not write each message's content once")
        spans.append((at, at + len(_MARK.format(i))))
    ends = _end_tokens(tok)
    before: dict[str, str] = {}
    after: dict[str, str] = {}
    for i, m in enumerate(msgs):
        nxt = spans[i + 1][0] if i + 1 < len(spans) else len(text)
        tail = text[spans[i][1] : nxt]
        after_i = _after_text(tail, ends)
        if after.setdefault(m["role"], after_i) != after_i:
            raise ConfigError(f"the chat template closes {m['role']} messages in more than one way")
        if i + 1 < len(msgs):
            role = msgs[i + 1]["role"]
            b = tail[len(after_i) :]
            if before.setdefault(role, b) != b:
                raise ConfigError(f"the chat template opens {role} messages in more than one way")
    generation = text[spans[-1][1] + len(after["user"]) :]
    first = text[: spans[0][0]]
    bos = tok.bos_token or ""  # written once at the start, unless every message opens with it
    prefix = bos if bos and first.startswith(bos) and not before["user"].startswith(bos) else ""
    before["system"] = first[len(prefix) :]
    default_system = None
    bare = _render(tok, [{"role": "user", "content": _MARK.format(9)}], gen=False)
    head = prefix + before["system"]
    lead = bare[: bare.find(_MARK.format(9)) - len(before["user"])]
    if lead.startswith(head) and lead.endswith(after["system"]) and len(lead) > len(head):
        default_system = lead[len(head) : len(lead) - len(after["system"])]
    w = Wrappers(before, after, prefix, generation, default_system)
    _check(tok, w)
    return w


def _end_tokens(tok: Any) -> list[str]:
    """The special tokens that end a turn (the chat template is probed once, here)."""
    from loft.data.preference import end_of_turn_ids

    ids = end_of_turn_ids(tok)
    return [
        t for t in getattr(tok, "all_special_tokens", []) if tok.convert_tokens_to_ids(t) in ids
    ]


def _after_text(tail: str, ends: list[str]) -> str:
    """What closes a message: the text up to and including the first end-of-turn token in
    ``ends``, and the newlines right after it."""
    hits = [(tail.find(t), t) for t in ends if t in tail]
    if not hits:
        raise ConfigError(
            "cannot find the end-of-turn token the chat template writes after a message"
        )
    at, token = min(hits)
    stop = at + len(token)
    while stop < len(tail) and tail[stop] == "\n":
        stop += 1
    return tail[:stop]


def render(w: Wrappers, messages: list[dict[str, str]], gen: bool = True) -> str:
    """What the Go template renders for ``messages`` (Ollama puts SYSTEM first when none is)."""
    if w.default_system is not None and (not messages or messages[0]["role"] != "system"):
        messages = [{"role": "system", "content": w.default_system}, *messages]
    body = "".join(w.before[m["role"]] + m["content"] + w.after[m["role"]] for m in messages)
    return w.prefix + body + (w.generation if gen else "")


def _check(tok: Any, w: Wrappers) -> None:
    convs = [
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "Bye"},
        ],
        [{"role": "user", "content": "Hi"}],
    ]
    for conv in convs:
        if render(w, conv) != _render(tok, conv, gen=True):
            raise ConfigError(
                "the chat template does not translate to per-role wrappers for Ollama",
                hint="Write the Modelfile's TEMPLATE by hand; the GGUF carries the chat template.",
            )


def go_template(w: Wrappers) -> str:
    """Ollama's Go template for these wrappers: one branch per role over ``.Messages``."""
    branches = "".join(
        ("{{ if" if i == 0 else "{{ else if") + f' eq .Role "{role}" }}}}'
        + w.before[role] + "{{ .Content }}" + w.after[role]
        for i, role in enumerate(ROLES)
    )  # fmt: skip
    return w.prefix + "{{ range .Messages }}" + branches + "{{ end }}{{ end }}" + w.generation


def stop_tokens(tok: Any, w: Wrappers) -> list[str]:
    """The special tokens that close a message (Ollama stops generating at each)."""
    closing = "".join(w.after.values())
    return sorted(t for t in getattr(tok, "all_special_tokens", []) if t and t in closing)


def modelfile(gguf_name: str, tok: Any) -> str:
    """The Modelfile text for ``gguf_name`` (a path relative to the Modelfile)."""
    w = probe(tok)
    lines = [f"FROM ./{gguf_name}", f'TEMPLATE """{go_template(w)}"""']
    if w.default_system:
        lines.append(f'SYSTEM """{w.default_system}"""')
    lines += [f'PARAMETER stop "{s}"' for s in stop_tokens(tok, w)]
    return "\n".join(lines) + "\n"


__all__ = ["Wrappers", "go_template", "modelfile", "probe", "render", "stop_tokens"]
