"""Tokenizers: a character vocabulary for the built-in task, bytes for any text, HF for real models.

Token ids 0, 1, 2 are PAD, BOS and EOS in the built-in tokenizers.
"""

from __future__ import annotations

from typing import Protocol

PAD, BOS, EOS = 0, 1, 2


class Tokenizer(Protocol):
    vocab_size: int
    pad_id: int
    bos_id: int | None
    eos_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class CharTokenizer:
    """One token per character of a fixed alphabet (the ``arith`` task's ``0-9+-*= ``)."""

    def __init__(self, alphabet: str):
        if len(set(alphabet)) != len(alphabet):
            raise ValueError("alphabet has repeated characters")
        self.alphabet = alphabet
        self._ids = {c: i + 3 for i, c in enumerate(alphabet)}
        self.vocab_size = len(alphabet) + 3
        self.pad_id, self.bos_id, self.eos_id = PAD, BOS, EOS

    def encode(self, text: str) -> list[int]:
        try:
            return [self._ids[c] for c in text]
        except KeyError as e:
            raise ValueError(f"character {e.args[0]!r} is not in the tokenizer alphabet {self.alphabet!r}") from None

    def decode(self, ids: list[int]) -> str:
        return "".join(self.alphabet[i - 3] for i in ids if 3 <= i < self.vocab_size)


class ByteTokenizer:
    """UTF-8 bytes shifted by 3: any text, 259 tokens."""

    def __init__(self):
        self.vocab_size = 259
        self.pad_id, self.bos_id, self.eos_id = PAD, BOS, EOS

    def encode(self, text: str) -> list[int]:
        return [b + 3 for b in text.encode("utf-8")]

    def decode(self, ids: list[int]) -> str:
        return bytes(i - 3 for i in ids if 3 <= i < 259).decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face tokenizer loaded from a local directory (needs ``transformers``)."""

    def __init__(self, path: str):
        try:
            from transformers import AutoTokenizer
        except ImportError:
            raise ImportError("--tokenizer hf:PATH needs the 'transformers' package") from None
        self._tok = AutoTokenizer.from_pretrained(path)
        self.vocab_size = len(self._tok)
        self.eos_id = self._tok.eos_token_id
        self.bos_id = self._tok.bos_token_id
        self.pad_id = self._tok.pad_token_id if self._tok.pad_token_id is not None else self.eos_id

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False)

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)


ARITH_ALPHABET = "0123456789+-*= "


def build_tokenizer(name: str) -> Tokenizer:
    """``arith`` | ``byte`` | ``hf:/path/to/tokenizer``."""
    if name == "arith":
        return CharTokenizer(ARITH_ALPHABET)
    if name == "byte":
        return ByteTokenizer()
    if name.startswith("hf:"):
        return HFTokenizer(name[3:])
    raise ValueError(f"unknown --tokenizer {name!r}; use 'arith', 'byte' or 'hf:PATH'")
