"""Train an MDEQ classifier: ``python tools/cls_train.py --cfg experiments/cifar/cls_mdeq_TINY.yaml [KEY VALUE ...]``.

Several processes: ``torchrun --nproc_per_node N tools/cls_train.py --cfg ...``.
"""
from deqlab.engine import Trainer, setup_logging
from deqlab.engine.cli import parse_config, run_tool, tool_parser
from deqlab.utils.dist import cleanup, init_distributed


def main() -> None:
    args, cfg = parse_config(tool_parser(__doc__.splitlines()[0]))
    dist_info = init_distributed(cfg.DEVICE)
    setup_logging(dist_info.is_main)
    try:
        trainer = Trainer(cfg, args.cfg, dist_info)
        setup_logging(dist_info.is_main, trainer.out_dir / "train.log")
        trainer.fit()
    finally:
        cleanup()


if __name__ == "__main__":
    run_tool(main)
