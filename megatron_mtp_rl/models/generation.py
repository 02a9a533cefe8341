"""In-process generation with the training model: KV-cached decoding and MTP self-speculation.

Layout: one shared buffer of ``L`` cache *slots* for all rows, with per-row token positions and
validity. Every forward writes the same slot window for all rows (megatron's static KV cache
has one offset), but each row owns what its slots mean: ``pos[b, s]`` is the position of the
token in slot ``s`` of row ``b`` and ``valid[b, s]`` says whether later queries may attend to
it. Rotary tables are built per row from ``pos`` (``[L, B, 1, d]``, indexed by slot), so a row
with gaps sees exactly the relative positions of its own tokens. Prompts are left-padded
(padding slots invalid, positions start at 0 on the first prompt token, as in training).

Plain decoding runs one cached forward per token. Self-speculative decoding drafts ``D``
tokens with the MTP layers and verifies them with one cached forward of the main model,
accepting by exact speculative sampling (Leviathan et al.), so every emitted token is
distributed exactly as plain sampling would produce it. **Each row advances by its own
accepted length**: the verify window's rejected slots of a row are marked invalid (a gap),
and nothing waits for the slowest row.

**The MTP layers keep a KV cache too** (one ``StaticInferenceContext`` for the MTP block: its
layers are numbered 1..D, apart from the trunk's). A drafting round runs depth ``k`` over
the slots it has not seen (the newly verified window) plus the few trailing slots whose
depth-k entries were computed from draft tokens the previous round (depth ``k`` at a position
reads the token ``k`` ahead), which it overwrites with committed inputs; depth 1 never has any.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from megatron.core.inference.contexts import StaticInferenceContext

from megatron_mtp_rl.models.forward import gpt_forward, mtp_depth_forward, output_logits, output_weight, unwrap
from megatron_mtp_rl.models.lockstep import Lockstep
from megatron_mtp_rl.models.routing_replay import RouteRecorder, route_dtype
from megatron_mtp_rl.models.sampling_params import GroupStop, SamplingParams  # noqa: F401  (re-exported)


@dataclass
class GenerationResult:
    responses: list[list[int]]  # generated ids per row (up to and including EOS)
    logprobs: list[list[float]]  # log p(token) under the temperature-scaled main model
    finished: list[bool]  # True when the row ended with EOS
    stats: dict = field(default_factory=dict)
    aborted: list[bool] = field(default_factory=list)  # stopped by a GroupStop before its end (partial rollouts)
    # per row, the trunk's MoE routes of its input tokens [prompt + response − 1, MoE layers, topk]
    # (``record_routes``; models/routing_replay.py)
    routes: list[torch.Tensor] | None = None


def _probs(logits: torch.Tensor, params: SamplingParams, vocab_size: int) -> torch.Tensor:
    """Sampling distribution [..., V] in fp32: temperature, top-p, padded vocab removed."""
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


def _logp(logits: torch.Tensor, tokens: torch.Tensor, params: SamplingParams, vocab_size: int) -> torch.Tensor:
    t = params.temperature if params.temperature > 0 else 1.0
    lp = torch.log_softmax(logits.float()[..., :vocab_size] / t, dim=-1)
    return lp.gather(-1, tokens[..., None]).squeeze(-1)


def _sample(logits: torch.Tensor, params: SamplingParams, vocab_size: int, generator) -> torch.Tensor:
    """One token per row of ``logits [N, V]``; greedy is argmax (no distribution built)."""
    if params.temperature <= 0:
        return logits[..., :vocab_size].argmax(-1)
    return torch.multinomial(_probs(logits, params, vocab_size), 1, generator=generator).squeeze(-1)


class _Runner:
    """The slot buffer, the KV caches and the per-row bookkeeping of one generate call."""

    def __init__(
        self,
        model,
        prompts: list[list[int]],
        params: SamplingParams,
        vocab_size: int,
        slots_per_token: int,
        lockstep: Lockstep | None = None,
        width: int = 0,
    ):
        self.gpt = unwrap(model)
        self.params = params
        self.vocab_size = vocab_size
        self.lockstep = lockstep or Lockstep()
        self.B = B = len(prompts)
        self.P = P = max(width, *(len(p) for p in prompts))  # width: the widest prompt of the lockstep group
        depths = self.gpt.config.mtp_num_layers or 0
        self.L = L = P + slots_per_token * params.max_new_tokens + 1  # cache slots
        self.Lpos = Lpos = L + depths + 2  # token positions per row (finished rows run on)
        lens = torch.tensor([len(p) for p in prompts], dtype=torch.long)
        self.tokens = torch.zeros(B, L, dtype=torch.long)  # token in each slot
        self.pos = torch.zeros(B, L, dtype=torch.long)  # its position in the row
        self.valid = torch.zeros(B, L, dtype=torch.bool)
        self.seq = torch.zeros(B, Lpos, dtype=torch.long)  # tokens by position (incl. pending/drafts)
        for i, p in enumerate(prompts):
            ids = torch.tensor(p, dtype=torch.long)
            self.tokens[i, P - len(p) : P] = ids
            self.seq[i, : len(p)] = ids
            self.valid[i, P - len(p) : P] = True
        self.pos[:, :P] = (torch.arange(P)[None, :] - (P - lens)[:, None]).clamp_min(0)
        self.lens = lens  # positions emitted so far per row = next free position
        self.rows = torch.arange(B)
        self.ctx = StaticInferenceContext(B, L)
        self.mtp_ctx = StaticInferenceContext(B, L) if depths else None
        self.hidden: torch.Tensor | None = None  # [L, B, H] trunk outputs (MTP inputs)
        # Drafting state: MTP depth outputs by slot (inputs of the next depth), the slot of each
        # committed position, the first slot no depth has seen, the pending position last round.
        self.mtp_hidden: dict[int, torch.Tensor] = {}
        self.slot_of_pos = torch.zeros(B, Lpos, dtype=torch.long)
        self.slot_of_pos[:, :P] = (torch.arange(P)[None, :] + (P - lens)[:, None]).clamp_max(P - 1)
        self.mtp_seen = 0
        self.prev_lens: torch.Tensor | None = None
        self.weight = output_weight(self.gpt)
        table = self.gpt.rotary_pos_emb(Lpos)  # [Lpos, 1, 1, d]
        self.rope_table = table[:, 0, 0]
        self.freqs = table.new_zeros(L, B, 1, table.shape[-1])  # per-row rotary table by slot
        self._set_freqs(0, P)
        self.recorder = None  # a routing_replay.RouteRecorder while routes are recorded
        self.causal = torch.ones(L, L, dtype=torch.bool).tril()
        self.eye = torch.eye(L, dtype=torch.bool)

    def _set_freqs(self, start: int, end: int) -> None:
        self.freqs[start:end, :, 0] = self.rope_table[self.pos[:, start:end].t()]

    def mask(self, start: int, end: int) -> torch.Tensor:
        """[B, 1, end-start, end] True = masked: earlier valid slots of the row; every slot sees itself."""
        allowed = (self.causal[start:end, :end][None] & self.valid[:, None, :end]) | self.eye[start:end, :end][None]
        return ~allowed[:, None]

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return output_logits(self.gpt, h, weight=self.weight, gather=True)  # [s, B, V]

    def trunk(self, start: int, end: int) -> torch.Tensor:
        """Main model over slots [start, end) with the KV cache; stores and returns hidden [s, B, H]."""
        self.ctx.sequence_len_offset = start
        h = gpt_forward(
            self.gpt,
            self.tokens[:, start:end],
            self.pos[:, start:end],
            self.mask(start, end),
            with_mtp=False,
            inference_context=self.ctx,
            rotary_pos_emb=self.freqs[:end],
        ).hidden
        if self.recorder is not None:
            self.recorder.capture(start, end)
        if self.hidden is None:
            self.hidden = h.new_zeros(self.L, self.B, h.shape[-1])
        self.hidden[start:end] = h
        return h

    def draft(self, end: int, last: torch.Tensor, depths: int, generator):
        """MTP drafts after each row's last verified slot ``last [B]``, depths 1..``depths``.

        Depth ``k`` runs, with the MTP KV cache, over the slots it has not seen plus those whose
        depth-k entries the previous round computed from draft tokens (at position ``p`` it reads
        the token at ``p + k``; stale when that was past the then-pending token). Earlier slots
        hold final entries. Returns draft tokens [B, depths] and their logits [B, depths, V].
        """
        new = self.mtp_seen
        base = self.lens  # position of the pending token (last + 1)
        drafts, logits = [], []
        for k in range(1, depths + 1):
            start = new
            if k > 1 and self.prev_lens is not None:
                stale = (self.prev_lens - k + 1).clamp_min(0)
                # the lockstep group's widest window: recomputing final entries rewrites the same values
                start = self.lockstep.min(min(new, int(self.slot_of_pos[self.rows, stale].min())))
            src = self.hidden if k == 1 else self.mtp_hidden[k - 1]
            nxt_pos = (self.pos[:, start:end] + k).clamp_max(self.Lpos - 1)
            self.mtp_ctx.sequence_len_offset = start
            h = mtp_depth_forward(
                self.gpt,
                k,
                src[start:end],
                self.seq.gather(1, nxt_pos),
                nxt_pos,
                self.mask(start, end),
                self.freqs[:end],
                self.mtp_ctx,
                query_position_ids=self.pos[:, start:end],
            )
            if k < depths:
                if k not in self.mtp_hidden:
                    self.mtp_hidden[k] = h.new_zeros(self.L, self.B, h.shape[-1])
                self.mtp_hidden[k][start:end] = h
            lg = self.logits(h[last - start, self.rows][None])[0]  # [B, V]
            d = _sample(lg, self.params, self.vocab_size, generator)
            self.seq[self.rows, (base + k).clamp_max(self.Lpos - 1)] = d
            drafts.append(d)
            logits.append(lg)
        self.mtp_seen = end
        self.prev_lens = base.clone()
        return torch.stack(drafts, 1), torch.stack(logits, 1)


def generate(
    model: torch.nn.Module,
    prompts: list[list[int]],
    params: SamplingParams,
    *,
    vocab_size: int,
    generator: torch.Generator | None = None,
    speculative: bool = False,
    draft_depths: int | None = None,
    stop: GroupStop | None = None,
    record_routes: bool = False,
) -> GenerationResult:
    """Sample continuations of ``prompts`` (token id lists) with the model in eval mode.

    ``speculative`` drafts with the MTP layers (``draft_depths`` of them, all by default) and
    verifies exactly; the output distribution is that of plain sampling. ``stop``: end between
    two decoding steps once enough groups are done (partial rollouts; see :class:`GroupStop`).
    ``record_routes`` (a model built with routing replay, plain sampling): ``result.routes``, the
    trunk's MoE routes.
    """
    if record_routes and speculative:
        raise ValueError("recording MoE routes needs plain sampling (not self-speculative decoding)")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs at least one non-empty prompt")
    if stop is not None and len(stop.groups) != len(prompts):
        raise ValueError(f"GroupStop numbers {len(stop.groups)} requests, generate got {len(prompts)}")
    gpt = unwrap(model)
    D = gpt.config.mtp_num_layers or 0
    if speculative and not (D and getattr(gpt, "mtp_process", False)):
        raise ValueError("self-speculative decoding needs MTP layers (--mtp-num-layers ≥ 1)")
    depths = min(draft_depths or D, D)
    if speculative and depths < 1:
        raise ValueError(f"draft_depths must be ≥ 1, got {draft_depths}")
    was_training = model.training
    if was_training:  # a recursive walk over every module: skip it when already in eval mode
        model.eval()
    device = next(gpt.parameters()).device
    generator = generator or torch.Generator(device=device).manual_seed(0)
    if generator.device != device:
        raise ValueError(f"the generator is on {generator.device}, the model on {device}: sample where the model is")
    # CPU: DisableTorchFunction. platform/cpu.py keeps a TorchFunctionMode (it rewrites
    # megatron's device="cuda" factory calls in the pipeline schedules) that routes *every*
    # torch op through Python; generation makes no such call, and runs ~1.8x faster without it.
    # GPU: no such mode; every buffer the runner creates goes to the model's device instead.
    placement = torch._C.DisableTorchFunction() if device.type == "cpu" else torch.device(device)
    # Expert parallelism: the ranks that exchange tokens agree on rows and width (copies of the
    # first prompt fill the missing rows; their outputs are dropped) and step until all are done.
    lockstep, n = Lockstep.for_model(gpt), len(prompts)
    rows, width = lockstep.max(n, max(len(p) for p in prompts))
    prompts = prompts + [prompts[0]] * (rows - n)
    if stop is not None and rows > n:  # the stand-ins: one group of their own, done after one token
        extra = max(stop.groups) + 1
        limits = stop.limits or (params.max_new_tokens,) * n
        stop = GroupStop(
            (*stop.groups, *(extra,) * (rows - n)), stop.count + 1, (*limits, *(1,) * (rows - n)), stop.required
        )
    t0 = time.perf_counter()
    try:
        # no_grad, not inference_mode: megatron caches buffers it makes lazily (the global memory
        # buffer its EP token dispatcher gathers into), and one made under inference_mode would be
        # an inference tensor that the trainer's next in-place gather into it refuses.
        with torch.no_grad(), placement:
            run = _Runner(model, prompts, params, vocab_size, depths + 1 if speculative else 1, lockstep, width)
            run.stop = stop
            if record_routes:
                with RouteRecorder(model, run.B, run.L) as run.recorder:
                    out = _plain(run, generator)
            else:
                out = _speculative(run, depths, generator) if speculative else _plain(run, generator)
    finally:
        if was_training:
            model.train(True)
    out.responses, out.logprobs, out.finished = out.responses[:n], out.logprobs[:n], out.finished[:n]
    out.aborted = out.aborted[:n]
    elapsed = time.perf_counter() - t0
    if record_routes:
        out.routes = _row_routes(run, prompts, out.responses)
    n_tok = sum(len(r) for r in out.responses)
    out.stats.update(tokens=n_tok, seconds=elapsed, tokens_per_s=n_tok / max(elapsed, 1e-9))
    return out


def _row_routes(run: _Runner, prompts: list[list[int]], responses: list[list[int]]) -> list[torch.Tensor]:
    """Each row's routes by position (plain sampling: prompt slots, then one slot per fed token)."""
    dtype = route_dtype(run.gpt.config.num_moe_experts)
    routes = run.recorder.routes.clone()  # the recorder reuses its buffer
    out = []
    for i, (p, r) in enumerate(zip(prompts, responses)):
        rows = torch.cat([routes[i, run.P - len(p) : run.P], routes[i, run.P : run.P + len(r) - 1]])
        out.append(rows.to(dtype))
    return out


class _Output:
    """Emitted tokens and log-probs per row, written with tensor ops (no per-row Python)."""

    def __init__(self, B: int, params: SamplingParams, width: int, stop: GroupStop | None = None):
        self.params = params
        self.stop = stop
        cap = params.max_new_tokens
        limits = stop.limits if stop is not None and stop.limits is not None else [cap] * B
        self.limit = torch.tensor(limits, dtype=torch.long).clamp_max(cap)
        if stop is not None:
            self.group = torch.tensor(stop.groups, dtype=torch.long)
            self.n_groups = int(self.group.max()) + 1
        self.tokens = torch.zeros(B, width, dtype=torch.long)
        self.logprobs = torch.zeros(B, width, dtype=torch.float32)
        self.count = torch.zeros(B, dtype=torch.long)
        self.done = torch.zeros(B, dtype=torch.bool)
        self.cols = torch.arange(width)

    def add(self, tokens: torch.Tensor, logprobs: torch.Tensor, n: torch.Tensor) -> None:
        """Append the first ``n[b]`` of ``tokens[b]`` to row ``b`` (rows already done skip)."""
        n = torch.where(self.done, torch.zeros_like(n), n)
        j = torch.arange(tokens.shape[1])
        keep = j[None, :] < n[:, None]
        idx = (self.count[:, None] + j[None, :]).clamp_max(self.tokens.shape[1] - 1)
        self.tokens.scatter_(1, idx, torch.where(keep, tokens, self.tokens.gather(1, idx)))
        self.logprobs.scatter_(1, idx, torch.where(keep, logprobs, self.logprobs.gather(1, idx)))
        if self.params.eos_id is not None:
            self.done |= (keep & torch.isin(tokens, torch.tensor(self.params.stops))).any(1)
        self.count += n
        self.done |= self.count >= self.limit

    def settled(self) -> bool:
        """Every row done, or the GroupStop met (then every row is frozen as it is: a lockstep rank
        that has stopped may still have to step with the others, adding nothing)."""
        if not bool(self.done.all()) and self.stopped():
            self.done |= True
        return bool(self.done.all())

    def stopped(self) -> bool:
        """A :class:`GroupStop` is met: enough groups have every row done (the required ones among them)."""
        if self.stop is None:
            return False
        pending = torch.zeros(self.n_groups, dtype=torch.long).index_add_(0, self.group, (~self.done).long())
        return self.stop.met({int(g) for g in torch.nonzero(pending == 0).flatten()})

    def result(self, stats: dict) -> GenerationResult:
        stops = self.params.stops
        n = torch.minimum(self.count, self.limit)
        if stops:
            hit = torch.isin(self.tokens, torch.tensor(stops)) & (self.cols[None] < n[:, None])
            first = torch.where(hit.any(1), hit.float().argmax(1) + 1, n)
            n = torch.minimum(n, first)
        toks, lps, lens = self.tokens.tolist(), self.logprobs.tolist(), n.tolist()
        responses = [t[:m] for t, m in zip(toks, lens)]
        logprobs = [lp[:m] for lp, m in zip(lps, lens)]
        finished = [bool(r) and r[-1] in stops for r in responses]
        aborted = [not f and m < lim for f, m, lim in zip(finished, lens, self.limit.tolist())]
        return GenerationResult(responses, logprobs, finished, stats, aborted)


def _plain(run: _Runner, generator) -> GenerationResult:
    params, P, vocab = run.params, run.P, run.vocab_size
    out = _Output(run.B, params, params.max_new_tokens, run.stop)
    logits = run.logits(run.trunk(0, P)[-1:])[0]
    one = torch.ones(run.B, dtype=torch.long)
    s = P
    for _ in range(params.max_new_tokens):
        tok = _sample(logits, params, vocab, generator)
        out.add(tok[:, None], _logp(logits, tok, params, vocab)[:, None], one)
        if run.lockstep.all_done(out.settled()):
            break
        run.tokens[:, s] = tok
        run.pos[:, s] = run.lens
        run.valid[:, s] = True
        run.lens += 1
        run._set_freqs(s, s + 1)
        logits = run.logits(run.trunk(s, s + 1))[0]
        s += 1
    return out.result({"rounds": s - P + 1})


def _speculative(run: _Runner, D: int, generator) -> GenerationResult:
    params, P, B, vocab = run.params, run.P, run.B, run.vocab_size
    greedy = params.temperature <= 0
    out = _Output(B, params, params.max_new_tokens + D + 1, run.stop)
    logits = run.logits(run.trunk(0, P)[-1:])[0]
    # The pending token u (position lens[b]) is sampled from the main model: exact.
    u = _sample(logits, params, vocab, generator)
    out.add(u[:, None], _logp(logits, u, params, vocab)[:, None], torch.ones(B, dtype=torch.long))
    run.seq[run.rows, run.lens] = u
    last = torch.full((B,), P - 1, dtype=torch.long)  # each row's last slot with trunk hidden
    c = P  # next free slot
    rounds = emitted_rows = row_rounds = 0
    j = torch.arange(D + 1)
    while not run.lockstep.all_done(out.settled()) and c + D + 1 <= run.L:
        active = ~out.done
        drafts, q_logits = run.draft(c, last, D, generator)  # [B, D], [B, D, V]
        # Verify u, d_1..d_D in slots c..c+D: main logits for d_1..d_D and the token after d_D.
        base = run.lens  # position of u
        run.tokens[:, c : c + D + 1] = torch.cat([u[:, None], drafts], 1)
        run.pos[:, c : c + D + 1] = base[:, None] + j[None]
        run.valid[:, c : c + D + 1] = True
        run._set_freqs(c, c + D + 1)
        vl = run.logits(run.trunk(c, c + D + 1)).transpose(0, 1)  # [B, D+1, V]
        if greedy:
            top = vl[..., :vocab].argmax(-1)  # [B, D+1]
            ok = drafts == top[:, :D]
        else:
            p = _probs(vl, params, vocab)  # [B, D+1, V]
            q = _probs(q_logits, params, vocab)  # [B, D, V]
            pd = p[:, :D].gather(-1, drafts[..., None]).squeeze(-1)
            qd = q.gather(-1, drafts[..., None]).squeeze(-1)
            r = torch.rand(B, D, generator=generator)
            ok = r < torch.clamp(pd / qd.clamp_min(1e-20), max=1.0)
        # a[b] = accepted drafts: the first rejection, D when all pass.
        a = torch.where(ok.all(1), D, (~ok).float().argmax(1))
        # Next pending token: a corrected sample at the first rejection, or a bonus sample.
        if greedy:
            nxt = top[run.rows, a]
        else:
            pa = p[run.rows, a]
            qa = torch.where((a < D)[:, None], q[run.rows, a.clamp_max(D - 1)], torch.zeros_like(pa))
            resid = (pa - qa).clamp_min(0)
            dist_ = torch.where(resid.sum(-1, keepdim=True) > 0, resid, pa)
            nxt = torch.multinomial(dist_, 1, generator=generator).squeeze(-1)
        # Emit d_1..d_a and the next pending token (u was emitted when it was drawn).
        emitted = torch.where(j[None, :] == a[:, None], nxt[:, None], torch.cat([drafts, nxt[:, None]], 1))
        out.add(emitted, _logp(vl, emitted, params, vocab), a + 1)
        rounds += 1
        emitted_rows += int(((a + 1) * active).sum())
        row_rounds += int(active.sum())
        # Commit u, d_1..d_a per row: later slots of the window become a gap of that row.
        run.valid[:, c : c + D + 1] &= j[None, :] <= a[:, None]
        run.slot_of_pos.scatter_(1, (base[:, None] + j[None]).clamp_max(run.Lpos - 1), c + j[None].expand(B, -1))
        last = c + a
        run.lens = base + a + 1
        run.seq[run.rows, run.lens.clamp_max(run.Lpos - 1)] = nxt
        u = nxt
        c += D + 1
    accept = emitted_rows / max(row_rounds, 1)
    # accept_len: tokens per row per round (1 + accepted drafts), each row advancing on its own.
    return out.result({"rounds": rounds, "accept_len": accept, "row_accept_len": accept})
