"""Run an export with the runtime users run it with, and compare greedy outputs with transformers.

``llama_greedy`` loads a GGUF (and optionally a GGUF LoRA) in llama.cpp through llama-cpp-python
(the ``export`` extra) and continues token ids greedily; ``transformers_greedy`` does the same with
a transformers model. Both stop at the end-of-turn ids, so a per-prompt comparison is exact.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from loft.core.errors import ConfigError

NEW_TOKENS = 32
# everyday chat prompts: the outputs are ordinary language, so greedy ties are rare
CHAT_PROMPTS = [
    "What is the capital of France?", "Name three primary colours.", "Write a haiku about rain.",
    "What is 12 times 12?", "Give me a synonym for happy.", "Why is the sky blue?",
    "List two mammals that can fly.", "Translate 'thank you' into Spanish.",
    "What does CPU stand for?", "Suggest a name for a cat.", "How many days are in a leap year?",
    "What is the boiling point of water?", "Describe a triangle.", "Who wrote Hamlet?",
    "What is the opposite of cold?", "Name a planet with rings.", "What colour is a ripe banana?",
    "How many legs does a spider have?", "What is the largest ocean?", "Spell 'necessary'.",
]  # fmt: skip


def chat_prompt_ids(tokenizer: Any, prompts: list[str]) -> list[list[int]]:
    """Each prompt as one user turn, rendered with the chat template and the generation prompt."""
    out = []
    for p in prompts:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": p}], add_generation_prompt=True
        )
        out.append(list(ids["input_ids"] if hasattr(ids, "keys") else ids))
    return out


def cut(tokens: list[int], eos: list[int], new_tokens: int = NEW_TOKENS) -> list[int]:
    for i, t in enumerate(tokens):
        if t in eos:
            return tokens[: i + 1]
    return tokens[:new_tokens]


def transformers_greedy(
    model: Any, prompts: list[list[int]], eos: list[int], new_tokens: int = NEW_TOKENS
) -> list[list[int]]:
    """Greedy continuations of ``prompts`` (token ids), all in one left-padded batch."""
    import torch

    if not prompts:
        return []
    width = max(len(ids) for ids in prompts)
    x = torch.full((len(prompts), width), eos[0], dtype=torch.long)
    mask = torch.zeros_like(x)
    for row, ids in enumerate(prompts):
        x[row, width - len(ids) :] = torch.tensor(ids)
        mask[row, width - len(ids) :] = 1
    with torch.no_grad():
        g = model.generate(
            input_ids=x, attention_mask=mask, max_new_tokens=new_tokens,
            do_sample=False, eos_token_id=eos, pad_token_id=eos[0],
        )  # fmt: skip
    return [cut(row, eos, new_tokens) for row in g[:, width:].tolist()]


def llama_greedy(
    path: Path,
    prompts: list[list[int]],
    eos: list[int],
    *,
    lora: Path | None = None,
    new_tokens: int = NEW_TOKENS,
    threads: int | None = None,
) -> list[list[int]]:
    """Greedy continuations from llama.cpp (temperature 0, no repeat penalty), on ``threads``
    threads (default: torch's, which follows OMP_NUM_THREADS: llama.cpp's threads spin at each
    barrier, so more threads than free cores make it many times slower, not faster)."""
    if threads is None:
        import torch

        threads = torch.get_num_threads()
    try:
        import llama_cpp
    except ImportError:
        raise ConfigError(
            "llama-cpp-python is not installed (the `export` extra)",
            hint='CMAKE_ARGS="-DGGML_NATIVE=OFF" pip install "loft[export]" (builds llama.cpp).',
        ) from None
    llm = llama_cpp.Llama(
        model_path=str(path), lora_path=str(lora) if lora else None, n_ctx=512,
        n_threads=threads, seed=0, verbose=False,
    )  # fmt: skip
    out = []
    for ids in prompts:
        toks: list[int] = []
        for t in llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, repeat_penalty=1.0, reset=True):
            toks.append(t)
            if t in eos or len(toks) == new_tokens:
                break
        out.append(cut(toks, eos, new_tokens))
    return out


def identical(a: list[list[int]], b: list[list[int]]) -> int:
    return sum(x == y for x, y in zip(a, b, strict=True))


__all__ = ["CHAT_PROMPTS", "chat_prompt_ids", "identical", "llama_greedy", "transformers_greedy"]
