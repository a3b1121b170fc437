"""One implementation of the Llama family (Llama 2/3/3.1, Mistral, Qwen2, Qwen3) on a flat token batch.

Every projection that LoRA may target is a `VirtualLoraLinear` over the shared base weight;
q/k/v and gate/up are fused at load time (one base GEMM each, LoRA slices kept apart).

The residual stream is carried as (out, delta, residual): a block's output `out`, the LoRA delta
still to be added to it (`LoraDelta` from a layer that folded its shrink into the base GEMM, or
None) and the running residual. The next RMSNorm adds all three in one op, so in inference the
o_proj/down_proj expands, the residual add and the norm are one kernel (gate_up's expand rides in
SiLU-and-mul). With autograd the same ops run one after another.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..engine.context import BatchContext
from ..kernels import attention as attn_ops
from ..kernels import fused as fused_ops
from ..kernels.lora_dropout import layer_salt
from ..kernels.rotary import split_qkv_heads
from ..kernels.smlm import LoraDelta
from ..lora.layer import VirtualLoraLinear
from .config import LORA_TARGETS, ModelArgs
from .rotary import RotaryEmbedding

# PEFT target module name -> (fused layer attribute path, slice name)
FUSED_SLICES = {
    "q_proj": ("self_attn.qkv_proj", "q_proj"),
    "k_proj": ("self_attn.qkv_proj", "k_proj"),
    "v_proj": ("self_attn.qkv_proj", "v_proj"),
    "o_proj": ("self_attn.o_proj", "o_proj"),
    "gate_proj": ("mlp.gate_up_proj", "gate_proj"),
    "up_proj": ("mlp.gate_up_proj", "up_proj"),
    "down_proj": ("mlp.down_proj", "down_proj"),
}
assert FUSED_SLICES.keys() == LORA_TARGETS.keys()


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fused_ops.rms_norm(x, self.weight, self.eps)

    def add_forward(self, out: torch.Tensor, delta: LoraDelta | None, residual: torch.Tensor | None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(h), h) with h = residual + out + delta (missing parts left out)."""
        return fused_ops.add_rms_norm(out, delta, residual, self.weight, self.eps)


def _linear(d_in: int, d_out: int, bias: bool) -> nn.Linear:
    layer = nn.Linear(d_in, d_out, bias=bias, device="meta")
    layer.requires_grad_(False)
    return layer


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, lora_slots: int, lora_rank: int, backend: str):
        super().__init__()
        self.args = args
        self.qkv_proj = VirtualLoraLinear(
            _linear(args.hidden_size, args.q_size + 2 * args.kv_size, args.attention_bias),
            ("q_proj", "k_proj", "v_proj"), (args.q_size, args.kv_size, args.kv_size),
            lora_slots, lora_rank, backend)
        self.o_proj = VirtualLoraLinear(_linear(args.q_size, args.hidden_size, False), ("o_proj",),
                                        (args.hidden_size,), lora_slots, lora_rank, backend)
        if args.qk_norm:
            self.q_norm = RMSNorm(args.head_dim, args.rms_norm_eps)
            self.k_norm = RMSNorm(args.head_dim, args.rms_norm_eps)
        self.scale = args.head_dim ** -0.5
        self.attention_backend = "auto"

    def forward(self, x: torch.Tensor, ctx: BatchContext, rotary: RotaryEmbedding,
                kv_cache: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[torch.Tensor, LoraDelta | None]:
        """(o_proj output, its pending LoRA delta or None)."""
        a = self.args
        m = ctx.attn
        # inference-only rows: the rotary kernel also writes K/V to the cache (one launch, not three)
        cached = kv_cache is not None and m.num_loss_tokens == 0 and m.slot_mapping is not None
        qkv, delta = self.qkv_proj.forward_deferred(x, ctx.lora)  # [N, q + 2 kv], pending LoRA delta or None
        if delta is not None and cached and not a.qk_norm:
            # the same launch adds the LoRA delta too (q/k norms would need it before them)
            q, k, v = rotary.lora_forward_and_cache(qkv, delta, a.num_heads, a.num_kv_heads, ctx.positions,
                                                    *kv_cache, m.slot_mapping)
        else:
            if delta is not None:
                qkv = delta.apply_(qkv)
            q, k, v = split_qkv_heads(qkv, a.num_heads, a.num_kv_heads)
            if a.qk_norm:
                q, k = self.q_norm(q), self.k_norm(k)
            if cached:
                q, k = rotary.forward_and_cache(q, k, v, ctx.positions, *kv_cache, m.slot_mapping)
            else:
                q, k = rotary(q, k, ctx.positions)
        out = self._attend(q, k, v, m, kv_cache, cached)
        return self.o_proj.forward_deferred(out.reshape(-1, a.q_size), ctx.lora)

    def _attend(self, q, k, v, m, kv_cache, cached: bool = False) -> torch.Tensor:
        parts = []
        sw = self.args.sliding_window
        n_loss = m.num_loss_tokens
        if n_loss:
            parts.append(attn_ops.varlen_causal_attention(q[:n_loss], k[:n_loss], v[:n_loss], m.loss_cu,
                                                          self.scale, sw, m.loss_cu_t, m.max_loss_len))
        if q.shape[0] > n_loss:
            with torch.no_grad():  # inference rows never reach a loss: no graph for them
                parts.append(self._attend_cached(q[n_loss:], k[n_loss:], v[n_loss:], m, kv_cache, n_loss, cached))
        return parts[0] if len(parts) == 1 else torch.cat(parts, 0)

    def _attend_cached(self, q, k, v, m, kv_cache, offset: int, cached: bool = False) -> torch.Tensor:
        """Prefill chunks then decode tokens (rows offset.. of the batch) over the paged cache;
        `cached`: their K/V are in the cache already."""
        sw = self.args.sliding_window
        parts = []
        k_cache, v_cache = kv_cache
        if not cached:
            attn_ops.write_kv(k_cache, v_cache, k, v, m.slot_mapping)
        if m.prefill_cu and m.prefill_cu[-1] > m.prefill_cu[0]:
            lo, hi = m.prefill_cu[0] - offset, m.prefill_cu[-1] - offset
            cu = [c - m.prefill_cu[0] for c in m.prefill_cu]
            w = m.num_whole_prefills
            mid = lo + cu[w]   # whole prompts in [lo, mid), chunks continuing a cached prompt after
            if w:
                # whole prompts attend only within themselves: one packed flash call on CUDA for all of
                # them (one SDPA call per prompt and layer costs host time at the start of a burst)
                parts.append(attn_ops.varlen_causal_attention(
                    q[lo:mid], k[lo:mid], v[lo:mid], cu[:w + 1], self.scale, sw,
                    m.prefill_cu_t[:w + 1], m.max_prefill_len))
            if mid < hi:
                parts.append(attn_ops.paged_prefill_attention(
                    q[mid:hi], k_cache, v_cache, m.prefill_block_tables[w:], [c - cu[w] for c in cu[w:]],
                    m.prefill_context_lens[w:], self.scale, sw, k[mid:hi], v[mid:hi], m.continuing))
        start = m.decode_start - offset
        if q.shape[0] > start:
            parts.append(attn_ops.paged_decode_attention(
                q[start:], k_cache, v_cache, m.decode_block_tables, m.decode_context_lens,
                self.scale, sw, self.attention_backend))
        return parts[0] if len(parts) == 1 else torch.cat(parts, 0)


class MLP(nn.Module):
    def __init__(self, args: ModelArgs, lora_slots: int, lora_rank: int, backend: str):
        super().__init__()
        inter = args.intermediate_size
        self.gate_up_proj = VirtualLoraLinear(_linear(args.hidden_size, 2 * inter, False),
                                              ("gate_proj", "up_proj"), (inter, inter),
                                              lora_slots, lora_rank, backend)
        self.down_proj = VirtualLoraLinear(_linear(inter, args.hidden_size, False), ("down_proj",),
                                           (args.hidden_size,), lora_slots, lora_rank, backend)

    def forward(self, x: torch.Tensor, ctx: BatchContext) -> tuple[torch.Tensor, LoraDelta | None]:
        """(down_proj output, its pending LoRA delta or None)."""
        gate_up, delta = self.gate_up_proj.forward_deferred(x, ctx.lora)
        return self.down_proj.forward_deferred(fused_ops.silu_and_mul_with_delta(gate_up, delta), ctx.lora)


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, lora_slots: int, lora_rank: int, backend: str):
        super().__init__()
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.self_attn = Attention(args, lora_slots, lora_rank, backend)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.mlp = MLP(args, lora_slots, lora_rank, backend)

    def forward(self, out, delta, residual, ctx, rotary, kv_cache):
        """One layer on the residual stream (out, delta, residual) of the previous one (see above)."""
        x, residual = self.input_layernorm.add_forward(out, delta, residual)
        out, delta = self.self_attn(x, ctx, rotary, kv_cache)
        x, residual = self.post_attention_layernorm.add_forward(out, delta, residual)
        out, delta = self.mlp(x, ctx)
        return out, delta, residual


class LlamaModel(nn.Module):
    """Decoder over a flat token batch: `forward(input_ids [N], ctx) -> hidden [N, hidden]`."""

    def __init__(self, args: ModelArgs, lora_slots: int, lora_rank: int, lora_backend: str = "auto", tp=None):
        """`tp` (a `parallel.TensorParallel`): this rank's shard; `args` are then the shard's shapes."""
        super().__init__()
        self.args = args
        self.tp = tp
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size, device="meta")
        self.embed_tokens.requires_grad_(False)
        self.layers = nn.ModuleList(DecoderLayer(args, lora_slots, lora_rank, lora_backend)
                                    for _ in range(args.num_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        vocab_rows = args.vocab_size if tp is None else args.vocab_size // tp.size   # vocab-parallel LM head
        self.lm_head = None if args.tie_word_embeddings else _linear(args.hidden_size, vocab_rows, False)
        self.rotary: RotaryEmbedding | None = None
        self.kv_caches: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        if tp is not None:
            tp.split_layers(self)

    def init_runtime(self, max_positions: int) -> None:
        """After the weights are loaded: rotary tables and empty adapter slot tables."""
        w = self.embed_tokens.weight
        a = self.args
        self.rotary = RotaryEmbedding(a.head_dim, max_positions, a.rope_theta, a.rope_scaling, w.dtype, w.device)
        for i, table in enumerate(self.virtual_layers()):
            for k, layer in enumerate(dict.fromkeys(table.values())):
                layer.allocate()
                layer.dropout_salt = layer_salt(i * len(table) + k)   # independent masks per layer

    def set_lora_fold_shrink(self, policy: str) -> None:
        for table in self.virtual_layers():
            for layer in set(table.values()):
                layer.set_fold_shrink(policy)

    def set_attention_backend(self, backend: str) -> None:
        for layer in self.layers:
            layer.self_attn.attention_backend = backend

    def virtual_layers(self) -> list[dict[str, VirtualLoraLinear]]:
        """Per decoder layer: PEFT module name -> the virtual layer holding that slice."""
        out = []
        for layer in self.layers:
            table = {}
            for name, (path, _slice) in FUSED_SLICES.items():
                mod = layer
                for part in path.split("."):
                    mod = getattr(mod, part)
                table[name] = mod
            out.append(table)
        return out

    def forward(self, input_ids: torch.Tensor, ctx: BatchContext) -> torch.Tensor:
        out, delta, residual = self.embed_tokens(input_ids), None, None
        for i, layer in enumerate(self.layers):
            out, delta, residual = layer(out, delta, residual, ctx, self.rotary,
                                         None if self.kv_caches is None else self.kv_caches[i])
        return self.norm.add_forward(out, delta, residual)[0]

    def compute_logits(self, hidden: torch.Tensor, gather: bool = True) -> torch.Tensor:
        """[N, vocab]; split over ranks, each rank's vocabulary shard [N, vocab / size] unless `gather`."""
        weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        if self.tp is not None:
            return self.tp.vocab_logits(hidden, weight, self.lm_head is None, gather)
        return F.linear(hidden, weight)
