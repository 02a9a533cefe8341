"""A tiny Hugging Face tokenizer with a chat template, built offline for tests (no hub)."""

from __future__ import annotations

import json
from pathlib import Path

# Qwen-style ChatML with an ``enable_thinking`` switch (the --chat-template-kwargs example).
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{% if enable_thinking is defined and enable_thinking is false %}{{ '<think>\\n\\n</think>\\n\\n' }}{% endif %}"
    "{% endif %}"
)

CORPUS = [
    "What is 1+1? The answer is \\boxed{2}.",
    "Solve the following math problem step by step. Answer: 42",
    "Compute $\\frac{1}{2} + \\frac{1}{4}$ and put the final answer within \\boxed{}.",
    "Let's think step by step and output the final answer.",
    "You are a helpful assistant. user assistant system think",
]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def make_hf_tokenizer(path: str | Path, *, chat_template: str | None = CHAT_TEMPLATE, vocab_size: int = 300) -> Path:
    """Train a byte-level BPE on a few lines and save it with ``save_pretrained``; returns the dir.

    EOS is ``<|im_end|>``; ``generation_config.json`` lists ``<|endoftext|>`` as a second stop id,
    as instruct models' releases do.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    kwargs = {"chat_template": chat_template} if chat_template else {}
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", **kwargs)
    path = Path(path)
    fast.save_pretrained(str(path))
    ids = {s: tok.token_to_id(s) for s in SPECIALS}
    (path / "generation_config.json").write_text(
        json.dumps({"eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]]}), encoding="utf-8"
    )
    return path
