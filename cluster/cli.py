"""The `switchkd` command line: thin argparse over the config schema and the package functions."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from switchkd.cluster.config import ConfigError, load_config
from switchkd.cluster.pipeline import DISTIL_SFT_RATIO
from switchkd.rollout.config import SPLITS
from switchkd.rollout.errors import SwitchkdError, Terminated
from switchkd.rollout.logs import library_output_to, setup_logging

PIPELINE_DEFAULTS = {"warmup_steps": 60, "distil_steps": 20, "eval_prompts": 64, "sft_ratio": DISTIL_SFT_RATIO}


def _cmd_tiny_models(args) -> None:
    from switchkd.rollout.models.tiny import build_tiny_models

    paths = build_tiny_models(args.out, seed=args.seed)
    print(f"tiny models (seed {args.seed}): teacher {paths['teacher']}, student {paths['student']}")


def _cmd_models_prepare(args) -> None:
    from switchkd.rollout.models.checks import ModelError
    from switchkd.rollout.models.real import DEFAULT_STUDENT_LAYERS, parse_layers, prepare_default_models

    if args.pair == "qwen-coder":
        from switchkd.rollout.models.qwen import prepare_qwen_models

        if args.student_layers:
            raise ModelError("--student-layers applies to --pair smollm2 only: the qwen-coder student is "
                             "Qwen2.5-Coder-0.5B-Instruct, not a layer subset of the teacher")
        paths = prepare_qwen_models(args.out, force=args.force)
    else:
        layers = parse_layers(args.student_layers) if args.student_layers else DEFAULT_STUDENT_LAYERS
        paths = prepare_default_models(args.out, student_layers=layers, force=args.force)
    print(f"{args.pair} models: teacher {paths['teacher']}, student {paths['student']}")


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


def _print_plan(args, cfg) -> None:
    """The placement plan and the memory estimate; ClusterError when the estimate does not fit."""
    from switchkd.cluster.memory import describe_memory, plan_memory, refuse_or_warn
    from switchkd.cluster.placement import plan_placement

    plan = plan_placement(cfg)
    roles, problems = plan_memory(cfg, plan)
    print(f"config {args.config}: valid")
    print(plan.describe())
    print(describe_memory(roles))
    print(f"loop: max_staleness {cfg.loop.max_staleness}; {cfg.trainer.batch_size} prompts per step; steps "
          f"{cfg.trainer.max_steps or f'{cfg.trainer.epochs} epoch(s) over {cfg.data.prompts}'}; weight sync "
          f"{cfg.sync.transport}; Ray {cfg.cluster.address or 'private, 127.0.0.1'}")
    if warning := refuse_or_warn(problems, cfg.cluster.check_memory, args.config):
        print(f"warning: {warning}")


def _train_config(args):
    overrides = list(args.overrides) + ([f"cluster.address={args.address}"] if args.address else [])
    return load_config(args.config, overrides)


def _cmd_plan(args) -> None:
    _print_plan(args, _train_config(args))


def _cmd_train(args) -> None:
    cfg = _train_config(args)
    if args.dry_run:
        _print_plan(args, cfg)
        return
    from switchkd.cluster.driver import train

    with library_output_to(Path(cfg.trainer.output_dir) / "logs", args.verbose):
        result = train(cfg, resume=args.resume)
    losses = (f"loss {result['first_loss']:.4f} -> {result['last_loss']:.4f}" if result["last_loss"] is not None
              else "nothing left to train")
    print(f"trained to step {result['steps']} (policy version {result['policy_version']}): {losses}; checkpoint "
          f"{result['checkpoint']}" + (f"; student exported to {result['export']}" if result.get("export") else ""))


def _cmd_export(args) -> None:
    from switchkd.trainer.export import export_checkpoint

    ckpt = export_checkpoint(args.checkpoint, args.out)
    print(f"exported {ckpt} -> {args.out}")


def _cmd_data_prepare(args) -> None:
    from switchkd.rollout.data.prompts import DEFAULT_DATA_PACKAGE, prepare_default_data

    rows, written = prepare_default_data(args.out)
    print(f"default data ({DEFAULT_DATA_PACKAGE}, English pairs): {rows} rows in {args.out}"
          f"{'' if written else ' (already up to date)'}")


def _cmd_eval(args) -> None:
    import dataclasses

    from switchkd.rollout.evaluation.evaluate import (load_report, report_lines, rollout_teacher_fraction, run_eval,
                                           teacher_answers_of, write_report)

    if args.compare:
        from switchkd.rollout.evaluation.stats import compare, compare_lines

        a, b = (load_report(path) for path in args.compare)
        print("\n".join(compare_lines(compare([a], [b]), *args.compare)))
        return
    if not args.config or not args.model:
        raise ConfigError("switchkd eval: --config and --model are required (or --compare A.json B.json)")
    cfg = load_config(args.config, args.overrides)
    rollouts = rollout_teacher_fraction(args.rollouts) if args.rollouts else None   # bad files fail before vLLM starts
    answers = teacher_answers_of(load_report(args.teacher_report)) if args.teacher_report else None
    report = run_eval(cfg.model, dataclasses.replace(cfg.data, split=args.split), cfg.rollout, args.model,
                      max_prompts=args.max_prompts, teacher_answers=answers)
    if rollouts:
        report["rollouts"] = rollouts
    if args.out:
        write_report(report, args.out)
        print(f"wrote {args.out}")
    print("\n".join(report_lines(report)))


def _cmd_pipeline(args) -> None:
    from switchkd.cluster.pipeline import DISTIL_CONFIG, run_pipeline, summary_lines

    load_config(args.distil_config or DISTIL_CONFIG, [])   # a bad config fails before the run directory exists
    with library_output_to(Path(args.out) / "logs", args.verbose):
        summary = run_pipeline(args.out, args.warmup_steps, args.distil_steps, args.eval_prompts, args.seed,
                               args.distil_config, sft_ratio=args.sft_ratio)
    print("\n".join(summary_lines(summary)))
    print(f"wrote {args.out}/summary.json")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="switchkd", description="SWITCH knowledge distillation of LLMs.")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="show the libraries' output (vLLM, Ray, DeepSpeed) on the console; by default "
                             "`train` and `pipeline` write it to OUTPUT_DIR/logs/")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("tiny-models", help="build a tiny random teacher/student pair (tests, configs/tiny.yaml)")
    p.add_argument("--out", required=True, help="output directory (gets teacher/ and student/)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_tiny_models)

    p = sub.add_parser("models", help="real models from packaged weights (no hub access)")
    models_sub = p.add_subparsers(dest="models_command", required=True)
    p = models_sub.add_parser("prepare", help="build a teacher/student pair as bf16 safetensors (cached)")
    p.add_argument("--pair", choices=("smollm2", "qwen-coder"), default="smollm2",
                   help="smollm2 (default): SmolLM2-135M-Instruct and a layer-subset student; qwen-coder: "
                        "Qwen2.5-Coder 1.5B/0.5B-Instruct (packages of requirements/qwen.txt, ~1.6 GB)")
    p.add_argument("--out", default="models", help="output directory (default: models)")
    p.add_argument("--student-layers", default=None,
                   help="smollm2 only: teacher layers kept by the student, e.g. 0,3,6 (default: 0,3,...,27)")
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

    p = sub.add_parser("train", help="distil with SWITCH in the closed loop: vLLM rollouts -> DeepSpeed -> weight sync")
    p.add_argument("--config", required=True, help="YAML config, e.g. configs/tiny.yaml")
    p.add_argument("--address", default=None, help="join this Ray cluster ('auto': the local one); "
                   "default: a private Ray on 127.0.0.1 (or the cluster of a `ray job submit`)")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in trainer.output_dir")
    p.add_argument("--dry-run", action="store_true", help="validate the config, print the placement plan, start nothing")
    p.add_argument("overrides", nargs="*", help="config overrides key.sub=value")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("plan", help="placement and memory per role of a train config, before anything starts "
                                    "(same as train --dry-run); exit 2 when it cannot fit")
    p.add_argument("--config", required=True, help="YAML config, e.g. configs/multi-gpu.yaml")
    p.add_argument("--address", default=None, help="the Ray cluster the run would join")
    p.add_argument("overrides", nargs="*", help="config overrides key.sub=value")
    p.set_defaults(func=_cmd_plan)

    p = sub.add_parser("export", help="write a checkpoint's student as an HF model directory")
    p.add_argument("--checkpoint", required=True, help="checkpoints/step_N, or a run dir (its latest checkpoint)")
    p.add_argument("--out", required=True, help="new output directory")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("data", help="data sets")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    p = data_sub.add_parser("prepare", help="write the default data set (chatterbot-corpus, BSD) as prompt/response JSONL")
    p.add_argument("--out", default="data/default.jsonl", help="output JSONL (default: data/default.jsonl)")
    p.set_defaults(func=_cmd_data_prepare)

    p = sub.add_parser("eval", help="score a model's responses (vLLM) against references and by the teacher; "
                                    "or compare two reports")
    p.add_argument("--config", help="YAML config, e.g. configs/tiny.yaml (its model.teacher scores the answers)")
    p.add_argument("--model", help="HF model directory to evaluate (e.g. an exported student)")
    p.add_argument("--split", default="test", choices=SPLITS, help="data split to evaluate on (default: test)")
    p.add_argument("--max-prompts", type=_positive, default=None,
                   help="evaluate a sample of this many prompts, seeded by data.split_seed (default: the whole split)")
    p.add_argument("--teacher-report", default=None,
                   help="an eval report of the same prompts whose teacher answers to reuse (skips generating them)")
    p.add_argument("--out", default=None, help="write the JSON report here")
    p.add_argument("--rollouts", action="append", default=[],
                   help="SWITCH rollout Parquet: also report its teacher-token fraction by position (repeatable)")
    p.add_argument("--compare", nargs=2, metavar=("A.json", "B.json"), default=None,
                   help="print B - A per metric with paired bootstrap 95%% CIs over the prompts both evaluated")
    p.add_argument("overrides", nargs="*", help="config overrides key.sub=value")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("pipeline", help="the default job (make run): prepare, warm up, distil with SWITCH, evaluate, plot")
    p.add_argument("--out", required=True, help="run directory; an existing one continues after its complete stages")
    p.add_argument("--warmup-steps", type=_positive, default=PIPELINE_DEFAULTS["warmup_steps"],
                   help="SFT warm-up steps of the student (default: %(default)s)")
    p.add_argument("--distil-steps", type=_positive, default=PIPELINE_DEFAULTS["distil_steps"],
                   help="SWITCH distillation steps (default: %(default)s)")
    p.add_argument("--eval-prompts", type=_positive, default=PIPELINE_DEFAULTS["eval_prompts"],
                   help="test-split prompts evaluated (default: %(default)s)")
    p.add_argument("--sft-ratio", type=_ratio, default=PIPELINE_DEFAULTS["sft_ratio"],
                   help="weight of the SFT term on the references during distillation, in [0, 1]; "
                        "0 = pure SWITCH (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--distil-config", default=None,
                   help="distillation config (default: configs/baselines/switch-exp.yaml)")
    p.set_defaults(func=_cmd_pipeline)
    return parser


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: must be a positive integer")
    return int(text)


def _ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text!r}: must be a number in [0, 1]")
    return value


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    try:
        args.func(args)
    except SwitchkdError as e:  # one line, no traceback; anything else is a bug and keeps its traceback
        print(f"switchkd: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        terminated = isinstance(e, Terminated)
        print(f"switchkd: {'terminated' if terminated else 'interrupted'}", file=sys.stderr)
        return 143 if terminated else 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
