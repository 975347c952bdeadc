"""Text generation (deqlab.generation, tools/lm_generate.py): greedy = an argmax rollout by hand with the same
memory, warm-started equilibria give the cold start's tokens with fewer f evaluations, OOV prompt words."""
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import COMPAT, REPO, needs_compat
from deqlab.data.lm import Vocab
from deqlab.errors import DatasetError
from deqlab.generation import Sampling, encode_prompt, generate, next_token
from deqlab.models import DEQTransformerLM

pytestmark = pytest.mark.timeout(400)
PROMPT = [1, 2, 3, 4, 5]


def tiny(div_val: int = 2, seed: int = 0, **overrides) -> DEQTransformerLM:
    """A random 40-token adaptive-softmax model (seed 0: greedy decoding visits both tail clusters) whose
    equilibria Anderson reaches to 1e-10 within 60 steps, in float64."""
    torch.manual_seed(seed)
    options = {"f_solver": "anderson", "f_thres": 60, "f_eps": 1e-10, "stop_mode": "abs", "tie_weights": False,
               **overrides}
    return DEQTransformerLM(n_token=40, n_layer=2, eval_n_layer=4, n_head=2, d_model=16, d_head=8, d_inner=32,
                            dropout=0.0, dropatt=0.0, mem_len=8, pretrain_steps=0, init_std=0.5, proj_init_std=0.5,
                            cutoffs=[20, 30], div_val=div_val, d_embed=16, **options).double().eval()


@pytest.mark.parametrize("div_val", [1, 2])
def test_log_probs_of_every_token_equal_the_adaptive_softmax_nll(div_val):
    model = tiny(div_val)
    hidden = torch.randn(3, 16, dtype=torch.float64)
    with torch.no_grad():
        log_probs = model.crit.log_prob(hidden)
        nll = model.crit(hidden.repeat_interleave(40, 0), torch.arange(40).repeat(3)).view(3, 40)
    assert torch.allclose(log_probs, -nll, atol=1e-12)
    assert torch.allclose(log_probs.logsumexp(1), torch.zeros(3, dtype=torch.float64), atol=1e-12)


def hand_rollout(model: DEQTransformerLM, prompt: list[int], n: int) -> list[int]:
    """Greedy decoding with the model's public forward only: every candidate token is a stream of one batch
    (the same data and memory in every column), its NLL read off the loss; the argmin is the next token."""
    vocab = model.n_token
    data, mems, tokens = torch.tensor(prompt)[:, None].expand(-1, vocab), None, []
    with torch.no_grad():
        for _ in range(n):
            target = torch.cat([data[1:], torch.arange(vocab)[None]])  # the last row: every candidate
            loss, mems, _ = model(data, target, mems)
            tokens.append(int(loss[-1].argmin()))
            data = torch.full((1, vocab), tokens[-1])
    return tokens


def test_greedy_generation_equals_an_argmax_rollout_by_hand():
    model = tiny()
    expected = hand_rollout(model, PROMPT, 10)
    assert len(set(expected)) >= 4 and max(expected) >= 30  # a varied rollout, reaching the last tail cluster
    for warm in (False, True):
        assert generate(model, PROMPT, 10, Sampling(temperature=0), warm_start=warm).tokens == expected


def test_warm_start_gives_the_cold_tokens_with_fewer_f_evaluations():
    model = tiny()
    sampling = Sampling(temperature=1.0, seed=4)
    warm = generate(model, PROMPT, 16, sampling, warm_start=True)
    cold = generate(model, PROMPT, 16, sampling, warm_start=False)
    assert warm.tokens == cold.tokens and len(set(warm.tokens)) >= 8  # sampled, so not a constant rollout
    assert len(warm.nfe) == len(cold.nfe) == 15  # one solve per new position after the prompt's
    assert max(cold.nfe) < 60  # every cold solve converged, so both reach the same fixed points
    assert sum(warm.nfe) < sum(cold.nfe)


def test_top_k_one_and_a_tiny_top_p_are_greedy_and_the_seed_repeats_a_draw():
    log_probs = torch.log_softmax(torch.randn(50, generator=torch.Generator().manual_seed(0)), 0)
    greedy = next_token(log_probs, Sampling(temperature=0), torch.Generator())
    for sampling in (Sampling(top_k=1), Sampling(top_p=1e-6), Sampling(temperature=1e-4)):
        assert next_token(log_probs, sampling, torch.Generator().manual_seed(1)) == greedy
    draws = [next_token(log_probs, Sampling(top_k=5), torch.Generator().manual_seed(s)) for s in range(40)]
    assert set(draws) <= set(log_probs.topk(5).indices.tolist()) and len(set(draws)) > 1


def test_oov_prompt_words_become_unk_with_one_warning_naming_them():
    vocab = Vocab(["<eos>", "the", "<unk>", "Emma"])
    with pytest.warns(UserWarning, match="read as <unk>: Zorblax Quux$") as record:
        ids = encode_prompt(vocab, ["the", "Zorblax", "Emma", "Quux", "Zorblax"])
    assert len(record) == 1
    assert ids == [0, 1, 2, 3, 2, 2]
    with pytest.raises(DatasetError, match="no <unk>: Zorblax"):
        encode_prompt(Vocab(["<eos>", "the"]), ["the", "Zorblax"])


@needs_compat
def test_lm_generate_tool_on_a_trained_run(tmp_path):
    from test_lm_engine import CFG, LM_TINY
    shutil.copytree(COMPAT / "deq_transformer" / "corpus", tmp_path / "data" / "austen")
    common = ["--cfg", str(CFG), *LM_TINY, "DATASET.ROOT", str(tmp_path / "data/austen"),
              "OUTPUT_DIR", str(tmp_path / "out"), "LOG_DIR", str(tmp_path / "log")]
    train = subprocess.run([sys.executable, str(REPO / "tools/lm_train.py"), *common], capture_output=True,
                           text=True, cwd=tmp_path)
    assert train.returncode == 0, train.stderr[-2000:]
    ckpt = tmp_path / "out/austen/deq_transformer_quickstart/model_best.pth"
    out = subprocess.run([sys.executable, str(REPO / "tools/lm_generate.py"), "--prompt", "Anne Elliot said Zorblax",
                          "--tokens", "12", "--seed", "5", *common, "TEST.MODEL_FILE", str(ckpt)],
                         capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stderr.count("warning: prompt words not in the vocabulary, read as <unk>: Zorblax\n") == 1
    lines = out.stdout.splitlines()
    assert lines[0].startswith("Anne Elliot said Zorblax ")
    assert any(l.startswith("warm start: ") and "f evaluations per token" in l for l in lines)
    assert any(l.startswith("cold start: ") for l in lines)
    assert lines[-1].startswith("warm and cold starts agree on ") and lines[-1].endswith(" of 12 tokens")
