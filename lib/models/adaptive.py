"""Adaptive input embeddings and the projected adaptive log-softmax (Baevski & Auli 2019; Grave et al. 2017),
with the parameter names and layouts of locuslab/deq (from Transformer-XL) so its checkpoints load.

The vocabulary is cut at ``cutoffs`` into a head cluster (the most frequent tokens) and tail clusters; cluster i
has embedding width ``d_embed // div_val**i`` and a projection to ``d_proj``. The softmax scores the head tokens
plus one logit per tail cluster, then the tokens inside the target's tail cluster. With ``tie_weights`` the
softmax's per-cluster weights are the embedding tables (the same Parameters); with ``tie_projs`` the tail
clusters' softmax projections are the embedding projections.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deqlab.errors import ConfigError


def cluster_widths(d_embed: int, div_val: int, n_clusters: int) -> list[int]:
    """Embedding width of each cluster, ``d_embed // div_val**i`` (floor, as the original: WT103's 700 with
    div_val 4 gives 700, 175, 43, 10); refuses a cluster that would get no width at all."""
    if div_val == 1:
        return [d_embed]
    widths = [d_embed // div_val ** i for i in range(n_clusters)]
    if widths[-1] < 1:
        raise ConfigError(f"d_embed {d_embed} is too small for div_val {div_val} and {n_clusters} clusters: cluster "
                          f"{n_clusters - 1} would get width d_embed // div_val**{n_clusters - 1} = 0; raise "
                          f"MODEL.TRANSFORMER.D_EMBED to at least {div_val ** (n_clusters - 1)}, or lower DIV_VAL or "
                          f"the number of CUTOFFS")
    return widths


def check_cutoffs(n_token: int, cutoffs: list[int]) -> list[int]:
    """``cutoffs + [n_token]``, strictly increasing and inside the vocabulary."""
    bounds = list(cutoffs) + [n_token]
    if any(b <= a for a, b in zip([0] + bounds, bounds)):
        raise ConfigError(f"adaptive softmax cutoffs {list(cutoffs)} must increase strictly and stay below the "
                          f"vocabulary size {n_token} (MODEL.TRANSFORMER.CUTOFFS)")
    return bounds


class AdaptiveEmbedding(nn.Module):
    """Token ids (any shape) → embeddings of width ``d_proj``, scaled by √d_proj."""

    def __init__(self, n_token: int, d_embed: int, d_proj: int, cutoffs: list[int], div_val: int = 1) -> None:
        super().__init__()
        self.bounds = check_cutoffs(n_token, cutoffs)
        self.d_embed, self.d_proj, self.div_val = d_embed, d_proj, div_val
        self.scale = d_proj ** 0.5
        widths = cluster_widths(d_embed, div_val, len(self.bounds))
        starts = [0] + self.bounds
        if div_val == 1:
            self.emb_layers = nn.ModuleList([nn.Embedding(n_token, d_embed)])
            self.emb_projs = nn.ModuleList([nn.Linear(d_embed, d_proj, bias=False)] if d_proj != d_embed else [])
        else:
            self.emb_layers = nn.ModuleList(nn.Embedding(hi - lo, w) for lo, hi, w in zip(starts, self.bounds, widths))
            self.emb_projs = nn.ModuleList(nn.Linear(w, d_proj, bias=False) for w in widths)

    def forward(self, tokens: Tensor) -> Tensor:
        if self.div_val == 1:
            embed = self.emb_layers[0](tokens)
            if self.emb_projs:
                embed = F.linear(embed, self.emb_projs[0].weight)
            return embed * self.scale
        flat = tokens.reshape(-1)
        out = None
        for lo, hi, table, proj in zip([0] + self.bounds, self.bounds, self.emb_layers, self.emb_projs):
            index = ((flat >= lo) & (flat < hi)).nonzero().squeeze(1)
            if index.numel() == 0:
                continue
            emb = F.linear(table(flat[index] - lo), proj.weight)
            if out is None:
                out = emb.new_zeros(flat.shape[0], self.d_proj)
            out = out.index_copy(0, index, emb)
        return out.view(*tokens.shape, self.d_proj) * self.scale


class ProjectedAdaptiveLogSoftmax(nn.Module):
    """``nll = crit(hidden (N, d_proj), target (N,))``: the per-token negative log-likelihood, in token order."""

    def __init__(self, n_token: int, d_embed: int, d_proj: int, cutoffs: list[int], div_val: int = 1) -> None:
        super().__init__()
        self.bounds = check_cutoffs(n_token, cutoffs)
        self.div_val = div_val
        self.n_clusters = len(self.bounds) - 1
        widths = cluster_widths(d_embed, div_val, len(self.bounds))
        if self.n_clusters > 0:
            self.cluster_weight = nn.Parameter(torch.zeros(self.n_clusters, d_embed))
            self.cluster_bias = nn.Parameter(torch.zeros(self.n_clusters))
        starts = [0] + self.bounds
        if div_val == 1:
            self.out_layers = nn.ModuleList([nn.Linear(d_embed, n_token)])
            self.out_projs = nn.ModuleList(
                [nn.Linear(d_embed, d_proj, bias=False) if d_proj != d_embed else None for _ in self.bounds])
        else:
            self.out_layers = nn.ModuleList(nn.Linear(w, hi - lo) for lo, hi, w in zip(starts, self.bounds, widths))
            self.out_projs = nn.ModuleList(nn.Linear(w, d_proj, bias=False) for w in widths)

    @staticmethod
    def _logit(hidden: Tensor, weight: Tensor, bias: Tensor, proj: nn.Linear | None) -> Tensor:
        if proj is not None:
            hidden = F.linear(hidden, proj.weight.t())  # d_proj → the cluster's width
        return F.linear(hidden, weight, bias)

    def _cluster(self, i: int) -> tuple[Tensor, Tensor]:
        if self.div_val > 1:
            return self.out_layers[i].weight, self.out_layers[i].bias
        lo, hi = ([0] + self.bounds)[i], self.bounds[i]
        return self.out_layers[0].weight[lo:hi], self.out_layers[0].bias[lo:hi]

    def forward(self, hidden: Tensor, target: Tensor) -> Tensor:
        if hidden.shape[0] != target.shape[0]:
            raise ValueError(f"hidden has {hidden.shape[0]} rows, target {target.shape[0]}")
        if self.n_clusters == 0:
            weight, bias = self._cluster(0)
            logprob = F.log_softmax(self._logit(hidden, weight, bias, self.out_projs[0]), dim=-1)
            return -logprob.gather(1, target[:, None]).squeeze(1)
        weight, bias = self._cluster(0)
        head = self._logit(hidden, torch.cat([weight, self.cluster_weight]), torch.cat([bias, self.cluster_bias]),
                           self.out_projs[0])
        head_logprob = F.log_softmax(head, dim=1)
        nll = hidden.new_zeros(target.shape[0])
        for i, (lo, hi) in enumerate(zip([0] + self.bounds, self.bounds)):
            index = ((target >= lo) & (target < hi)).nonzero().squeeze(1)
            if index.numel() == 0:
                continue
            local = target[index] - lo
            if i == 0:
                logprob = head_logprob[index].gather(1, local[:, None]).squeeze(1)
            else:
                weight, bias = self._cluster(i)
                tail = F.log_softmax(self._logit(hidden[index], weight, bias, self.out_projs[i]), dim=1)
                # the head's last n_clusters logits are the tail clusters, the i-th from the end for cluster i
                logprob = head_logprob[index, -i] + tail.gather(1, local[:, None]).squeeze(1)
            nll = nll.index_copy(0, index, -logprob)
        return nll


    def log_prob(self, hidden: Tensor) -> Tensor:
        """Log-probabilities of every token (N, n_token) for ``hidden`` (N, d_proj): the head's softmax, times
        each tail cluster's softmax for its tokens."""
        weight, bias = self._cluster(0)
        if self.n_clusters == 0:
            return F.log_softmax(self._logit(hidden, weight, bias, self.out_projs[0]), dim=-1)
        head = F.log_softmax(self._logit(hidden, torch.cat([weight, self.cluster_weight]),
                                         torch.cat([bias, self.cluster_bias]), self.out_projs[0]), dim=1)
        parts = [head[:, :self.bounds[0]]]
        for i in range(1, self.n_clusters + 1):
            weight, bias = self._cluster(i)
            tail = F.log_softmax(self._logit(hidden, weight, bias, self.out_projs[i]), dim=1)
            parts.append(head[:, -i, None] + tail)  # the head's i-th logit from the end is cluster i
        return torch.cat(parts, dim=1)


def tie_adaptive(emb: AdaptiveEmbedding, crit: ProjectedAdaptiveLogSoftmax, tie_weights: bool,
                 tie_projs: list[bool]) -> None:
    """Make the softmax share the embedding's tables and (for clusters with ``tie_projs[i]``) projections."""
    if tie_weights:
        for out, table in zip(crit.out_layers, emb.emb_layers):
            out.weight = table.weight
    for i, tie in enumerate(tie_projs):
        if not tie or i >= len(crit.out_projs) or crit.out_projs[i] is None:
            continue
        if emb.div_val == 1 and emb.emb_projs:
            crit.out_projs[i].weight = emb.emb_projs[0].weight
        elif emb.div_val > 1:
            crit.out_projs[i].weight = emb.emb_projs[i].weight
