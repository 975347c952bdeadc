"""Text generation from a DEQ-Transformer language model, one token at a time, with warm-started equilibria.

The prompt is solved as one segment (cold: z0 = 0). Each new token is then a segment of length one whose
attention sees the model's memory (the last ``mem_len`` equilibrium states and injections, carried from token to
token exactly as evaluation carries them from segment to segment). Its equilibrium solve starts either from
zeros (cold) or from the previous position's fixed point (warm): consecutive positions' equilibria are close
(both are layer-normalised states of one cell with overlapping context), so the solver reaches its tolerance in
fewer f evaluations; at a tight tolerance both starts reach the same fixed point and so the same tokens.

Sampling: ``temperature`` 0 is greedy (argmax); otherwise the log-probabilities divided by the temperature,
restricted to the ``top_k`` most likely tokens and/or the smallest set whose probability reaches ``top_p``
(nucleus), and drawn with a seeded generator.
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from deqlab.data.lm import EOS, UNK, Vocab
from deqlab.errors import ConfigError, DatasetError


@dataclass
class Sampling:
    """How the next token is drawn (see the module docstring); ``temperature`` 0 is greedy."""
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ConfigError(f"--temperature must be >= 0 (0: greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ConfigError(f"--top_k must be >= 0 (0: no limit), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"--top_p must be in (0, 1], got {self.top_p}")


@dataclass
class Generation:
    """The generated token ids, the forward f evaluations of each new position's solve and the wall time."""
    tokens: list[int]
    nfe: list[int] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def mean_nfe(self) -> float:
        return sum(self.nfe) / max(len(self.nfe), 1)

    @property
    def tokens_per_s(self) -> float:
        return len(self.tokens) / max(self.seconds, 1e-9)


def encode_prompt(vocab: Vocab, words: list[str]) -> list[int]:
    """``<eos>`` (a paragraph starts after one in the corpus) then the ids of ``words``; words outside the
    vocabulary become ``<unk>``, with one warning naming them."""
    oov = list(dict.fromkeys(w for w in words if w not in vocab.sym2idx))
    if oov:
        if vocab.unk_idx is None:
            raise DatasetError(f"prompt words not in the vocabulary, which has no {UNK}: {' '.join(oov)}")
        warnings.warn(f"prompt words not in the vocabulary, read as {UNK}: {' '.join(oov)}", stacklevel=2)
    return [vocab.eos_idx] + [vocab.sym2idx.get(w, vocab.unk_idx) for w in words]


def decode(vocab: Vocab, ids: list[int]) -> str:
    """Space-joined symbols, a new line for each ``<eos>``."""
    return " ".join(vocab.idx2sym[i] for i in ids).replace(f" {EOS} ", "\n").replace(EOS, "\n")


def next_token(log_probs: Tensor, sampling: Sampling, generator: torch.Generator) -> int:
    """One token id drawn from (n_token,) log-probabilities as ``sampling`` says."""
    if sampling.temperature == 0:
        return int(log_probs.argmax())
    logits = log_probs.double().cpu() / sampling.temperature
    if sampling.top_k:
        kth = torch.topk(logits, min(sampling.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p < 1.0:
        order = logits.argsort(descending=True)
        probs = logits[order].softmax(0)
        # keep a token while the tokens before it hold less than top_p (the most likely is always kept)
        drop = probs.cumsum(0) - probs >= sampling.top_p
        logits[order[drop]] = float("-inf")
    return int(torch.multinomial(logits.softmax(0), 1, generator=generator))


@torch.no_grad()
def generate(model: nn.Module, prompt: list[int], n_tokens: int, sampling: Sampling, warm_start: bool = True,
             f_thres: int | None = None) -> Generation:
    """``n_tokens`` tokens after ``prompt`` (ids) from a ``DEQTransformerLM`` in eval mode, its memory carried
    from token to token; each new position's solve starts from the previous position's fixed point when
    ``warm_start``, else from zeros. ``nfe`` lists the f evaluations of those solves (not the prompt's)."""
    if not prompt:
        raise ConfigError("the prompt has no tokens")
    model.eval()
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(sampling.seed)
    out = Generation(tokens=[])
    start = time.perf_counter()
    z, mems, _ = model.equilibrium(torch.tensor(prompt, device=device)[:, None], None, f_thres=f_thres)
    for i in range(n_tokens):
        out.tokens.append(next_token(model.next_token_log_probs(z)[0], sampling, generator))
        if i == n_tokens - 1:
            break
        z0 = z[:, :, -1:] if warm_start else None
        z, mems, info = model.equilibrium(torch.tensor([[out.tokens[-1]]], device=device), mems, f_thres=f_thres,
                                          z0=z0)
        out.nfe.append(int(info["fwd"]["nfe"]))
    out.seconds = time.perf_counter() - start
    return out
