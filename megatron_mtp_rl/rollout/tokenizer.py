"""Tokenizers: a character vocabulary for the built-in task, bytes for any text, HF for real models.

Token ids 0, 1, 2 are PAD, BOS and EOS in the built-in tokenizers. A real model's tokenizer is a
local Hugging Face tokenizer directory (nothing is fetched from a hub); a converted checkpoint
carries one in ``<checkpoint>/tokenizer`` so ``--load`` finds it without a ``--tokenizer`` flag.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Protocol

from megatron_mtp_rl.errors import ConfigError

PAD, BOS, EOS = 0, 1, 2

# Where a Megatron checkpoint directory (``--save`` / ``--load``) keeps its HF tokenizer.
CHECKPOINT_TOKENIZER_DIR = "tokenizer"

# The files ``save_pretrained`` writes and model repositories ship; weights and configs stay behind.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "tokenizer.model",
    "spiece.model",
)


class TokenizerError(ConfigError):
    """The tokenizer cannot be used as asked (missing directory, vocabulary too large...)."""


class Tokenizer(Protocol):
    vocab_size: int
    pad_id: int
    bos_id: int | None  # prepended to every prompt by the rollout manager when not None
    eos_id: int
    stop_ids: tuple[int, ...]  # every id that ends a response (EOS first)

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class CharTokenizer:
    """One token per character of a fixed alphabet (the ``arith`` task's ``0-9+-*= ``)."""

    chat_template = None

    def __init__(self, alphabet: str):
        if len(set(alphabet)) != len(alphabet):
            raise ValueError("alphabet has repeated characters")
        self.alphabet = alphabet
        self._ids = {c: i + 3 for i, c in enumerate(alphabet)}
        self.vocab_size = len(alphabet) + 3
        self.pad_id, self.bos_id, self.eos_id = PAD, BOS, EOS
        self.stop_ids = (EOS,)

    def encode(self, text: str) -> list[int]:
        try:
            return [self._ids[c] for c in text]
        except KeyError as e:
            raise ValueError(f"character {e.args[0]!r} is not in the tokenizer alphabet {self.alphabet!r}") from None

    def decode(self, ids: list[int]) -> str:
        return "".join(self.alphabet[i - 3] for i in ids if 3 <= i < self.vocab_size)


class ByteTokenizer:
    """UTF-8 bytes shifted by 3: any text, 259 tokens."""

    chat_template = None

    def __init__(self):
        self.vocab_size = 259
        self.pad_id, self.bos_id, self.eos_id = PAD, BOS, EOS
        self.stop_ids = (EOS,)

    def encode(self, text: str) -> list[int]:
        return [b + 3 for b in text.encode("utf-8")]

    def decode(self, ids: list[int]) -> str:
        return bytes(i - 3 for i in ids if 3 <= i < 259).decode("utf-8", errors="replace")


def _generation_eos(path: Path) -> list[int]:
    """``eos_token_id`` of ``generation_config.json`` (an int or a list; instruct models list several)."""
    f = path / "generation_config.json"
    if not f.exists():
        return []
    try:
        eos = json.loads(f.read_text(encoding="utf-8")).get("eos_token_id")
    except (json.JSONDecodeError, AttributeError):
        return []
    if isinstance(eos, int):
        return [eos]
    return [int(e) for e in eos or [] if isinstance(e, int)]


class HFTokenizer:
    """A Hugging Face tokenizer loaded from a local directory (needs ``transformers``).

    Prompts are encoded without special tokens: the prompt text already holds them (a chat
    template writes its own; :func:`megatron_mtp_rl.rollout.chat.format_prompt` writes the BOS
    text a plain prompt needs), so the tokens are exactly ``apply_chat_template``'s and the
    rollout dump shows exactly what the model saw. Hence ``bos_id`` is None here.
    """

    def __init__(self, path: str | Path, extra_stop_ids: tuple[int, ...] = ()):
        path = Path(path)
        if not path.is_dir():
            raise TokenizerError(
                f"tokenizer directory {path} does not exist (--tokenizer expects a local HF directory)"
            )
        try:
            from transformers import AutoTokenizer
        except ImportError:
            raise TokenizerError("an HF tokenizer directory needs the 'transformers' package") from None
        core = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model", "spiece.model")
        if not any((path / n).is_file() for n in core):
            raise TokenizerError(f"{path} holds no tokenizer files (expected one of {', '.join(core)})")
        try:
            self._tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except Exception as e:  # transformers raises many kinds; the user needs the path and the reason
            reason = " ".join(str(e).split())[:300]
            raise TokenizerError(f"cannot load the HF tokenizer in {path}: {type(e).__name__}: {reason}") from None
        self.path = path
        self.vocab_size = len(self._tok)
        eos = self._tok.eos_token_id
        gen = _generation_eos(path)
        if eos is None and gen:
            eos = gen[0]
        if eos is None:
            raise TokenizerError(f"the tokenizer in {path} defines no EOS token; pass one with --stop-token-ids")
        self.eos_id = int(eos)
        self.stop_ids = tuple(dict.fromkeys([self.eos_id, *gen, *(int(i) for i in extra_stop_ids)]))
        bad = [i for i in self.stop_ids if not 0 <= i < self.vocab_size]
        if bad:
            raise TokenizerError(f"stop token id(s) {bad} are outside the tokenizer's vocabulary of {self.vocab_size}")
        self.pad_id = self._tok.pad_token_id if self._tok.pad_token_id is not None else self.eos_id
        self.bos_id = None
        self.bos_text = self._default_bos()
        self.chat_template = self._tok.chat_template

    def _default_bos(self) -> str:
        """The BOS text the tokenizer's own ``encode`` puts in front of a plain text ('' if none)."""
        bos = self._tok.bos_token_id
        if bos is None:
            return ""
        ids = self._tok.encode("a", add_special_tokens=True)
        return self._tok.bos_token if ids and ids[0] == bos else ""

    @property
    def hf(self):
        """The underlying ``transformers`` tokenizer (chat templates, batch encoding)."""
        return self._tok

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Many texts at once (the Rust tokenizer runs them in parallel): the start-up length scan."""
        if not texts:
            return []
        backend = getattr(self._tok, "backend_tokenizer", None)  # the Rust tokenizer: ~1.8x faster than the wrapper
        if backend is not None:
            return [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]
        return self._tok(texts, add_special_tokens=False)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        # a model may have more embedding rows than the tokenizer has ids (padding rows): drop those
        return self._tok.decode([i for i in ids if i < self.vocab_size], skip_special_tokens=True)


ARITH_ALPHABET = "0123456789+-*= "


def checkpoint_tokenizer_dir(load_dir: str | Path | None) -> Path | None:
    """``<load>/tokenizer`` when the checkpoint carries an HF tokenizer (the converter copies one); an HF
    checkpoint directory's own tokenizer files (``train --load HF_DIR``)."""
    if not load_dir:
        return None
    for d in (Path(load_dir) / CHECKPOINT_TOKENIZER_DIR, Path(load_dir)):
        if (d / "tokenizer_config.json").exists() or (d / "tokenizer.json").exists():
            return d
    return None


def build_tokenizer(name: str, *, extra_stop_ids: tuple[int, ...] = ()) -> Tokenizer:
    """``arith`` | ``byte`` | a local HF tokenizer directory (``DIR`` or ``hf:DIR``)."""
    if name == "arith":
        tok: Tokenizer = CharTokenizer(ARITH_ALPHABET)
    elif name == "byte":
        tok = ByteTokenizer()
    else:
        path = name[3:] if name.startswith("hf:") else name
        if not Path(path).is_dir():
            raise TokenizerError(
                f"unknown --tokenizer {name!r}: expected 'arith', 'byte' or a local HF tokenizer directory"
            )
        return HFTokenizer(path, extra_stop_ids=extra_stop_ids)
    if extra_stop_ids:
        bad = [i for i in extra_stop_ids if not 0 <= i < tok.vocab_size]
        if bad:
            raise TokenizerError(f"--stop-token-ids {bad} are outside the {name} tokenizer's {tok.vocab_size} ids")
        tok.stop_ids = tuple(dict.fromkeys([*tok.stop_ids, *extra_stop_ids]))
    return tok


def check_vocab(tokenizer: Tokenizer, model_vocab_size: int, where: str = "the model") -> None:
    """Refuse a tokenizer whose ids the model has no embedding rows for (they would index out of range)."""
    if tokenizer.vocab_size > model_vocab_size:
        src = getattr(tokenizer, "path", None)
        name = f"the tokenizer in {src}" if src else "the tokenizer"
        raise TokenizerError(
            f"{name} has {tokenizer.vocab_size} tokens but {where} has a vocabulary of {model_vocab_size}: "
            "use the tokenizer the checkpoint was trained with"
        )


def copy_tokenizer_files(src_dir: str | Path, dst_dir: str | Path) -> list[str]:
    """Copy an HF checkpoint's tokenizer files into ``dst_dir`` (created); returns the names copied.

    Used by the converter (``dst_dir = <save>/tokenizer``) so that ``--load`` runs with the
    tokenizer the weights were trained with.
    """
    src, dst = Path(src_dir), Path(dst_dir)
    names = [n for n in TOKENIZER_FILES if (src / n).is_file()]
    if not any(n in names for n in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")):
        return []
    dst.mkdir(parents=True, exist_ok=True)
    for n in names:
        shutil.copy2(src / n, dst / n)
    return names


def parse_stop_ids(text: str | None) -> tuple[int, ...]:
    """``--stop-token-ids 151643,151645`` → ``(151643, 151645)``."""
    if not text:
        return ()
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise TokenizerError(f"--stop-token-ids {text!r}: expected comma-separated integers") from None
