"""The DEQ-Transformer language model (Bai, Kolter & Koltun, NeurIPS 2019; locuslab/deq ``DEQ-Sequence``).

One weight-tied decoder cell f is applied to its own output until it stops changing:
``z* = f(z*; u, mems)``, where u = the input injection (a 1×1 conv of the adaptive word embedding, added to the
attention's query/key/value projections) and mems = the equilibrium states and injections of the previous
``mem_len`` positions (Transformer-XL memory, carried across segments by the caller). The cell is
relative-positional multi-head attention over [mems, z] with the causal (and optional local) mask, then a
position-wise feed-forward; post-LN by default, pre-LN with ``pre_lnorm``. Layouts, names and shapes follow the
original so its state_dicts (the released WT103 checkpoint included) load unchanged.

The equilibrium, its implicit / phantom / unrolled gradient, the solvers and the Jacobian regulariser are those
of ``deqlab.DEQ``. For ``0 <= train_step < pretrain_steps`` the DEQ layer instead unrolls the cell, as the
original pretrains: ``n_layer`` times, or ``eval_n_layer`` times in eval mode at ``train_step`` 0 (the original's
rule, ``n_layer if self.training or train_step > 0 else eval_n_layer``), with no Jacobian loss. Its training
script validates with the current step (>= 1), i.e. the ``n_layer`` stack while pretraining, and so does
``deqlab``'s trainer.

Dropout is variational: one mask per forward pass, the same at every solver step (``deqlab.layers``).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deqlab.deq import DEQ
from deqlab.factory import get_deq
from deqlab.layers import CellRunner, SequenceDropout, WeightNormConv1d, WeightNormLinear, reset_per_forward
from deqlab.models.adaptive import AdaptiveEmbedding, ProjectedAdaptiveLogSoftmax, tie_adaptive

ANDERSON_WINDOW = 6  # the original's Anderson window, kept when no solver memory is given

Mems = list[Tensor]  # [z (mlen, bsz, d_model), u (mlen, bsz, 3 d_model)]


class PositionalEmbedding(nn.Module):
    """Sinusoids of the relative positions ``pos`` (klen-1 ... 0): (1, d_model, klen)."""

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.register_buffer("inv_freq", 1 / (10000 ** (torch.arange(0.0, d_model, 2.0) / d_model)))

    def forward(self, pos: Tensor) -> Tensor:
        angles = torch.outer(self.inv_freq, pos.to(self.inv_freq))
        return torch.cat([angles.sin(), angles.cos()], dim=0)[None]


class RelMultiHeadAttention(nn.Module):
    """Relative-positional multi-head self-attention with memory and input injection (Transformer-XL style)."""

    def __init__(self, d_model: int, n_head: int, d_head: int, dropout: float, dropatt: float, pre_lnorm: bool,
                 local_size: int, wnorm: bool) -> None:
        super().__init__()
        conv = WeightNormConv1d if wnorm else nn.Conv1d
        self.n_head, self.d_head, self.d_model = n_head, d_head, d_model
        self.scale = d_head ** -0.5
        self.qkv_net = conv(d_model, 3 * n_head * d_head, kernel_size=1, bias=False)
        self.r_net = conv(d_model, n_head * d_head, kernel_size=1, bias=False)
        self.r_w_bias = nn.Parameter(torch.empty(n_head, d_head).uniform_(-0.05, 0.05))
        self.r_r_bias = nn.Parameter(torch.empty(n_head, d_head).uniform_(-0.05, 0.05))
        self.o_net = conv(n_head * d_head, d_model, kernel_size=1)
        self.dropatt = SequenceDropout(dropatt)                    # one mask per (b, head, i, j)
        self.drop = SequenceDropout(dropout, shared_dims=(2,))     # per (b, feature), all positions
        self.pre_lnorm, self.local_size = pre_lnorm, local_size

    @staticmethod
    def rel_shift(x: Tensor) -> Tensor:
        """Turn scores against relative positions klen-1..0 into scores against absolute key positions."""
        b, n, q, k = x.shape
        return F.pad(x, (1, 0)).view(b, n, k + 1, q)[:, :, 1:].view_as(x)

    def forward(self, z: Tensor, pos_emb: Tensor, u: Tensor, mem: Tensor) -> Tensor:
        bsz, d_model, qlen = z.shape
        mlen = mem.shape[2]
        cat = torch.cat([mem, z], dim=2)
        if self.pre_lnorm:
            cat = F.layer_norm(cat.transpose(1, 2), (d_model,)).transpose(1, 2)
        heads = self.qkv_net(cat) + u                              # input injection
        q, k, v = heads.chunk(3, dim=1)
        klen = k.shape[2]
        q = q[:, :, -qlen:].view(bsz, self.n_head, self.d_head, qlen)
        k = k.reshape(bsz, self.n_head, self.d_head, klen)
        v = v.reshape(bsz, self.n_head, self.d_head, klen)
        r = self.r_net(pos_emb).view(self.n_head, self.d_head, pos_emb.shape[2])
        content = torch.einsum("bndi,bndj->bnij", q + self.r_w_bias[:, :, None], k)
        position = self.rel_shift(torch.einsum("bndi,ndj->bnij", q + self.r_r_bias[:, :, None], r))
        score = (content + position) * self.scale
        # causal: query i sees keys up to mlen + i; local: and none older than local_size positions
        mask = torch.triu(torch.ones(qlen, klen, dtype=torch.bool, device=z.device), diagonal=1 + mlen)
        mask |= torch.tril(torch.ones(qlen, klen, dtype=torch.bool, device=z.device),
                           diagonal=mlen - (self.local_size or 1000))
        if mask.any():
            score = score.float().masked_fill(mask, float("-inf")).type_as(score)
        prob = self.dropatt(F.softmax(score, dim=-1))
        out = torch.einsum("bnij,bndj->bndi", prob, v).reshape(bsz, self.n_head * self.d_head, qlen)
        out = self.drop(self.o_net(out)) + z
        return out if self.pre_lnorm else F.layer_norm(out.transpose(1, 2), (d_model,)).transpose(1, 2)


class PositionwiseFF(nn.Module):
    def __init__(self, d_model: int, d_inner: int, dropout: float, pre_lnorm: bool, wnorm: bool) -> None:
        super().__init__()
        linear = WeightNormLinear if wnorm else nn.Linear
        self.d_model, self.pre_lnorm = d_model, pre_lnorm
        self.ff1_net, self.ff2_net = linear(d_model, d_inner), linear(d_inner, d_model)
        self.drop1 = SequenceDropout(dropout, shared_dims=(1,))     # (b, position, feature): all positions
        self.drop2 = SequenceDropout(dropout, shared_dims=(1,))

    def forward(self, z: Tensor) -> Tensor:
        x = z.transpose(1, 2)
        if self.pre_lnorm:
            x = F.layer_norm(x, (self.d_model,))
        out = self.drop2(self.ff2_net(self.drop1(F.relu(self.ff1_net(x))))) + x
        if not self.pre_lnorm:
            out = F.layer_norm(out, (self.d_model,))
        return out.transpose(1, 2)


class DecoderCell(nn.Module):
    """f(z; u, mems, pos_emb): attention then feed-forward, on (bsz, d_model, qlen) states."""

    def __init__(self, n_head: int, d_model: int, d_head: int, d_inner: int, dropout: float, dropatt: float,
                 pre_lnorm: bool, local_size: int, wnorm: bool) -> None:
        super().__init__()
        self.dec_attn = RelMultiHeadAttention(d_model, n_head, d_head, dropout, dropatt, pre_lnorm, local_size, wnorm)
        self.pos_ff = PositionwiseFF(d_model, d_inner, dropout, pre_lnorm, wnorm)

    def forward(self, z: Tensor, us: Tensor, mem: Tensor, pos_emb: Tensor) -> Tensor:
        return self.pos_ff(self.dec_attn(z, pos_emb, us, mem))


class DEQTransformerLM(nn.Module):
    """``loss, new_mems, info = model(data, target, mems=None, train_step=-1, f_thres=None)`` on (qlen, bsz)
    token tensors; ``loss`` is the per-token NLL (qlen, bsz) in token order. The constructor takes the original's
    keyword arguments (those of ``DEQ-Sequence/models/deq_transformer.py``) plus the solver settings, which build
    its DEQ layer unless a ready one is passed as ``deq`` (as ``from_config`` does)."""

    def __init__(self, n_token: int, n_layer: int, eval_n_layer: int, n_head: int, d_model: int, d_head: int,
                 d_inner: int, dropout: float, dropatt: float, tie_weights: bool = True, d_embed: int | None = None,
                 div_val: int = 1, tie_projs: list[bool] | None = None, pre_lnorm: bool = False, wnorm: bool = False,
                 tgt_len: int | None = None, mem_len: int = 0, local_size: int = 0, pretrain_steps: int = 1,
                 cutoffs: list[int] | None = None, f_solver: str = "anderson", b_solver: str = "broyden",
                 f_thres: int = 30, b_thres: int = 40, f_eps: float = 1e-3, b_eps: float = 1e-6,
                 stop_mode: str = "rel", grad: str = "ift", phantom_steps: int = 5, phantom_tau: float = 0.5,
                 spectral_radius_mode: bool = False, init_std: float = 0.01, proj_init_std: float = 0.01,
                 f_solver_memory: int = 0, b_solver_memory: int = 0, compile: bool = False,
                 deq: DEQ | None = None) -> None:
        super().__init__()
        d_embed = d_model if d_embed is None or d_embed < 0 else d_embed
        cutoffs = list(cutoffs or [])
        self.n_token, self.d_model, self.mem_len, self.tgt_len = n_token, d_model, mem_len, tgt_len
        self.word_emb = AdaptiveEmbedding(n_token, d_embed, d_model, cutoffs, div_val=div_val)
        # as the original's VariationalDropout(dim=3), one mask per (sample, last dim) shared along dim 1: the same
        # embedding features at every position; the same positions of the (bsz, d_model, qlen) equilibrium
        self.iodrop_in = SequenceDropout(dropout, shared_dims=(1,))
        self.iodrop_out = SequenceDropout(dropout, shared_dims=(1,))
        self.pos_drop = SequenceDropout(dropout, shared_dims=(0, 2))  # positional-embedding features
        self.inject_conv = nn.Conv1d(d_model, 3 * d_model, kernel_size=1)
        self.pos_emb = PositionalEmbedding(d_model)
        self.func = DecoderCell(n_head, d_model, d_head, d_inner, dropout, dropatt, pre_lnorm, local_size, wnorm)
        self.cell = CellRunner(self.func, compile)
        self.crit = ProjectedAdaptiveLogSoftmax(n_token, d_embed, d_model, cutoffs, div_val=div_val)
        tie_adaptive(self.word_emb, self.crit, tie_weights, list(tie_projs or [False]))
        self.deq = deq if deq is not None else get_deq(
            f_solver=f_solver, b_solver=b_solver, f_max_iter=f_thres, b_max_iter=b_thres, f_tol=f_eps, b_tol=b_eps,
            stop_mode=stop_mode, grad=grad, phantom_steps=phantom_steps, phantom_tau=phantom_tau,
            b_solver_memory=b_solver_memory, spectral_radius=spectral_radius_mode,
            **self.deq_options(n_layer, eval_n_layer, pretrain_steps, f_solver, f_solver_memory))
        self.init_weights(init_std, proj_init_std)

    def init_weights(self, std: float, proj_std: float) -> None:
        """The original training script's init: N(0, std) for embeddings, plain linear/conv weights, the cluster
        weights and the attention biases, N(0, proj_std) for the embedding/softmax projections, zero biases.
        Weight-normalised layers keep PyTorch's default v and g = ||v|| (the original's init reached only their
        derived ``weight``, which is recomputed from g and v)."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv1d, nn.Embedding)) and "weight" in module._parameters:
                nn.init.normal_(module.weight, 0.0, std)
            if isinstance(module, (nn.Linear, nn.Conv1d)) and module.bias is not None \
                    and "weight" in module._parameters:
                nn.init.zeros_(module.bias)
        for proj in [*self.word_emb.emb_projs, *self.crit.out_projs]:
            if proj is not None:
                nn.init.normal_(proj.weight, 0.0, proj_std)
        if self.crit.n_clusters:
            nn.init.normal_(self.crit.cluster_weight, 0.0, std)
            nn.init.zeros_(self.crit.cluster_bias)
        nn.init.normal_(self.func.dec_attn.r_w_bias, 0.0, std)
        nn.init.normal_(self.func.dec_attn.r_r_bias, 0.0, std)

    @staticmethod
    def deq_options(n_layer: int, eval_n_layer: int, pretrain_steps: int, f_solver: str,
                    f_solver_memory: int) -> dict[str, Any]:
        """The DEQ layer's options that are this model's: the original's pretraining (``n_layer`` cells,
        ``eval_n_layer`` in eval mode at step 0, no Jacobian loss) and its Anderson window."""
        window = ANDERSON_WINDOW if f_solver == "anderson" else 0
        return dict(pretrain_steps=pretrain_steps, pretrain_depth=n_layer, eval_pretrain_depth=eval_n_layer,
                    pretrain_jac_loss=False, f_solver_memory=f_solver_memory or window)

    @classmethod
    def from_config(cls, cfg: Any, n_token: int) -> "DEQTransformerLM":
        """The model of ``MODEL.TRANSFORMER``, ``MODEL``, ``LM``, and the DEQ layer of ``deqlab.get_deq(cfg)``."""
        t = cfg.MODEL.TRANSFORMER
        cutoffs = list(t.CUTOFFS) if t.ADAPTIVE else []
        deq = get_deq(cfg, **cls.deq_options(cfg.MODEL.NUM_LAYERS, t.EVAL_N_LAYER, cfg.TRAIN.PRETRAIN_STEPS,
                                             cfg.DEQ.F_SOLVER, cfg.DEQ.F_SOLVER_MEMORY))
        return cls(n_token, cfg.MODEL.NUM_LAYERS, t.EVAL_N_LAYER, t.N_HEAD, t.D_MODEL, t.D_HEAD, t.D_INNER,
                   cfg.MODEL.DROPOUT, t.DROPATT, tie_weights=t.TIE_WEIGHTS, d_embed=t.D_EMBED, div_val=t.DIV_VAL,
                   tie_projs=[False] + [bool(t.TIE_PROJS)] * len(cutoffs), pre_lnorm=t.PRE_LNORM,
                   wnorm=cfg.MODEL.WNORM, tgt_len=cfg.LM.TGT_LEN, mem_len=cfg.LM.MEM_LEN, local_size=t.LOCAL_SIZE,
                   cutoffs=cutoffs, init_std=t.INIT_STD, proj_init_std=t.PROJ_INIT_STD, compile=cfg.MODEL.COMPILE,
                   deq=deq)

    def injection(self, data: Tensor) -> Tensor:
        """The input injection u of (qlen, bsz) tokens: (bsz, 3 d_model, qlen)."""
        emb = self.iodrop_in(self.word_emb(data.t()))                # (bsz, qlen, d_model)
        return self.inject_conv(emb.transpose(1, 2))

    def forward(self, data: Tensor, target: Tensor, mems: Mems | None = None, train_step: int = -1,
                f_thres: int | None = None, compute_jac_loss: bool = False) -> tuple[Tensor, Mems, dict[str, Any]]:
        z, new_mems, info = self.equilibrium(data, mems, train_step, f_thres, compute_jac_loss)
        hidden = self.iodrop_out(z).permute(2, 0, 1)[-target.shape[0]:]  # (tgt_len, bsz, d_model)
        loss = self.crit(hidden.reshape(-1, self.d_model), target.reshape(-1)).view(target.shape[0], -1)
        return loss, new_mems, info

    def equilibrium(self, data: Tensor, mems: Mems | None = None, train_step: int = -1, f_thres: int | None = None,
                    compute_jac_loss: bool = False, z0: Tensor | None = None) -> tuple[Tensor, Mems, dict[str, Any]]:
        """``z, new_mems, info`` of (qlen, bsz) tokens: the states z (bsz, d_model, qlen) before the output
        dropout. ``z0`` starts the solve (default zeros); generation warm-starts a new position with it."""
        reset_per_forward(self)
        qlen, bsz = data.shape
        u = self.injection(data)
        if mems:
            z_mem, u_mem = (m.permute(1, 2, 0).to(u.dtype) for m in mems)  # (bsz, ·, mlen)
        else:
            z_mem, u_mem = u.new_zeros(bsz, self.d_model, 0), u.new_zeros(bsz, 3 * self.d_model, 0)
        mlen = z_mem.shape[2]
        us = torch.cat([u_mem, u], dim=2)
        pos = torch.arange(mlen + qlen - 1, -1, -1.0, device=data.device)
        pos_emb = self.pos_drop(self.pos_emb(pos).to(u.dtype))

        def f(z: Tensor) -> Tensor:
            return self.cell(z, us, z_mem, pos_emb)

        # the state in the parameters' dtype (float32 under autocast too): the solver's residuals need it
        dtype = self.inject_conv.weight.dtype
        z0 = torch.zeros(bsz, self.d_model, qlen, dtype=dtype, device=u.device) if z0 is None else z0.to(dtype)
        z, info = self.deq(f, z0, train_step=train_step, f_max_iter=f_thres, compute_jac_loss=compute_jac_loss)
        return z, self.update_mems(z, us, z_mem), info

    def next_token_log_probs(self, z: Tensor) -> Tensor:
        """Log-probabilities over the vocabulary (bsz, n_token) of the token after the last position of ``z``."""
        return self.crit.log_prob(self.iodrop_out(z)[:, :, -1])

    @torch.no_grad()
    def update_mems(self, z: Tensor, us: Tensor, z_mem: Tensor) -> Mems:
        """The last ``mem_len`` positions of [mems, z] and of the injections, (mlen, bsz, ·), detached."""
        zs = torch.cat([z_mem, z], dim=2)
        start = max(0, zs.shape[2] - self.mem_len)
        if self.mem_len <= 0:
            start = zs.shape[2]
        return [zs[:, :, start:].permute(2, 0, 1).contiguous(), us[:, :, start:].permute(2, 0, 1).contiguous()]


def build_deq_transformer(cfg: Any, n_token: int) -> DEQTransformerLM:
    """``MODELS["lm"]["deq_transformer"]``: the model for a corpus of ``n_token`` tokens."""
    return DEQTransformerLM.from_config(cfg, n_token)
