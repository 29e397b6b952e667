"""The `switchkd` command line: thin argparse over the config schema and the package functions."""
from __future__ import annotations

import argparse
import logging
import sys

from switchkd.cluster.config import ConfigError, load_config
from switchkd.rollout.models import ModelError
from switchkd.rollout.prompts import PromptError
from switchkd.rollout.schema import SchemaError

# Errors a user can fix; printed as one line, no traceback. Anything else is a bug and keeps its traceback.
USER_ERRORS = (ConfigError, ModelError, PromptError, SchemaError)


def _cmd_tiny_models(args) -> None:
    from switchkd.rollout.tiny_models import build_tiny_models

    paths = build_tiny_models(args.out, seed=args.seed)
    print(f"tiny models (seed {args.seed}): teacher {paths['teacher']}, student {paths['student']}")


def _cmd_generate(args) -> None:
    from switchkd.rollout.generate import run_generate

    cfg = load_config(args.config, args.overrides)
    summary = run_generate(cfg.model, cfg.data, cfg.rollout, args.output)
    print(f"wrote {args.output} ({cfg.rollout.engine} engine{', ' + cfg.rollout.mode + ' mode' if cfg.rollout.engine == 'vllm' else ''})")
    print("\n".join(summary.lines()))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="switchkd", description="SWITCH knowledge distillation of LLMs.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("tiny-models", help="build a tiny random teacher/student pair (tests, configs/tiny.yaml)")
    p.add_argument("--out", required=True, help="output directory (gets teacher/ and student/)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_tiny_models)

    p = sub.add_parser("generate", help="generate SWITCH rollouts to a Parquet file")
    p.add_argument("--config", required=True, help="YAML config, e.g. configs/tiny.yaml")
    p.add_argument("--output", required=True, help="output Parquet file")
    p.add_argument("overrides", nargs="*", help="config overrides key.sub=value")
    p.set_defaults(func=_cmd_generate)
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
