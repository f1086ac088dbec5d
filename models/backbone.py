"""Shared GPT-2 backbone: read_in -> (+ positions) -> GPT2Block x n_layer -> ln_f -> read_out.

The reference wrapped a full ``GPT2Model`` between ``read_in`` and ``read_out`` and fed inputs as
embeddings, so its 50257-row token table was never used. We build only the parts that run: the
blocks, the final layer norm and a position embedding supplied by the subclass.

Two forwards, same parameters, same result:

* ``forward`` (the default, structured): only the last position's logit is ever read, so each
  subclass computes only what reaches it (``last_hidden``), calling the blocks' submodules
  (ln_1, attn.c_attn, attn.c_proj, ln_2, mlp) through the layer functions below, with
  ``F.scaled_dot_product_attention`` unmasked or ``is_causal=True`` so PyTorch may pick its
  flash / memory-efficient kernels, and GPT-2's tanh GELU as one fused kernel. All dropout is 0
  (``gpt2_config``), so none is applied.
* ``forward_dense`` / ``encode`` (the oracle): every layer over every position with an explicit
  (L x L) mask, as the reference ran it. Tests prove the two equal in float64.

Attention masks in the oracle (transformers 5, SDPA): ``GPT2Block(h, attention_mask=m)`` hands
``m`` untouched to ``sdpa_attention_forward``, which calls ``F.scaled_dot_product_attention(
attn_mask=m, is_causal=False)`` whenever a mask is given (``is_causal=True`` only when the mask is
None). So each layer gets an explicit boolean (1, 1, L, L) mask, True = may attend, that already
includes the causal rule. Masks live in a non-persistent buffer, so ``state_dict`` holds
parameters only.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GPT2Config
from transformers.models.gpt2.modeling_gpt2 import GPT2MLP, GPT2Attention, GPT2Block
from transformers.pytorch_utils import Conv1D


def seq_len(V: int, C: int) -> int:
    """Sequence length: V groups of (table + C columns), then separator, q1, q2."""
    return V * (C + 1) + 3


def causal_mask(L: int) -> torch.Tensor:
    """(L, L) bool, True where key <= query."""
    return torch.ones(L, L, dtype=torch.bool).tril()


def gpt2_config(cfg: dict) -> GPT2Config:
    """GPT-2 config as the reference ran it: all dropout 0, SDPA attention."""
    return GPT2Config(
        n_embd=cfg["n_embd"],
        n_layer=cfg["n_layer"],
        n_head=cfg["n_head"],
        n_positions=cfg["n_positions"],
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        use_cache=False,
        attn_implementation="sdpa",
    )


class GPT2Backbone(nn.Module):
    """Base class; subclasses pass per-layer masks (the oracle) and define
    ``position_embedding()`` and ``last_hidden()`` (the structured forward)."""

    def __init__(self, cfg: dict, masks: torch.Tensor):
        super().__init__()
        self.config = gpt2_config(cfg)
        self.n_dims, self.L = cfg["n_dims"], seq_len(cfg["V"], cfg["C"])
        E, n_layer = cfg["n_embd"], cfg["n_layer"]
        assert masks.shape == (n_layer, self.L, self.L) and masks.dtype == torch.bool
        # The structured forward applies no dropout and computes gelu_new as F.gelu(tanh).
        assert self.config.activation_function == "gelu_new"
        assert self.config.resid_pdrop == self.config.attn_pdrop == 0

        # read_in / read_out keep PyTorch's default init (they sat outside GPT2Model).
        self.read_in = nn.Linear(self.n_dims, E)
        self.blocks = nn.ModuleList(GPT2Block(self.config, layer_idx=i) for i in range(n_layer))
        self.ln_f = nn.LayerNorm(E, eps=self.config.layer_norm_epsilon)
        self.read_out = nn.Linear(E, 1)
        # (n_layer, L, L) bool, True = may attend; not saved in state_dict.
        self.register_buffer("masks", masks, persistent=False)

    def init_gpt2_weights(self, *extra: nn.Module | nn.Parameter) -> None:
        """GPT-2's default init (GPT2PreTrainedModel._init_weights) for blocks, ln_f and extras.

        Conv1D/Linear weights and embeddings N(0, 0.02), biases 0, LayerNorm 1/0, then every
        ``c_proj.weight`` (attention and MLP) N(0, 0.02 / sqrt(2 * n_layer)).
        """
        std = self.config.initializer_range
        with torch.no_grad():
            for m in [*self.blocks.modules(), self.ln_f]:
                if isinstance(m, Conv1D):
                    nn.init.normal_(m.weight, std=std)
                    nn.init.zeros_(m.bias)
                elif isinstance(m, nn.LayerNorm):
                    nn.init.ones_(m.weight)
                    nn.init.zeros_(m.bias)
            proj_std = std / math.sqrt(2 * self.config.n_layer)
            for m in self.blocks.modules():
                if isinstance(m, (GPT2Attention, GPT2MLP)):
                    nn.init.normal_(m.c_proj.weight, std=proj_std)
            for e in extra:
                nn.init.normal_(e.weight if isinstance(e, nn.Embedding) else e, std=std)

    def position_embedding(self) -> torch.Tensor:
        """(L, n_embd) position vectors added to read_in(x)."""
        raise NotImplementedError

    def layer_masks(self) -> list[torch.Tensor]:
        """Per layer, the (L, L) bool attention mask actually used (True = may attend)."""
        return list(self.masks.unbind(0))

    def check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 3 or x.shape[1:] != (self.L, self.n_dims):
            raise ValueError(
                f"expected x of shape (B, {self.L}, {self.n_dims}), got {tuple(x.shape)}"
            )

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Dense oracle: x (B, L, n_dims) -> final hidden states after ln_f, (B, L, n_embd)."""
        self.check_input(x)
        h = self.read_in(x) + self.position_embedding()  # (B, L, E)
        for block, mask in zip(self.blocks, self.masks, strict=True):
            h = block(h, attention_mask=mask[None, None])  # mask (1, 1, L, L) broadcasts
        return self.ln_f(h)

    def forward_dense(self, x: torch.Tensor) -> torch.Tensor:
        """Dense oracle: x (B, L, n_dims) -> (B,) logit at the last position."""
        return self.read_out(self.encode(x)[:, -1]).squeeze(-1)

    def last_hidden(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, L, n_dims) -> (B, n_embd), the last position after the last block, computing
        only what reaches it."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, L, n_dims) -> (B,) logit at the last position (structured; equals the oracle)."""
        self.check_input(x)
        return self.read_out(self.ln_f(self.last_hidden(x))).squeeze(-1)


# --- layer functions for the structured forward ------------------------------------------------
# Each computes what GPT2Block.forward computes on hidden states h (N, T, E) (pre-norm attention
# + residual, pre-norm MLP + residual), for one attention pattern, through the block's own
# parameters.


def _project(block: GPT2Block, a: torch.Tensor, which: str) -> tuple[torch.Tensor, ...]:
    """The parts of ``block.attn.c_attn(a)`` that ``which`` names ("qkv", "q", "kv" or "v").

    c_attn is a Conv1D, ``a @ W + b`` with W (E, 3E) laid out [q | k | v]: computing only
    some of its columns gives those columns exactly. a (..., E) -> each (..., E).
    """
    E = a.shape[-1]
    start, stop = "qkv".index(which[0]) * E, ("qkv".index(which[-1]) + 1) * E
    W, b = block.attn.c_attn.weight, block.attn.c_attn.bias
    # addmm, as Conv1D itself does (so autocast treats the bias the same way too).
    y = torch.addmm(b[start:stop], a.reshape(-1, E), W[:, start:stop])
    return y.view(*a.shape[:-1], stop - start).split(E, dim=-1)


def _heads(t: torch.Tensor, n_head: int) -> torch.Tensor:
    """(N, T, E) -> (N, H, T, E/H)."""
    N, T, E = t.shape
    return t.view(N, T, n_head, E // n_head).transpose(1, 2)


def _attend(block: GPT2Block, q, k, v, is_causal: bool) -> torch.Tensor:
    """Multi-head attention of q (N, Tq, E) over k, v (N, Tk, E) -> (N, Tq, E), before c_proj."""
    H = block.attn.num_heads
    o = F.scaled_dot_product_attention(_heads(q, H), _heads(k, H), _heads(v, H),
                                       is_causal=is_causal, scale=block.attn.scaling)
    N, _, Tq, D = o.shape
    return o.transpose(1, 2).reshape(N, Tq, H * D)


def _mlp(block: GPT2Block, h: torch.Tensor) -> torch.Tensor:
    # GPT-2's gelu_new is tanh-approximated GELU, which transformers writes out as eight
    # elementwise ops; F.gelu(approximate="tanh") is the same function in one kernel (several
    # times faster on the CPU, forward and backward). gpt2_config fixes the activation.
    mlp = block.mlp
    return h + mlp.c_proj(F.gelu(mlp.c_fc(block.ln_2(h)), approximate="tanh"))


def causal_layer(block: GPT2Block, h: torch.Tensor) -> torch.Tensor:
    """Plain causal self-attention, every position. (N, T, E) -> (N, T, E)."""
    q, k, v = _project(block, block.ln_1(h), "qkv")
    h = h + block.attn.c_proj(_attend(block, q, k, v, is_causal=True))
    return _mlp(block, h)


def last_query_layer(block: GPT2Block, h: torch.Tensor) -> torch.Tensor:
    """Causal self-attention, output of the last position only. (N, T, E) -> (N, 1, E).

    Keys and values for every position, query, projection and MLP for the last one; the last
    position may see every key, so no mask.
    """
    a = block.ln_1(h)
    k, v = _project(block, a, "kv")          # (N, T, E) each
    (q,) = _project(block, a[:, -1:], "q")   # (N, 1, E)
    h = h[:, -1:] + block.attn.c_proj(_attend(block, q, k, v, is_causal=False))
    return _mlp(block, h)


def self_only_layer(block: GPT2Block, h: torch.Tensor) -> torch.Tensor:
    """Every position attends to itself alone. (N, T, E) -> (N, T, E).

    A softmax over one key is exactly 1, so attention returns the position's own value: no
    query, key or attention needed.
    """
    (v,) = _project(block, block.ln_1(h), "v")
    h = h + block.attn.c_proj(v)
    return _mlp(block, h)
