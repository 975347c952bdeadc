"""Generate text from a DEQ-Transformer: ``python tools/lm_generate.py --cfg FILE TEST.MODEL_FILE ckpt
--prompt TEXT [--tokens N] [--temperature T] [--top_k K] [--top_p P] [--seed S] [KEY VALUE ...]``.

The prompt (``--prompt`` or ``--prompt-file``; split into the corpus's WikiText-style tokens) is solved as one
segment, then each new token attends to the model's memory of the last ``LM.MEM_LEN`` positions and its
equilibrium is solved with ``DEQ.F_SOLVER``, budget ``DEQ.F_THRES`` (or ``TEST.F_THRES``) and tolerance
``DEQ.F_EPS``, warm-started from the previous position's fixed point. The text is generated twice with the same
seed, warm-started and from zeros (cold), and the tool prints the warm text, then for each start the tokens per
second and the mean forward f evaluations per token (``deqlab.generation``). Prompt words outside the
vocabulary are read as ``<unk>`` (one warning names them). ``--temperature 0`` is greedy decoding.

Example::

    python tools/lm_generate.py --cfg experiments/austen/deq_transformer_quickstart.yaml \\
        --prompt "It is a truth universally acknowledged" --tokens 100 --top_p 0.9 \\
        TEST.MODEL_FILE output/austen/deq_transformer_quickstart/model_best.pth
"""
from __future__ import annotations

import textwrap
import warnings
from pathlib import Path

import torch

from deqlab.data.lm import tokenize
from deqlab.engine.cli import parse_config, run_tool, tool_parser
from deqlab.engine.evaluator import eval_f_thres
from deqlab.errors import ConfigError
from deqlab.generation import Sampling, decode, encode_prompt, generate
from deqlab.tasks import get_task
from deqlab.utils.dist import cleanup, init_distributed


def main(argv: list[str] | None = None) -> None:
    parser = tool_parser(__doc__)
    prompt = parser.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="the text to continue")
    prompt.add_argument("--prompt-file", "--prompt_file", dest="prompt_file", type=Path,
                        help="a UTF-8 file holding the text to continue")
    parser.add_argument("--tokens", type=int, default=100, help="tokens to generate (default 100)")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature; 0: greedy (default 1)")
    parser.add_argument("--top_k", "--top-k", dest="top_k", type=int, default=0,
                        help="sample among the K most likely tokens (default 0: all)")
    parser.add_argument("--top_p", "--top-p", dest="top_p", type=float, default=1.0,
                        help="nucleus sampling: the smallest set of tokens holding probability P (default 1: all)")
    args, cfg = parse_config(parser, argv)  # --seed N is the tool parser's: it also sets SEED
    if not cfg.TEST.MODEL_FILE:
        raise ConfigError("TEST.MODEL_FILE is empty: pass the language model checkpoint, e.g. TEST.MODEL_FILE "
                          "output/austen/deq_transformer_quickstart/model_best.pth")
    if args.tokens < 1:
        raise ConfigError(f"--tokens must be >= 1, got {args.tokens}")
    sampling = Sampling(args.temperature, args.top_k, args.top_p, int(cfg.SEED))
    if args.prompt_file is not None:
        try:
            text = args.prompt_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"--prompt-file {args.prompt_file}: cannot read it ({err})") from None
    else:
        text = args.prompt
    task = get_task("lm", cfg)
    device = init_distributed(cfg.DEVICE, cfg.CPU_ALLOCATOR).device
    try:
        torch.manual_seed(cfg.SEED)
        model = task.build_model().to(device)
        task.load_weights(model, cfg.TEST.MODEL_FILE)
        ids = encode_prompt(task.corpus.vocab, tokenize(text))
        runs = {warm: generate(model, ids, args.tokens, sampling, warm_start=warm, f_thres=eval_f_thres(cfg))
                for warm in (True, False)}
    finally:
        cleanup()
    story = text.strip() + " " + decode(task.corpus.vocab, runs[True].tokens)
    print("\n".join(textwrap.fill(line, width=100) for line in story.splitlines()))
    for warm, run in runs.items():
        print(f"{'warm' if warm else 'cold'} start: {run.tokens_per_s:.1f} tokens/s, "
              f"{run.mean_nfe:.1f} f evaluations per token")
    same = sum(a == b for a, b in zip(runs[True].tokens, runs[False].tokens))
    print(f"warm and cold starts agree on {same} of {args.tokens} tokens")


if __name__ == "__main__":
    warnings.formatwarning = lambda message, *_: f"warning: {message}\n"  # one plain line on stderr
    run_tool(main)
