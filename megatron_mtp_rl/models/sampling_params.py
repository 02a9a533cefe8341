"""How to sample a response; torch-free, so processes that only talk to SGLang (engine and router
actors, clients) can import it without megatron-core."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    max_new_tokens: int = 32
    eos_id: int | None = None
    stop_ids: tuple[int, ...] = ()  # more ids that end a response (an instruct model's extra EOS ids)

    @property
    def stops(self) -> tuple[int, ...]:
        """Every id that ends a response (``eos_id`` first); empty = never stop early."""
        if self.eos_id is None:
            return ()
        return tuple(dict.fromkeys((self.eos_id, *self.stop_ids)))


@dataclass(frozen=True)
class GroupStop:
    """Partial rollouts: stop decoding once ``count`` groups have every row done.

    ``groups[i]`` numbers request ``i``'s group; ``limits[i]`` (optional) is request ``i``'s own
    token budget (a continued sample has used part of ``max_new_tokens`` already). Rows still
    decoding at the stop come back unfinished with the tokens they have (``aborted``).
    ``required``: groups that must be done too before the stop (with ``--max-off-policy-steps``, a
    group carried once more would be too old to train: stopping it would waste its tokens).
    """

    groups: tuple[int, ...]
    count: int
    limits: tuple[int, ...] | None = None
    required: tuple[int, ...] = ()

    def met(self, done: set[int]) -> bool:
        """Whether the groups in ``done`` (every row finished) end the generation."""
        return len(done) >= self.count and all(g in done for g in self.required)
