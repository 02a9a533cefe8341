"""The five MTP training regimes (``--mtp-regime``), as DESIGN §6 tabulates them."""

from __future__ import annotations

from dataclasses import dataclass

REGIMES = ("none", "detach", "ce", "policy", "occ")
# --mtp-head-loss: a head-only objective beside any regime (rl/head_loss.py); torch-free for config.py.
HEAD_LOSSES = ("none", "ce", "distill")


@dataclass(frozen=True)
class Regime:
    name: str
    runs_mtp: bool  # the MTP block runs in the training forward
    detach: bool  # MTP gradients stop at the MTP layers
    objective: str | None  # "ce" or "policy"
    adaptive: bool  # coefficient from OCC instead of the fixed --mtp-loss-coef

    @property
    def needs_old_mtp_logprobs(self) -> bool:
        return self.objective == "policy"


_TABLE = {
    "none": Regime("none", runs_mtp=False, detach=False, objective=None, adaptive=False),
    "detach": Regime("detach", runs_mtp=True, detach=True, objective="ce", adaptive=False),
    "ce": Regime("ce", runs_mtp=True, detach=False, objective="ce", adaptive=False),
    "policy": Regime("policy", runs_mtp=True, detach=False, objective="policy", adaptive=False),
    "occ": Regime("occ", runs_mtp=True, detach=False, objective="policy", adaptive=True),
}


def get_regime(name: str) -> Regime:
    try:
        return _TABLE[name]
    except KeyError:
        raise ValueError(f"unknown --mtp-regime {name!r}; choose one of {REGIMES}") from None
