"""The decoder: one implementation for Llama, Mistral, Qwen2/2.5, Qwen3 and Gemma-3 text, driven
by a ``ModelArch`` and, in prefill, by a ``PrunePlan``.

Module names mirror the Hugging Face checkpoints (``model.layers.3.self_attn.k_proj``...) so
weights load by name. Tokens are flattened to ``(T, hidden)``; the attention backend (see
``attention.py``) knows how they group into sequences.

POP lives in ``forward``: for every maximal run of skipped layers the residual stream passes
through unchanged (POP method, mechanism 1), and because every layer of the run therefore sees the
same hidden state ``h``, their keys and values come from a single fused projection (mechanism 2):
one RMS normalisation of ``h``, one GEMM against the run's K/V weights with each layer's input-norm
weight folded in, then each layer's own bias / k-norm / RoPE. A *prefill-only* instance is built
for one plan and holds just the pieces that path touches (``SkippedLayer``): no MLP, no Q/O
projections, no final norm, no LM head. It also runs any deeper plan (skip set a superset of its
own): that is how one prefill worker serves a nested plan family.

Vision-language checkpoints run the same stack: ``vision`` (a ``multimodal.VisionRows``) puts the
vision encoder's features in the image placeholder rows after the embedding and, for Qwen3-VL,
adds its DeepStack features after the first layers; ``(3, T)`` positions are Qwen-VL's multimodal
RoPE. Image rows are prompt rows like any other: the plan skips their layers too.
"""

from __future__ import annotations

import torch
from torch import nn

from ..pop.plan import PrunePlan
from . import cpu_blas
from .arch import ModelArch
from .layers import MLP, FusedLinear, RMSNorm, apply_rope, fuse_linears, linear, rope_cos_sin, rope_inv_freq
from .multimodal import mrope_cos_sin

CosSin = dict[str, tuple[torch.Tensor, torch.Tensor]]


class KVProjection(nn.Module):
    """K/V projections of one layer (+ k-norm). The full ``Attention`` extends it with Q and O."""

    def __init__(self, arch: ModelArch, layer: int):
        super().__init__()
        self.layer = layer
        self.num_kv_heads, self.head_dim = arch.num_kv_heads, arch.head_dim
        self.rope_kind = arch.layer_types[layer]
        self.k_proj = nn.Linear(arch.hidden_size, arch.kv_size, bias=arch.qkv_bias)
        self.v_proj = nn.Linear(arch.hidden_size, arch.kv_size, bias=arch.qkv_bias)
        self.k_norm = RMSNorm(arch.head_dim, arch.rms_norm_eps, gemma=arch.is_gemma) if arch.has_qk_norm else None

    def finish_kv(self, k: torch.Tensor, v: torch.Tensor, cos_sin: CosSin) -> tuple[torch.Tensor, torch.Tensor]:
        """Projected (T, kv_size) K/V -> per-head (T, Hkv, D): k-norm, then RoPE on K."""
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if self.k_norm is not None:
            k = self.k_norm(k)
        cos, sin = cos_sin[self.rope_kind]
        return apply_rope(k, cos, sin), v


class Attention(KVProjection):
    def __init__(self, arch: ModelArch, layer: int):
        super().__init__(arch, layer)
        self.num_heads = arch.num_heads
        self.q_proj = nn.Linear(arch.hidden_size, arch.q_size, bias=arch.qkv_bias)
        self.o_proj = nn.Linear(arch.q_size, arch.hidden_size, bias=False)
        self.q_norm = RMSNorm(arch.head_dim, arch.rms_norm_eps, gemma=arch.is_gemma) if arch.has_qk_norm else None
        self.window = arch.window_for_layer(layer)
        self.scale = arch.attn_scale
        self.qkv: FusedLinear | None = None  # set by ``fuse()`` once the weights are real
        self.o: FusedLinear | None = None  # o_proj alone in the (in, out) layout, also by ``fuse()``

    def fuse(self) -> None:
        self.qkv = fuse_linears([self.q_proj, self.k_proj, self.v_proj])
        # A one-row GEMM streams (in, out) faster here (16-17 vs 13-14 GB/s; benchmarks/results/decode/README.md).
        self.o = fuse_linears([self.o_proj])

    def forward(self, x: torch.Tensor, cos_sin: CosSin, attn) -> torch.Tensor:
        t = x.shape[0]
        cos, sin = cos_sin[self.rope_kind]
        fused = self.qkv is not None and self.qkv.is_current()
        if fused and self.q_norm is None:
            # One GEMM for q, k and v, and one RoPE over q's and k's heads together: they sit side
            # by side in the GEMM's output, so (T, H + Hkv, D) is a view (half the RoPE ops per layer).
            h, hkv, d = self.num_heads, self.num_kv_heads, self.head_dim
            qk, v = self.qkv.project(x).split_with_sizes([(h + hkv) * d, hkv * d], dim=-1)
            q, k = apply_rope(qk.view(t, h + hkv, d), cos, sin).split_with_sizes([h, hkv], dim=1)
            v = v.view(t, hkv, d)
        else:
            if fused:
                q, k, v = self.qkv(x)  # one GEMM for q, k and v
            else:
                q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
            q = q.view(t, self.num_heads, self.head_dim)
            if self.q_norm is not None:
                q = self.q_norm(q)
            q = apply_rope(q, cos, sin)
            k, v = self.finish_kv(k, v, cos_sin)
        attn.store(self.layer, k, v)
        out = attn.attend(self.layer, q, k, v, self.window, self.scale)  # (T, H, D)
        out = out.reshape(t, self.num_heads * self.head_dim)
        return self.o.project(out) if self.o is not None and self.o.is_current() else linear(self.o_proj, out)


class DecoderLayer(nn.Module):
    def __init__(self, arch: ModelArch, layer: int):
        super().__init__()
        eps, gemma = arch.rms_norm_eps, arch.is_gemma
        self.is_gemma = gemma
        self.input_layernorm = RMSNorm(arch.hidden_size, eps, gemma)
        self.self_attn = Attention(arch, layer)
        # Llama naming: post_attention_layernorm is the pre-MLP norm. Gemma-3 has four norms:
        # pre/post around attention and pre/post around the MLP ("sandwich" norms).
        self.post_attention_layernorm = RMSNorm(arch.hidden_size, eps, gemma)
        if gemma:
            self.pre_feedforward_layernorm = RMSNorm(arch.hidden_size, eps, gemma)
            self.post_feedforward_layernorm = RMSNorm(arch.hidden_size, eps, gemma)
        self.mlp = MLP(arch.hidden_size, arch.intermediate_size, arch.activation)

    def forward(self, h: torch.Tensor, cos_sin: CosSin, attn, gate: torch.Tensor | None = None) -> torch.Tensor:
        # gate: (T, 1) virtual gate (POP paper eq. 2), scales both branch outputs; None = 1.
        a = self.self_attn(self.input_layernorm(h), cos_sin, attn)
        if self.is_gemma:
            a = self.post_attention_layernorm(a)
        if gate is not None:
            a = a * gate
        h = h + a
        if self.is_gemma:
            m = self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))
        else:
            m = self.mlp(self.post_attention_layernorm(h))
        if gate is not None:
            m = m * gate
        return h + m


class SkippedLayer(nn.Module):
    """What a prefill-only instance keeps of a skipped layer: its input norm and K/V projections."""

    def __init__(self, arch: ModelArch, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, arch.is_gemma)
        self.self_attn = KVProjection(arch, layer)


class ScaledEmbedding(nn.Embedding):
    def __init__(self, vocab: int, hidden: int, scale: float):
        super().__init__(vocab, hidden)
        self.scale = scale

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = super().forward(ids)
        # Gemma multiplies by sqrt(hidden) cast to the weight dtype (as Transformers does).
        return h * torch.tensor(self.scale, dtype=h.dtype) if self.scale != 1.0 else h


class DecoderStack(nn.Module):
    def __init__(self, arch: ModelArch, prefill_only_skip: frozenset[int] | None):
        super().__init__()
        self.embed_tokens = ScaledEmbedding(arch.vocab_size, arch.hidden_size, arch.embed_scale)
        skip = prefill_only_skip or frozenset()
        self.layers = nn.ModuleList(
            SkippedLayer(arch, l) if l in skip else DecoderLayer(arch, l) for l in range(arch.num_layers)
        )
        self.norm = (
            None if prefill_only_skip is not None else RMSNorm(arch.hidden_size, arch.rms_norm_eps, arch.is_gemma)
        )


class CausalLM(nn.Module):
    """Full model, or (``prefill_only_plan`` given) the pruned prefill instance for that plan."""

    def __init__(self, arch: ModelArch, prefill_only_plan: PrunePlan | None = None):
        super().__init__()
        self.arch = arch
        self.prefill_only_plan = prefill_only_plan
        skip = frozenset(prefill_only_plan.skip_layers) if prefill_only_plan is not None else None
        self.model = DecoderStack(arch, skip)
        has_head = prefill_only_plan is None and not arch.tie_word_embeddings
        self.lm_head = nn.Linear(arch.hidden_size, arch.vocab_size, bias=False) if has_head else None
        self._inv_freq: dict[str, torch.Tensor] = {}
        self._fused: dict[tuple[int, ...], tuple] = {}
        self._head_t: tuple | None = None  # (key, (hidden, vocab) copy of the LM head), see compute_logits
        self._head_packed: cpu_blas.PackedWeight | None = None  # oneDNN's copy of the LM head

    def fuse_weights(self) -> None:
        """One GEMM for q/k/v and one for gate/up in every full layer (after the weights are real).

        The checkpoint's parameters keep their names and become views of the fused tensors, so
        nothing outside sees a difference except speed. Skipped layers of a prefill-only instance
        have no Q or MLP; their K/V go through the per-run fused projection (``_store_run_kv``).
        """
        for layer in self.model.layers:
            if isinstance(layer, DecoderLayer):
                layer.self_attn.fuse()
                layer.mlp.fuse()
        self._fused.clear()
        self._head_t = None
        self._head_packed = None

    def _apply(self, fn, recurse=True):
        # ``.to()``/``.half()`` replace parameter storage: the fused views would go stale, so fuse again.
        out = super()._apply(fn, recurse)
        if any(isinstance(ly, DecoderLayer) and ly.mlp.gate_up is not None for ly in self.model.layers):
            self.fuse_weights()
        return out

    @torch.inference_mode()
    def warm_up(self, plans: tuple[PrunePlan | None, ...] = (None,)) -> None:
        """One short forward per plan (``None``: every layer) and, on a full model, the LM head at
        one and at two rows: every GEMM weight used once before serving. On a CPU oneDNN packs each
        weight on first use (SmolLM2: a cold first request took 1.18 s against 0.40 s warm), which
        would otherwise land on the first requests; a cold process's first layer could also outlast
        a KV receiver's per-layer timeout. No K/V is stored anywhere."""
        from .attention import PrefillAttention

        n = 8
        ids = torch.arange(n, device=self.device) % self.arch.vocab_size
        for plan in plans:
            hidden = self(ids, torch.arange(n, device=self.device), PrefillAttention([0, n]), plan=plan)
        if not self.is_prefill_only:
            self.compute_logits(hidden[-2:])
            self.compute_logits(hidden[-1:])

    @property
    def is_prefill_only(self) -> bool:
        return self.prefill_only_plan is not None

    def can_run(self, plan: PrunePlan | None) -> bool:
        """Whether ``forward`` can run ``plan``. A prefill-only instance runs its own plan and any
        deeper one (a plan family, see ``PlanFamily``): a layer it keeps but the plan skips still
        has its input norm and K/V projections, so its K/V come from the last kept layer's output."""
        if not self.is_prefill_only:
            return True
        skip = frozenset(plan.skip_layers) if plan is not None else frozenset()
        return skip >= frozenset(self.prefill_only_plan.skip_layers)

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    def init_rope(self) -> None:
        """(Re)build RoPE frequency tables on the model's device (after weights are loaded)."""
        arch = self.arch
        self._inv_freq = {"full": rope_inv_freq(arch.rope_full, arch.head_dim).to(self.device)}
        self._inv_freq["sliding"] = rope_inv_freq(arch.rope_sliding or arch.rope_full, arch.head_dim).to(self.device)

    def _cos_sin(self, positions: torch.Tensor) -> CosSin:
        if not self._inv_freq:
            self.init_rope()
        kinds = set(self.arch.layer_types)
        if positions.dim() == 2:  # (3, T) temporal/height/width positions: Qwen-VL's multimodal RoPE
            section, interleaved = self.arch.mrope_section, self.arch.is_mrope_interleaved
            return {k: mrope_cos_sin(self._inv_freq[k], positions, section, self.dtype, interleaved) for k in kinds}
        return {k: rope_cos_sin(self._inv_freq[k], positions, self.dtype) for k in kinds}

    # ---- forward ------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        attn,
        plan: PrunePlan | None = None,
        gates: torch.Tensor | None = None,
        num_full_rows: int = 0,
        vision=None,
    ) -> torch.Tensor:
        """Run the stack over flattened tokens; return final hidden states (T, hidden), pre-norm.

        ``plan``: layers to skip (POP prefill). ``gates``: (L, T, 1) virtual gates for calibration.
        ``num_full_rows``: the first rows are decode tokens of a chunked-prefill step (``attn`` is a
        ``MixedAttention``): they run every layer, the plan skips layers only for the prompt-chunk
        rows after them. ``vision``: image rows of a vision-language prompt (``multimodal.VisionRows``);
        ``positions`` may then be (3, T) multimodal RoPE positions.
        """
        skip = frozenset(plan.skip_layers) if plan is not None else frozenset()
        if self.is_prefill_only and (num_full_rows or not self.can_run(plan)):
            raise ValueError(
                f"a prefill-only model built to skip {list(self.prefill_only_plan.skip_layers)} can only run plans skipping "
                f"those layers and possibly more, not {list(plan.skip_layers) if plan is not None and not num_full_rows else 'the full model'}"
            )
        cos_sin = self._cos_sin(positions)
        h = self.model.embed_tokens(input_ids)
        if vision is not None:
            h = vision.merge(h)  # image placeholder rows take the vision encoder's features
        layers = self.model.layers
        l = 0
        while l < len(layers):
            if l in skip:
                run = [l]
                # A layer that receives DeepStack features ends a run: the layers after it see h + features.
                while run[-1] + 1 in skip and run[-1] >= self.arch.num_deepstack_layers:
                    run.append(run[-1] + 1)
                if num_full_rows:
                    h = self._mixed_run(tuple(run), h, cos_sin, attn, plan, num_full_rows)
                elif plan.independent_kv:
                    self._store_run_kv(tuple(run), h, cos_sin, attn)
                l = run[-1] + 1  # residual stream unchanged across the run
                if vision is not None:
                    h = vision.inject(run[-1], h)
                continue
            gate = gates[l] if gates is not None else None
            h = layers[l](h, cos_sin, attn, gate)
            if vision is not None:
                h = vision.inject(l, h)
            l += 1
        return h

    def _mixed_run(
        self, run: tuple[int, ...], h: torch.Tensor, cos_sin: CosSin, attn, plan: PrunePlan, num_full_rows: int
    ) -> torch.Tensor:
        """A skipped run in a mixed step: decode rows through the run's layers, chunk rows skip it.

        POP per chunk: a prompt chunk's rows leave the run with their residual stream unchanged and
        only write the run's K/V (from their own hidden state, as a one-shot pruned prefill would),
        while the decode rows in the same forward (boundary tokens, generated tokens) attend and
        compute in these layers as the full model does.
        """
        d = num_full_rows
        head = {kind: (cos[:d], sin[:d]) for kind, (cos, sin) in cos_sin.items()}
        tail = {kind: (cos[d:], sin[d:]) for kind, (cos, sin) in cos_sin.items()}
        if plan.independent_kv:
            self._store_run_kv(run, h[d:], tail, attn.chunk)
        h_decode = h[:d]
        for l in run:
            h_decode = self.model.layers[l](h_decode, head, attn.decode)
        return torch.cat([h_decode, h[d:]])

    def _store_run_kv(self, run: tuple[int, ...], h: torch.Tensor, cos_sin: CosSin, attn) -> None:
        """Independent K/V for a run of skipped layers from one norm + one GEMM (shape (T, hidden))."""
        weight, bias, packed = self._fused_weights(run)
        first_norm = self.model.layers[run[0]].input_layernorm
        x = first_norm.normalize(h).to(h.dtype)  # weight-free RMS norm; weights are folded in
        kv_size = self.arch.kv_size
        # A streaming sink (the disaggregated prefill worker ships each layer as it arrives) gets
        # one GEMM per layer, so layer l's K/V leave while layer l+1's are computed instead of all
        # of the run's K/V leaving after one big GEMM (the transfer tail); the FLOPs
        # are the same. Otherwise one GEMM for the whole run.
        per_layer = getattr(attn, "stream_kv", False)
        kv = None if per_layer else cpu_blas.linear(x, weight.t(), bias, packed[0])  # (T, len(run) * 2 * kv_size)
        for i, l in enumerate(run):
            proj = self.model.layers[l].self_attn
            base = 2 * i * kv_size
            if per_layer:
                rows = slice(base, base + 2 * kv_size)
                b = bias[rows] if bias is not None else None
                kv_l, base_l = cpu_blas.linear(x, weight[rows].t(), b, packed[1 + i]), 0
            else:
                kv_l, base_l = kv, base
            k, v = proj.finish_kv(
                kv_l[:, base_l : base_l + kv_size], kv_l[:, base_l + kv_size : base_l + 2 * kv_size], cos_sin
            )
            attn.store(l, k, v)

    def _fused_weights(self, run: tuple[int, ...]):
        layers = [self.model.layers[l] for l in run]
        # Key on tensor versions so in-place weight edits (tests, calibration) rebuild the fusion.
        version = tuple(
            p._version
            for ly in layers
            for p in (ly.input_layernorm.weight, ly.self_attn.k_proj.weight, ly.self_attn.v_proj.weight)
        )
        cached = self._fused.get(run)
        if cached is not None and cached[0] == version:
            return cached[1:]
        ws, bs = [], []
        with torch.no_grad():
            for ly in layers:
                g = ly.input_layernorm.effective_weight()  # (hidden,) float32
                for proj in (ly.self_attn.k_proj, ly.self_attn.v_proj):
                    ws.append(proj.weight.float() * g[None, :])
                    if proj.bias is not None:
                        bs.append(proj.bias.float())
            weight = torch.cat(ws).to(self.dtype)
            bias = torch.cat(bs).to(self.dtype) if bs else None
        # oneDNN copies of the run's GEMM and of each layer's rows (a streaming sink's per-layer GEMMs).
        rows = 2 * self.arch.kv_size
        packed = [cpu_blas.PackedWeight(weight.t())]
        packed += [cpu_blas.PackedWeight(weight[i * rows : (i + 1) * rows].t()) for i in range(len(run))]
        self._fused[run] = (version, weight, bias, packed)
        return weight, bias, packed

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm + LM head (+ Gemma soft-capping) on (N, hidden) -> (N, vocab) float32."""
        if self.is_prefill_only:
            raise RuntimeError("a prefill-only model has no final norm or LM head")
        h = self.model.norm(hidden)
        logits = cpu_blas.linear(h, self.head_t(h), None, self._packed_head()).float()
        cap = self.arch.final_logit_softcapping
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def _packed_head(self) -> cpu_blas.PackedWeight:
        """oneDNN's copy of the LM head (used from two rows up; remade if the weight is replaced or edited)."""
        weight = self.lm_head.weight if self.lm_head is not None else self.model.embed_tokens.weight
        if self._head_packed is None or self._head_packed.w_t._base is not weight:
            self._head_packed = cpu_blas.PackedWeight(weight.t())
        return self._head_packed

    def head_t(self, h: torch.Tensor) -> torch.Tensor:
        """The LM head as (hidden, vocab) for a GEMM over ``h``: the contiguous copy (``_row_head``)
        where that layout is the faster one, else a transposed view of the checkpoint's weight."""
        weight = self.lm_head.weight if self.lm_head is not None else self.model.embed_tokens.weight
        if h.device.type == "cpu" and not torch.compiler.is_compiling():
            if cpu_blas.takes(h) and cpu_blas.active() == "onednn":
                return weight.t()  # unused: oneDNN reads its own packed copy
            if h.shape[0] == 1 or cpu_blas.takes(h):  # MKL's one-row GEMM, or OpenBLAS
                return self._row_head(weight)
        return weight.t()

    def _row_head(self, weight: torch.Tensor) -> torch.Tensor:
        """The LM head as a (hidden, vocab) copy, for one-row CPU steps on torch's GEMM and every
        step whose GEMM goes to OpenBLAS (oneDNN has its packed copy instead).

        MKL reads a one-row GEMM over that layout at ~22 GB/s here against ~12 GB/s over the
        checkpoint's (vocab, hidden) one (SmolLM2's tied head: 5 vs 9-10 ms of a ~50 ms step),
        while from 4 rows up MKL is faster over the checkpoint layout. OpenBLAS is faster over the
        copy at every row count measured (SmolLM2's head, one thread: 12 vs 23 ms at M = 2, 17 vs
        29 ms at M = 16, 48 vs 57 ms at M = 64). So both are kept: the copy costs ``vocab x
        hidden`` more memory (113 MB for SmolLM2), made the first time a step needs it and rebuilt
        if the weight changes (benchmarks/results/decode/README.md, "Decode speed").
        """
        try:
            key = (weight.data_ptr(), weight._version)
        except RuntimeError:  # an inference tensor has no version counter: it cannot be edited in place
            key = (weight.data_ptr(), None)
        if self._head_t is None or self._head_t[0] != key:
            self._head_t = (key, weight.t().contiguous())
        return self._head_t[1]
