"""In-process generation with the training model: KV-cached decoding and MTP self-speculation.

Prompts are left-padded so every row shares megatron's static KV-cache offset; pads are
masked out of attention. Plain decoding runs one cached forward per token. Self-speculative
decoding drafts ``D`` tokens with the MTP layers and verifies them with one cached forward
of the main model, accepting by exact speculative sampling (Leviathan et al.): every
emitted token is distributed exactly as plain sampling would have produced it. Rows share
the cache offset, so a round commits the draft prefix accepted by *every* row; this only
shortens rounds, the output distribution is unchanged.

The MTP layers have no KV cache here: each round re-runs them over the prefix (they are one
layer per depth). This keeps drafting exact but makes it O(prefix) per round.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from megatron.core.inference.contexts import StaticInferenceContext

from megatron_mtp_rl.models.mtp_forward import unwrap


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    max_new_tokens: int = 32
    eos_id: int | None = None


@dataclass
class GenerationResult:
    responses: list[list[int]]  # generated ids per row (up to and including EOS)
    logprobs: list[list[float]]  # log p(token) under the temperature-scaled main model
    finished: list[bool]  # True when the row ended with EOS
    stats: dict = field(default_factory=dict)


def _probs(logits: torch.Tensor, params: SamplingParams, vocab_size: int) -> torch.Tensor:
    """Sampling distribution [N, V] in fp32: temperature, top-p, padded vocab removed."""
    x = logits.float()[..., :vocab_size]
    if params.temperature <= 0:
        return torch.nn.functional.one_hot(x.argmax(-1), vocab_size).float()
    p = torch.softmax(x / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sp, idx = p.sort(dim=-1, descending=True)
        keep = (sp.cumsum(-1) - sp) < params.top_p  # always keeps the top token
        sp = sp * keep
        p = torch.zeros_like(p).scatter_(-1, idx, sp)
        p = p / p.sum(-1, keepdim=True)
    return p


def _logp(logits: torch.Tensor, tokens: torch.Tensor, params: SamplingParams, vocab_size: int):
    t = params.temperature if params.temperature > 0 else 1.0
    lp = torch.log_softmax(logits.float()[..., :vocab_size] / t, dim=-1)
    return lp.gather(-1, tokens[..., None]).squeeze(-1)


class _Runner:
    """Holds the model, the KV cache and the left-padded token buffer of one generate call."""

    def __init__(self, model, prompts, params, vocab_size):
        self.gpt = unwrap(model)
        self.params = params
        self.vocab_size = vocab_size
        self.B = len(prompts)
        self.P = max(len(p) for p in prompts)
        depths = self.gpt.config.mtp_num_layers or 0
        self.L = self.P + params.max_new_tokens + depths + 2
        self.tokens = torch.zeros(self.B, self.L, dtype=torch.long)
        self.valid = torch.zeros(self.B, self.L, dtype=torch.bool)
        for i, p in enumerate(prompts):
            self.tokens[i, self.P - len(p) : self.P] = torch.tensor(p, dtype=torch.long)
            self.valid[i, self.P - len(p) : self.P] = True
        self.ctx = StaticInferenceContext(self.B, self.L)
        self.hidden: torch.Tensor | None = None  # [L, B, H] trunk outputs (for MTP drafts)
        self.weight = (
            self.gpt.shared_embedding_or_output_weight() if self.gpt.share_embeddings_and_output_weights else None
        )

    def _mask(self, start: int, end: int) -> torch.Tensor:
        """[B, 1, end-start, end] True = masked: causal over valid keys, pads see themselves."""
        q = torch.arange(start, end)[:, None]
        k = torch.arange(end)[None, :]
        allowed = (k <= q)[None] & self.valid[:, None, :end]
        allowed = allowed | (k == q)[None]
        return ~allowed[:, None]

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        out, _ = self.gpt.output_layer(h, weight=self.weight, runtime_gather_output=True)
        return out  # [s, B, V]

    def forward(self, start: int, end: int) -> torch.Tensor:
        """Main model over positions [start, end) with the KV cache; returns hidden [s, B, H]."""
        self.ctx.sequence_len_offset = start
        pos = torch.arange(start, end).expand(self.B, -1)
        pre = self.gpt._preprocess(self.tokens[:, start:end], pos, None, self.ctx, None)
        h = self.gpt.decoder(
            hidden_states=pre[0],
            attention_mask=self._mask(start, end),
            inference_context=self.ctx,
            rotary_pos_emb=pre[1],
            rotary_pos_cos=pre[2],
            rotary_pos_sin=pre[3],
            sequence_len_offset=pre[4],
        )
        if self.hidden is None:
            self.hidden = h.new_zeros(self.L, self.B, h.shape[-1])
        self.hidden[start:end] = h
        return h

    def draft(self, n: int, generator) -> tuple[torch.Tensor, torch.Tensor]:
        """MTP drafts for positions n+2.. given the pending token at n+1; (tokens, q probs)."""
        gpt = self.gpt
        end = n + 2
        ids = self.tokens[:, :end].clone()
        pos = torch.arange(end).expand(self.B, -1)
        h = self.hidden[:end].clone()
        h[n + 1] = 0.0  # not computed yet; only positions ≤ n are read at position n
        mask = self._mask(0, end)
        rope = gpt.rotary_pos_emb(end) if gpt.position_embedding_type == "rope" else None
        drafts, qs = [], []
        for layer in gpt.mtp.layers:
            h, ids, pos, _ = layer(
                input_ids=ids,
                position_ids=pos,
                hidden_states=h,
                attention_mask=mask,
                rotary_pos_emb=rope,
                embedding=gpt.embedding,
            )
            q = _probs(self.logits(h[n : n + 1])[0], self.params, self.vocab_size)
            d = torch.multinomial(q, 1, generator=generator).squeeze(-1)
            ids = ids.clone()
            ids[:, n + 1] = d  # the next depth reads the token after this draft
            drafts.append(d)
            qs.append(q)
        return torch.stack(drafts, 1), torch.stack(qs, 1)


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    prompts: list[list[int]],
    params: SamplingParams,
    *,
    vocab_size: int,
    generator: torch.Generator | None = None,
    speculative: bool = False,
) -> GenerationResult:
    """Sample continuations of ``prompts`` (token id lists) with the model in eval mode."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs at least one non-empty prompt")
    gpt = unwrap(model)
    if speculative and not (gpt.config.mtp_num_layers and getattr(gpt, "mtp_process", False)):
        raise ValueError("self-speculative decoding needs MTP layers (--mtp-num-layers ≥ 1)")
    was_training = model.training
    model.eval()
    generator = generator or torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    try:
        run = _Runner(model, prompts, params, vocab_size)
        if speculative:
            out = _speculative(run, generator)
        else:
            out = _plain(run, generator)
    finally:
        model.train(was_training)
    elapsed = time.perf_counter() - t0
    n_tok = sum(len(r) for r in out.responses)
    out.stats.update(tokens=n_tok, seconds=elapsed, tokens_per_s=n_tok / max(elapsed, 1e-9))
    return out


class _Collector:
    def __init__(self, B, params):
        self.params = params
        self.responses = [[] for _ in range(B)]
        self.logprobs = [[] for _ in range(B)]
        self.done = [False] * B

    def add(self, row: int, token: int, logprob: float) -> None:
        if self.done[row]:
            return
        self.responses[row].append(token)
        self.logprobs[row].append(logprob)
        if token == self.params.eos_id or len(self.responses[row]) >= self.params.max_new_tokens:
            self.done[row] = True

    def all_done(self) -> bool:
        return all(self.done)

    def result(self, stats) -> GenerationResult:
        eos = self.params.eos_id
        finished = [bool(r) and r[-1] == eos for r in self.responses]
        return GenerationResult(self.responses, self.logprobs, finished, stats)


def _plain(run: _Runner, generator) -> GenerationResult:
    params, P = run.params, run.P
    col = _Collector(run.B, params)
    h = run.forward(0, P)
    logits = run.logits(h[-1:])[0]
    t = P
    for _ in range(params.max_new_tokens):
        tok = torch.multinomial(_probs(logits, params, run.vocab_size), 1, generator=generator).squeeze(-1)
        lp = _logp(logits, tok, params, run.vocab_size)
        for i in range(run.B):
            col.add(i, int(tok[i]), float(lp[i]))
        if col.all_done():
            break
        run.tokens[:, t] = tok
        run.valid[:, t] = True
        logits = run.logits(run.forward(t, t + 1))[0]
        t += 1
    return col.result({"rounds": t - P + 1})


def _speculative(run: _Runner, generator) -> GenerationResult:
    params, P, B = run.params, run.P, run.B
    D = run.gpt.config.mtp_num_layers
    col = _Collector(B, params)
    h = run.forward(0, P)
    logits = run.logits(h[-1:])[0]
    # The pending token u sits at position n+1 = P: sampled from the main model, exact.
    u = torch.multinomial(_probs(logits, params, run.vocab_size), 1, generator=generator).squeeze(-1)
    u_lp = _logp(logits, u, params, run.vocab_size)
    n = P - 1
    rounds = accepted_total = row_accept_total = 0
    while True:
        for i in range(B):
            col.add(i, int(u[i]), float(u_lp[i]))
        if col.all_done() or n + 2 + D >= run.L:
            break
        run.tokens[:, n + 1] = u
        run.valid[:, n + 1] = True
        drafts, q = run.draft(n, generator)  # [B, D], [B, D, V]
        run.tokens[:, n + 2 : n + 2 + D] = drafts
        run.valid[:, n + 2 : n + 2 + D] = True
        # Verify u, d_1..d_D: main distributions for d_1..d_D and the token after d_D.
        vl = run.logits(run.forward(n + 1, n + 2 + D))  # [D+1, B, V]
        p = torch.stack([_probs(vl[j], params, run.vocab_size) for j in range(D + 1)], 1)
        rows = torch.arange(B)
        accept_n = torch.full((B,), D, dtype=torch.long)
        for j in range(D):
            pj = p[rows, j, drafts[:, j]]
            qj = q[rows, j, drafts[:, j]]
            r = torch.rand(B, generator=generator)
            ok = r < torch.clamp(pj / qj.clamp_min(1e-20), max=1.0)
            newly_rejected = (~ok) & (accept_n == D)
            accept_n = torch.where(newly_rejected, torch.full_like(accept_n, j), accept_n)
        m = int(accept_n.min())
        # Next pending token per row: accepted draft d_{m+1}, or a corrected/bonus sample.
        nxt = torch.empty(B, dtype=torch.long)
        for i in range(B):
            a = int(accept_n[i])
            if a > m:
                nxt[i] = drafts[i, m]
            elif a < D:
                resid = (p[i, a] - q[i, a]).clamp_min(0)
                dist_ = resid if resid.sum() > 0 else p[i, a]
                nxt[i] = torch.multinomial(dist_ / dist_.sum(), 1, generator=generator)
            else:
                nxt[i] = torch.multinomial(p[i, D], 1, generator=generator)
        # Emit the m accepted drafts (u was emitted at the top of the round).
        # Slots 0..m-1 hold the accepted drafts, slot m the next pending token.
        emitted = torch.cat([drafts, nxt[:, None]], 1)
        emitted[:, m] = nxt
        lps = _logp(vl.transpose(0, 1), emitted, params, run.vocab_size)
        for j in range(m):
            for i in range(B):
                col.add(i, int(drafts[i, j]), float(lps[i, j]))
        rounds += 1
        accepted_total += m
        row_accept_total += int(accept_n.sum())
        # Commit u, d_1..d_m: the cache and trunk states at those positions are final.
        run.valid[:, n + 2 + m :] = False
        n = n + 1 + m
        u = nxt
        u_lp = lps[:, m]
    stats = {
        "rounds": rounds,
        # Tokens emitted per round (u + the drafts every row accepted).
        "accept_len": (rounds + accepted_total) / max(rounds, 1),
        # What each row alone would have accepted (1 + accepted drafts): MTP quality.
        "row_accept_len": 1 + row_accept_total / max(rounds * B, 1),
    }
    return col.result(stats)
