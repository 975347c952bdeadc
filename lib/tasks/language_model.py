"""Word-level language modelling (the DEQ-Transformer on WikiText-103 or the embedded Austen corpus).

What differs from the image tasks, and lives here rather than in the engine:

- batches are ``(data, target)`` segments of ``tgt_len`` tokens from ``bsz`` ordered streams
  (``deqlab.data.lm.LMOrderedIterator``); rank r of N takes streams [r·B, (r+1)·B) of the N·B streams, B =
  ``BATCH_SIZE_PER_GPU``, so N ranks see exactly what one process sees with N·B streams;
- the model's memory (``mem_len`` past states per stream) is carried from one segment to the next and reset
  at the start of every epoch and every evaluation (``start_pass``); it is part of the resume checkpoint (every
  rank's streams, ``checkpoint_state``), so a run resumed mid-epoch continues exactly, on one process or several;
- the model returns the per-token NLL, which is the "output": the loss is its mean, the metric perplexity.
"""
from __future__ import annotations

import math
import sys
from typing import Any, Iterator

import torch
from torch import Tensor, nn
from torch import distributed as dist

from deqlab.checkpoint import load_checkpoint, load_weights, state_dict_of
from deqlab.data import dataset_dir
from deqlab.data.lm import Corpus, LMOrderedIterator, load_corpus
from deqlab.deq import mean_spectral_radius
from deqlab.errors import CheckpointError, ConfigError
from deqlab.models import build_model
from deqlab.solvers.common import SolveSummary, solver_summary
from deqlab.tasks.base import Meter, Task
from deqlab.utils.dist import gather_from_all


def perplexity(mean_nll: float) -> float:
    """exp(mean token NLL); inf where that overflows a double (a diverging model's loss), never a number
    hundreds of digits long."""
    return math.exp(mean_nll) if mean_nll < math.log(sys.float_info.max) else math.inf


def format_perplexity(ppl: float) -> str:
    """Two decimals, as locuslab/deq prints it, but scientific notation from a million on."""
    return f"{ppl:.2f}" if ppl < 1e6 else f"{ppl:.3e}"


class SegmentLoader:
    """An ``LMOrderedIterator`` as the engine's loader: ``((data, target), target)`` per segment."""

    def __init__(self, iterator: LMOrderedIterator, max_steps: int = 0) -> None:
        self.iterator, self.max_steps = iterator, max_steps

    def __len__(self) -> int:
        n = len(self.iterator)
        return min(n, self.max_steps) if self.max_steps > 0 else n

    def __iter__(self) -> Iterator[tuple[tuple[Tensor, Tensor], Tensor]]:
        for i, (data, target, _) in enumerate(self.iterator):
            if i >= len(self):
                return
            yield (data, target), target


class NLLMeter(Meter):
    """Summed token NLL and token count: perplexity and bits per token over every rank's segments."""

    def __init__(self, device: torch.device) -> None:
        super().__init__(2, device)

    def update(self, output: Tensor, target: Tensor) -> None:
        self.sums += torch.stack([output.double().sum(), torch.tensor(output.numel(), device=output.device)]).to(self.sums)

    def compute(self, sums: Tensor) -> dict[str, Any]:
        nll, tokens = sums.tolist()
        mean = nll / max(tokens, 1.0)
        return {"ppl": perplexity(mean), "bits_per_token": mean / math.log(2), "tokens": int(tokens)}


class LanguageModelTask(Task):
    name = "lm"
    best_metric = "ppl"
    higher_is_better = False
    perf_label = "perplexity"
    final_test_split = "test"      # lm_train.py ends with the test split, on the best weights

    def __init__(self, cfg: Any, full_test: bool = False) -> None:
        super().__init__(cfg, full_test)
        self._corpus: Corpus | None = None
        self.mems: dict[bool, list[Tensor] | None] = {True: None, False: None}  # train / eval memory

    @property
    def find_unused_parameters(self) -> bool:
        """Whether DDP must search each step for parameters without a gradient: only with adaptive tail clusters.
        A rank's batch with no target in a tail cluster gives its softmax bias no gradient, and one with no token
        in it at all its embedding table and projection too (in most steps of the tests' two 8-token streams, now
        and then on WikiText-103): without the search DDP waits for those gradients and fails. Without tail
        clusters every parameter is used in every step, pretraining included. With them, DDP's warning that the
        search found nothing unused (printed by its C++ reducer once a step used everything) is a false positive."""
        transformer = self.cfg.MODEL.TRANSFORMER
        return bool(transformer.ADAPTIVE and transformer.CUTOFFS)

    @property
    def corpus(self) -> Corpus:
        if self._corpus is None:
            self._corpus = load_corpus(dataset_dir(self.cfg))
        return self._corpus

    def build_model(self) -> nn.Module:
        return build_model(self.cfg, task="lm", n_token=len(self.corpus.vocab))

    def build_loader(self, split: str, distributed: bool, augment: bool | None = None) -> SegmentLoader:
        """``train``, or ``test`` = the split ``DATASET.TEST_SET`` names (``valid`` while training)."""
        name = "train" if split == "train" else str(self.cfg.DATASET.TEST_SET)
        if name not in ("train", "valid", "test"):
            raise ConfigError(f"DATASET.TEST_SET must be valid or test for a language model, got {name!r}")
        world, rank = (dist.get_world_size(), dist.get_rank()) if distributed else (1, 0)
        train = name == "train"
        per_rank = int(self.cfg.TRAIN.BATCH_SIZE_PER_GPU if train else self.cfg.TEST.BATCH_SIZE_PER_GPU)
        lm = self.cfg.LM
        iterator = self.corpus.get_iterator(name, per_rank * world, lm.TGT_LEN if train else lm.EVAL_TGT_LEN,
                                            ext_len=lm.EXT_LEN, rank=rank, world_size=world)
        return SegmentLoader(iterator, 0 if train else lm.MAX_EVAL_STEPS)

    def train_f_thres(self, compute_jac_loss: bool) -> int:
        """locuslab/deq's DEQ-Transformer: F_THRES + U{-RAND_F_THRES_DELTA, ..., 0} on every step."""
        delta = self.cfg.DEQ.RAND_F_THRES_DELTA
        return max(1, self.cfg.DEQ.F_THRES - (int(torch.randint(0, delta + 1, []).item()) if delta > 0 else 0))

    def forward(self, net: nn.Module, x: Any, **kwargs: Any) -> tuple[Tensor, dict[str, Any]]:
        data, target = x
        loss, mems, info = net(data, target, mems=self.mems[True], **kwargs)
        self.mems[True] = [m.detach() for m in mems]
        return loss, info

    def predict(self, model: nn.Module, x: Any, f_thres: int | None, train_step: int = -1
                ) -> tuple[Tensor, SolveSummary, float | None]:
        """As locuslab/deq's ``evaluate``, the model gets the training step: during pretraining (``0 <= train_step
        < TRAIN.PRETRAIN_STEPS``) it evaluates the unrolled stack, else the equilibrium (see DEQTransformerLM)."""
        data, target = x
        loss, self.mems[False], info = model(data, target, mems=self.mems[False], train_step=train_step,
                                             f_thres=f_thres)
        return loss, solver_summary(info["fwd"]), mean_spectral_radius(info)

    def start_pass(self, train: bool) -> None:
        self.mems[train] = None

    def state_dict(self) -> dict[str, Any]:
        return {"mems": list(self.mems[True] or [])}

    def load_state_dict(self, state: dict[str, Any], device: torch.device) -> None:
        self.mems[True] = [m.to(device) for m in state.get("mems", [])] or None

    def checkpoint_state(self) -> dict[str, Any]:
        """The memory of all N·B streams: every rank's B, concatenated along the streams (dim 1) in rank order.
        Collective."""
        per_rank = gather_from_all([m.cpu() for m in self.mems[True] or []])
        return {"mems": [torch.cat(parts, dim=1) for parts in zip(*per_rank)]}

    def load_checkpoint_state(self, state: dict[str, Any], device: torch.device) -> None:
        """This rank's streams of the saved memory (its slice of dim 1, as ``build_loader`` shards them)."""
        world, rank = (dist.get_world_size(), dist.get_rank()) if dist.is_initialized() else (1, 0)
        mems = state.get("mems", [])
        streams = int(self.cfg.TRAIN.BATCH_SIZE_PER_GPU) * world
        if mems and mems[0].shape[1] != streams:
            raise CheckpointError(f"the resume checkpoint's memory has {mems[0].shape[1]} streams, this run {streams} "
                                  f"({world} rank(s) x TRAIN.BATCH_SIZE_PER_GPU): resume with the same global batch")
        self.load_state_dict({"mems": [torch.tensor_split(m, world, dim=1)[rank].contiguous() for m in mems]}, device)

    def loss(self, output: Tensor, target: Tensor) -> Tensor:
        return output.float().mean()

    def train_stats(self, output: Tensor, target: Tensor) -> dict[str, float]:
        return {"ppl": perplexity(output.float().mean().item())}

    def new_meter(self, device: torch.device) -> Meter:
        return NLLMeter(device)

    def describe(self, metrics: dict[str, Any]) -> str:
        return f"loss {metrics['loss']:.4f} ppl {format_perplexity(metrics['ppl'])} ({metrics['tokens']} tokens)"

    def result_fields(self) -> dict[str, Any]:
        lm = self.cfg.LM
        return {"split": str(self.cfg.DATASET.TEST_SET), "mem_len": lm.MEM_LEN, "tgt_len": lm.EVAL_TGT_LEN}

    def load_weights(self, model: nn.Module, path: str) -> None:
        """``load_weights`` after checking that the checkpoint's vocabulary and clusters are the model's (the
        embedding rows are indexed by the corpus vocabulary: another corpus or cutoffs cannot fit)."""
        state = state_dict_of(load_checkpoint(path), path)
        theirs, ours = cluster_sizes(state), cluster_sizes(model.state_dict())
        if theirs and theirs != ours:
            raise CheckpointError(
                f"checkpoint {path} has a {sum(theirs)}-token vocabulary in clusters {theirs}, the model "
                f"{sum(ours)} tokens in {ours} (vocabulary of {dataset_dir(self.cfg)}, MODEL.TRANSFORMER.CUTOFFS "
                f"{list(self.cfg.MODEL.TRANSFORMER.CUTOFFS)}); evaluate it on the corpus and cutoffs it was trained with")
        load_weights(model, path)


def cluster_sizes(state: dict[str, Tensor]) -> list[int]:
    """Rows of each adaptive-embedding cluster (``word_emb.emb_layers.i.weight``), i.e. the vocabulary split."""
    sizes = {}
    for key, tensor in state.items():
        for prefix in ("word_emb.emb_layers.", "module.word_emb.emb_layers.", "model.word_emb.emb_layers."):
            if key.startswith(prefix) and key.endswith(".weight"):
                sizes[int(key[len(prefix):].split(".")[0])] = tensor.shape[0]
    return [sizes[i] for i in sorted(sizes)]
