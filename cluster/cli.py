"""The `switchkd` command line: thin argparse over the config schema and the package functions."""
from __future__ import annotations

import argparse
import logging
import sys

from switchkd.cluster.config import ConfigError, load_config
from switchkd.rollout.models import ModelError
from switchkd.rollout.prompts import PromptError
from switchkd.rollout.schema import SchemaError
from switchkd.trainer.ds_config import TrainerError

# Errors a user can fix; printed as one line, no traceback. Anything else is a bug and keeps its traceback.
USER_ERRORS = (ConfigError, ModelError, PromptError, SchemaError, TrainerError)


def _cmd_tiny_models(args) -> None:
    from switchkd.rollout.tiny_models import build_tiny_models

    paths = build_tiny_models(args.out, seed=args.seed)
    print(f"tiny models (seed {args.seed}): teacher {paths['teacher']}, student {paths['student']}")


def _cmd_models_prepare(args) -> None:
    from switchkd.rollout.real_models import DEFAULT_STUDENT_LAYERS, parse_layers, prepare_default_models

    layers = parse_layers(args.student_layers) if args.student_layers else DEFAULT_STUDENT_LAYERS
    paths = prepare_default_models(args.out, student_layers=layers, force=args.force)
    print(f"default models: teacher {paths['teacher']}, student {paths['student']}")


def _cmd_generate(args) -> None:
    from switchkd.rollout.generate import run_generate

    cfg = load_config(args.config, args.overrides)
    summary = run_generate(cfg.model, cfg.data, cfg.rollout, args.output)
    print(f"wrote {args.output} ({cfg.rollout.engine} engine{', ' + cfg.rollout.mode + ' mode' if cfg.rollout.engine == 'vllm' else ''})")
    print("\n".join(summary.lines()))


def _cmd_train_offline(args) -> None:
    from switchkd.trainer.offline import train_offline

    cfg = load_config(args.config, args.overrides)
    result = train_offline(cfg, args.rollouts, resume=args.resume)
    print(f"trained to step {result['steps']}: loss {result['first_loss']:.4f} -> {result['last_loss']:.4f}, "
          f"{result['skipped_rows']} empty responses skipped; checkpoint {result['checkpoint']}")


def _cmd_export(args) -> None:
    from switchkd.trainer.export import export_checkpoint

    ckpt = export_checkpoint(args.checkpoint, args.out)
    print(f"exported {ckpt} -> {args.out}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="switchkd", description="SWITCH knowledge distillation of LLMs.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("tiny-models", help="build a tiny random teacher/student pair (tests, configs/tiny.yaml)")
    p.add_argument("--out", required=True, help="output directory (gets teacher/ and student/)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_tiny_models)

    p = sub.add_parser("models", help="real models from packaged weights (no hub access)")
    models_sub = p.add_subparsers(dest="models_command", required=True)
    p = models_sub.add_parser("prepare", help="build the SmolLM2-135M-Instruct teacher and a layer-subset student (cached)")
    p.add_argument("--out", default="models", help="output directory (default: models)")
    p.add_argument("--student-layers", default=None, help="teacher layers kept by the student, e.g. 0,3,6 (default: 0,3,...,27)")
    p.add_argument("--force", action="store_true", help="rebuild even if the cached models match")
    p.set_defaults(func=_cmd_models_prepare)

    p = sub.add_parser("generate", help="generate SWITCH rollouts to a Parquet file")
    p.add_argument("--config", required=True, help="YAML config, e.g. configs/tiny.yaml")
    p.add_argument("--output", required=True, help="output Parquet file")
    p.add_argument("overrides", nargs="*", help="config overrides key.sub=value")
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser("train-offline", help="distil the student on rollout Parquet files (DeepSpeed ZeRO)")
    p.add_argument("--config", required=True, help="YAML config, e.g. configs/tiny.yaml")
    p.add_argument("--rollouts", required=True, action="append", help="rollout Parquet file (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in trainer.output_dir")
    p.add_argument("overrides", nargs="*", help="config overrides key.sub=value")
    p.set_defaults(func=_cmd_train_offline)

    p = sub.add_parser("export", help="write a checkpoint's student as an HF model directory")
    p.add_argument("--checkpoint", required=True, help="checkpoints/step_N, or a run dir (its latest checkpoint)")
    p.add_argument("--out", required=True, help="new output directory")
    p.set_defaults(func=_cmd_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except USER_ERRORS as e:
        print(f"switchkd: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("switchkd: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
