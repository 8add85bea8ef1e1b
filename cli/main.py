"""The ``predgate`` command: one subcommand per offline job, plus ``serve``.

The composition root: the one module that wires the offline jobs and the server together (the
import contracts in pyproject.toml allow nothing else to import both ``offline`` and ``service``).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from models.bundle import load_bundle
from models.data import DataSource, load_splits
from models.errors import PredgateError
from models.progress import progress_wanted
from offline import attack as attack_job
from offline import open_world_job, robustness_report, shift_job
from offline.build import build_bundle
from offline.profiles import STAGE_ORDER, get_profile
from offline.report import write_report
from offline.stages import features_stage, mutants_stage, prepare, train_stage
from offline.sweep import copy_sweep
from offline.sweep import main as sweep_main
from service.server import serve
from service.settings import Settings


def _add_data_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", default="fashion-mnist", choices=["fashion-mnist", "cifar10", "imagefolder"])
    parser.add_argument("--data-root", default=None, help="data directory (default: the data set's standard place)")
    parser.add_argument("--image-size", type=int, default=None, help="imagefolder: side of the square input")
    parser.add_argument("--channels", type=int, default=3, choices=[1, 3], help="imagefolder: 3 (RGB) or 1 (grey)")
    parser.add_argument("--profile", default="quick", help="quick (default) or full; flags below override it")
    parser.add_argument("--arch", default="resnet20", help="resnet20 or a torchvision model name")
    parser.add_argument("--layer", default=None, help="conductance layer (default: the architecture's last stage)")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--cnn-train", type=int, default=None, help="cnn-train split size")
    parser.add_argument("--fit", type=int, default=None, help="fit split size (detector training)")
    parser.add_argument("--val", type=int, default=None, help="val split size")
    parser.add_argument("--test", type=int, default=None, help="test split size")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument(
        "--fit-from-cnn-train", action="store_true", default=None,
        help="the paper's setting: detectors learn from (a --fit sized subset of) the CNN's training images",
    )
    parser.add_argument("--n-mutants", type=int, default=None)
    parser.add_argument("--operator", default=None, choices=["NAI", "GF", "WS", "NS"], help="mutation operator")
    parser.add_argument("--mutation-rate", type=float, default=None, help="share of all conv filters per mutant")
    parser.add_argument(
        "--mutant-modules", nargs="+", default=None,
        help="mutate only convs inside these modules (e.g. layer3): mutants share the computed prefix",
    )
    parser.add_argument(
        "--lcr-sprt", type=float, default=None, metavar="ALPHA",
        help="stop LCR early: SPRT with alpha = beta = ALPHA over chunks of mutants, p0/p1 from the fit split",
    )
    parser.add_argument("--lcr-chunk", type=int, default=None, help="mutants per chunk of the early-stopping LCR")
    parser.add_argument(
        "--cond-inputs", default=None, choices=["conductance", "conductance+class"],
        help="what the conductance detector reads: conductance alone (the paper's, default) or with the predicted class",
    )
    parser.add_argument(
        "--weights", type=Path, default=None,
        help="state-dict file (.pt, or .safetensors such as another bundle's weights): import instead of training",
    )
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    parser.add_argument("--out", type=Path, required=True, help="bundle directory (e.g. bundles/NAME)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing bundle at --out")


def _profile_from(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    profile = get_profile(args.dataset, args.profile)
    return profile.with_overrides(
        epochs=args.epochs, cnn_train=args.cnn_train, fit=args.fit, val=args.val, test=args.test, seed=args.seed,
        n_mutants=args.n_mutants, operator=args.operator, mutation_rate=args.mutation_rate,
        fit_is_cnn_train=args.fit_from_cnn_train,
        mutant_modules=tuple(args.mutant_modules) if args.mutant_modules else None,
        lcr_sprt_alpha=args.lcr_sprt, lcr_chunk=args.lcr_chunk, cond_inputs=args.cond_inputs,
    )


def _source_from(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    return DataSource(args.dataset, args.data_root, args.image_size, args.channels if args.dataset == "imagefolder" else None)


def cmd_train(args: argparse.Namespace) -> None:
    profile = _profile_from(args)
    bundle, arrays = prepare(args.out, _source_from(args), profile, arch=args.arch, layer=args.layer, overwrite=args.overwrite)
    train_stage(
        bundle, arrays, epochs=profile.epochs, seed=profile.seed, batch_size=profile.batch_size, weights=args.weights,
        device=args.device, progress=progress_wanted(),
    )
    info = bundle.manifest["training"]
    print(
        f"trained {args.arch} on {args.dataset}: cnn-train acc {info['cnn-train_accuracy']:.4f}, "
        f"val acc {info['val_accuracy']:.4f}, test acc {info['test_accuracy']:.4f} -> {bundle.path}"
    )


def cmd_build(args: argparse.Namespace) -> None:
    build_bundle(
        args.out, _source_from(args), _profile_from(args), arch=args.arch, layer=args.layer,
        weights=args.weights, device=args.device, default_set=args.default_set, overwrite=args.overwrite,
        redo=args.redo, base=args.base, progress=progress_wanted(),
    )


def _open_for_stage(args: argparse.Namespace, stage: str):  # type: ignore[no-untyped-def]
    """The bundle and its splits, with ``stage`` (and what follows it) cleared when ``--redo``."""
    bundle = load_bundle(args.bundle)
    if args.redo:
        later = STAGE_ORDER[STAGE_ORDER.index(stage) :]
        for name in list(bundle.manifest["stages"]):
            if name.split(":")[0] in later:
                del bundle.manifest["stages"][name]
        bundle.save()
    return bundle, load_splits(bundle)


def cmd_mutants(args: argparse.Namespace) -> None:
    bundle, arrays = _open_for_stage(args, "mutants")
    profile = bundle.manifest["profile"]
    mutants_stage(
        bundle, arrays, operator=args.operator or profile["operator"], rate=args.rate or profile["mutation_rate"],
        n_mutants=args.n or profile["n_mutants"], seed=profile["seed"],
        modules=args.modules or profile.get("mutant_modules"), progress=progress_wanted(),
    )
    info = bundle.manifest["mutants"]
    print(
        f"{info['count']} {info['operator']} mutants at rate {info['rate']} in {info.get('modules') or 'all layers'} "
        f"({info['filters_per_mutant']} of "
        f"{info['total_filters']} filters each), acceptance rate {info['acceptance_rate']:.2f}"
    )


def cmd_features(args: argparse.Namespace) -> None:
    bundle, arrays = _open_for_stage(args, "features")
    profile = bundle.manifest["profile"]
    features_stage(
        bundle, arrays, batch_size=args.batch_size, early_stopping_alpha=profile.get("lcr_sprt_alpha"),
        early_stopping_chunk=profile.get("lcr_chunk", 10), progress=progress_wanted(),
    )
    print(f"features written to {bundle.path / 'features'}")


def cmd_sweep(args: argparse.Namespace) -> int:
    return sweep_main(args.sweep_args)


def cmd_report(args: argparse.Namespace) -> None:
    bundle = load_bundle(args.bundle)
    if args.sweep_from is not None:
        copy_sweep(load_bundle(args.sweep_from), bundle)
    arrays = load_splits(bundle)
    out = write_report(bundle, val_images=arrays["val"].images, n_boot=args.n_boot, progress=progress_wanted())
    print(f"report written to {out}")


def cmd_serve(args: argparse.Namespace) -> int:
    overrides = {
        "bundle": args.bundle, "host": args.host, "port": args.port, "signal_set": args.signal_set,
        "operating_point": args.operating_point, "device": args.device, "backend": args.backend,
    }
    return serve(Settings(**{k: v for k, v in overrides.items() if v is not None}))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="predgate", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="cut the splits and train (or import) the CNN into a bundle")
    _add_data_args(train)
    train.set_defaults(func=cmd_train)

    build = sub.add_parser("build", help="train, mutants, features, detectors, operating points and report")
    _add_data_args(build)
    build.add_argument("--default-set", default=None, help="signal set the server uses by default (cond+lcr)")
    build.add_argument(
        "--redo", default=None, choices=["conductance", "mutants", "features", "detectors", "report"],
        help="run this stage and every later one again (earlier stages stay as built)",
    )
    build.add_argument(
        "--from", dest="base", type=Path, default=None, metavar="BUNDLE",
        help="start --out as a copy of BUNDLE (new id), e.g. to --redo detectors with other settings",
    )
    build.set_defaults(func=cmd_build)

    serve = sub.add_parser("serve", help="serve a bundle over HTTP (other settings: PREDGATE_* variables)")
    serve.add_argument("--bundle", type=Path, default=None)
    serve.add_argument("--host", default=None)
    serve.add_argument("--port", type=int, default=None)
    serve.add_argument("--signal-set", default=None, help="signal set for verdicts (default: the bundle's)")
    serve.add_argument("--operating-point", default=None, help="stored operating point (default: equal-recall)")
    serve.add_argument("--device", default=None, help="auto, cpu or cuda")
    serve.add_argument(
        "--backend", default=None, choices=["torch", "onnx"], help="torch (default) or onnx (ONNX Runtime)"
    )
    serve.set_defaults(func=cmd_serve)

    mutants = sub.add_parser("mutants", help="generate and filter the mutants of a trained bundle")
    mutants.add_argument("--bundle", type=Path, required=True)
    mutants.add_argument("--operator", default=None, choices=["NAI", "GF", "WS", "NS"])
    mutants.add_argument("--rate", type=float, default=None, help="share of all conv filters per mutant")
    mutants.add_argument("-n", type=int, default=None, help="number of mutants to keep")
    mutants.add_argument("--modules", nargs="+", default=None, help="mutate only convs inside these modules")
    mutants.add_argument("--redo", action="store_true", help="replace existing mutants (and later stages)")
    mutants.set_defaults(func=cmd_mutants)

    features = sub.add_parser("features", help="extract logits, conductance and LCR for fit/val/test")
    features.add_argument("--bundle", type=Path, required=True)
    features.add_argument("--batch-size", type=int, default=256)
    features.add_argument("--redo", action="store_true", help="extract again (and clear later stages)")
    features.set_defaults(func=cmd_features)

    sweep = sub.add_parser("sweep", help="LCR by mutation operator and rate (python -m offline.sweep --help)")
    sweep.add_argument("sweep_args", nargs=argparse.REMAINDER)
    sweep.set_defaults(func=cmd_sweep)

    report = sub.add_parser("report", help="(re)write a bundle's evaluation report")
    report.add_argument("--bundle", type=Path, required=True)
    report.add_argument("--n-boot", type=int, default=1000)
    report.add_argument(
        "--sweep-from", type=Path, default=None,
        help="include the mutation sweep run on this bundle (it must hold the same CNN weights)",
    )
    report.set_defaults(func=cmd_report)

    open_world = sub.add_parser("open-world", help="shifted, unknown and mixed inputs: every signal set vs MSP")
    open_world_job.add_arguments(open_world)
    open_world.set_defaults(func=lambda args: open_world_job.run(args, progress_wanted()))

    shift = sub.add_parser("shift", help="write the open-world suites (corrupted, unknown, mixed images) as npz")
    shift_job.add_arguments(shift)
    shift.set_defaults(func=lambda args: shift_job.run(args, progress_wanted()))

    attack = sub.add_parser("attack", help="adversarial versions of the test split (torchattacks), into the bundle")
    attack_job.add_arguments(attack)
    attack.set_defaults(func=lambda args: attack_job.run(args, progress_wanted()))
    robustness = sub.add_parser("robustness", help="every signal set on the bundle's adversarial images vs MSP")
    robustness_report.add_arguments(robustness)
    robustness.set_defaults(func=lambda args: robustness_report.run(args, progress_wanted()))
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        code = args.func(args)
    except PredgateError as exc:
        print(f"predgate {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return code if isinstance(code, int) else 0


if __name__ == "__main__":
    sys.exit(main())
