"""The ``predgate`` command: one subcommand per offline job, plus ``serve``.

The composition root: the one module that wires the offline jobs and the server together (the
import contracts in pyproject.toml allow nothing else to import both ``offline`` and ``service``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from models.bundle import load_bundle
from models.data import DataSource, load_splits
from models.errors import ConfigError, PredgateError
from models.progress import install_line_progress, progress_wanted
from offline import adaptive_job, attribution_job, open_world_job, robustness_report, shift_job
from offline import attack as attack_job
from offline.build import build_bundle
from offline.profiles import STAGE_ORDER, get_profile
from offline.ray_engine import add_engine_arguments, engine_from
from offline.report import write_report
from offline.review_refit import refit_from_reviews
from offline.stages import ModelRequest, accuracy_check, features_stage, mutants_stage, prepare, train_stage
from offline.sweep import copy_sweep
from offline.sweep import main as sweep_main
from service.server import serve
from service.settings import Settings


def _add_data_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dataset", default="fashion-mnist", choices=["fashion-mnist", "cifar10", "imagefolder"]
    )
    parser.add_argument(
        "--data-root", default=None, help="data directory (default: the data set's standard place)"
    )
    parser.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="imagefolder: side of the square images decoded (default: --input-size)",
    )
    parser.add_argument("--profile", default="quick", help="quick (default) or full; flags below override it")
    model = parser.add_argument_group("the model (README: Bring your own model)")
    model.add_argument(
        "--arch",
        default="resnet20",
        help="resnet20, a torchvision model name, timm:NAME (a timm model, no download) or "
        "package.module:Class (a class or function of your own, found on --code-path or installed)",
    )
    model.add_argument(
        "--arch-kwargs", default=None, metavar="JSON", help="keyword arguments of --arch, as a JSON object"
    )
    model.add_argument(
        "--code-path", default=None, metavar="DIR", help="folder to import --arch package.module from"
    )
    model.add_argument(
        "--weights",
        type=Path,
        default=None,
        help="import instead of training: safetensors, a state_dict (torch.save(model.state_dict())), a "
        "TorchScript file or a torch.export program (.pt2); loaded into --arch",
    )
    model.add_argument(
        "--layer", default=None, help="conductance layer (default: the architecture's last feature map)"
    )
    model.add_argument(
        "--mean",
        type=float,
        nargs="+",
        default=None,
        help="the model's normalisation mean in [0, 1] pixel units, one value or one per channel "
        "(default: timm's config for imported timm weights, else the cnn-train statistics)",
    )
    model.add_argument(
        "--std", type=float, nargs="+", default=None, help="the model's normalisation std (as --mean)"
    )
    model.add_argument(
        "--input-size",
        type=int,
        default=None,
        help=(
            "side of the square input the model takes: images "
            "are scaled and centre-cropped as the server does"
        ),
    )
    model.add_argument(
        "--channels",
        type=int,
        default=None,
        choices=[1, 3],
        help="channels the model takes: grey is repeated into RGB, RGB turned to luma, as the server does "
        "(imagefolder: also how images are decoded; default 3 there, the data's elsewhere)",
    )
    model.add_argument(
        "--exclude-indices",
        "--cnn-train-indices",
        dest="exclude_indices",
        type=Path,
        default=None,
        metavar="FILE",
        help="indices (into the training files) of the images the model was trained on: cnn-train is drawn "
        "from them, fit and val from the rest (text, .json or .npy)",
    )
    model.add_argument(
        "--expected-accuracy",
        type=float,
        default=None,
        help="accuracy the model's provenance claims: the build warns when val accuracy is far below it",
    )
    model.add_argument(
        "--allow-low-accuracy",
        action="store_true",
        help="build on even when the CNN is near chance (the build stops there by default)",
    )
    training = parser.add_argument_group("training (defaults: the profile's)")
    training.add_argument("--epochs", type=int, default=None)
    training.add_argument(
        "--optimizer", default=None, choices=["sgd", "adam", "adamw"], help="sgd (Nesterov, default)"
    )
    training.add_argument(
        "--lr", type=float, default=None, help="peak learning rate (default 0.1 SGD, 1e-3 Adam/AdamW)"
    )
    training.add_argument("--batch-size", type=int, default=None)
    training.add_argument("--weight-decay", type=float, default=None)
    training.add_argument(
        "--augment",
        default=None,
        choices=["on", "off"],
        help="flips and 4-pixel crops on or off (default: on for natural images, off for Fashion-MNIST)",
    )
    parser.add_argument("--cnn-train", type=int, default=None, help="cnn-train split size")
    parser.add_argument("--fit", type=int, default=None, help="fit split size (detector training)")
    parser.add_argument("--val", type=int, default=None, help="val split size")
    parser.add_argument("--test", type=int, default=None, help="test split size")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument(
        "--fit-from-cnn-train",
        action="store_true",
        default=None,
        help="the paper's setting: detectors learn from (a --fit sized subset of) the CNN's training images",
    )
    parser.add_argument("--n-mutants", type=int, default=None)
    parser.add_argument(
        "--operator", default=None, choices=["NAI", "GF", "WS", "NS"], help="mutation operator"
    )
    parser.add_argument(
        "--mutation-rate", type=float, default=None, help="share of all conv filters per mutant"
    )
    parser.add_argument(
        "--mutant-modules",
        nargs="+",
        default=None,
        help="mutate only convs inside these modules (e.g. layer3): mutants share the computed prefix",
    )
    parser.add_argument(
        "--lcr-sprt",
        type=float,
        default=None,
        metavar="ALPHA",
        help=(
            "stop LCR early: SPRT with alpha = beta = ALPHA over chunks of mutants, p0/p1 from the fit split"
        ),
    )
    parser.add_argument(
        "--lcr-chunk", type=int, default=None, help="mutants per chunk of the early-stopping LCR"
    )
    parser.add_argument(
        "--cond-inputs",
        default=None,
        choices=["conductance", "conductance+class"],
        help=(
            "what the conductance detector reads: conductance alone "
            "(the paper's, default) or with the predicted class"
        ),
    )
    parser.add_argument(
        "--adv-train",
        default=None,
        choices=["pgd-linf", "pgd-l2"],
        help=(
            "adversarial training: every batch replaced by its "
            "PGD version (Madry et al.; the seeds' robust models)"
        ),
    )
    parser.add_argument(
        "--adv-eps", type=float, default=None, help="adversarial training radius in [0, 1] pixels"
    )
    parser.add_argument(
        "--adv-steps", type=int, default=None, help="PGD steps of adversarial training (default 7)"
    )
    parser.add_argument("--n-boot", type=int, default=None, help="bootstrap resamples of the report")
    parser.add_argument(
        "--detector-seeds", type=int, default=None, help="seeds the detectors are fitted with"
    )
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    parser.add_argument("--out", type=Path, required=True, help="bundle directory (e.g. bundles/NAME)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing bundle at --out")


def _profile_from(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    profile = get_profile(args.dataset, args.profile)
    return profile.with_overrides(
        epochs=args.epochs,
        cnn_train=args.cnn_train,
        fit=args.fit,
        val=args.val,
        test=args.test,
        seed=args.seed,
        n_mutants=args.n_mutants,
        operator=args.operator,
        mutation_rate=args.mutation_rate,
        fit_is_cnn_train=args.fit_from_cnn_train,
        mutant_modules=tuple(args.mutant_modules) if args.mutant_modules else None,
        lcr_sprt_alpha=args.lcr_sprt,
        lcr_chunk=args.lcr_chunk,
        cond_inputs=args.cond_inputs,
        optimizer=args.optimizer,
        lr=args.lr,
        batch_size=args.batch_size,
        weight_decay=args.weight_decay,
        augment=None if args.augment is None else args.augment == "on",
        n_boot=args.n_boot,
        detector_seeds=args.detector_seeds,
        adv_train=args.adv_train,
        adv_eps=args.adv_eps,
        adv_steps=args.adv_steps,
    )


def _source_from(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    if args.dataset != "imagefolder":
        return DataSource(args.dataset, args.data_root)
    return DataSource(args.dataset, args.data_root, args.image_size or args.input_size, args.channels or 3)


def _model_from(args: argparse.Namespace) -> ModelRequest:
    kwargs = {}
    if args.arch_kwargs:
        try:
            kwargs = json.loads(args.arch_kwargs)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"--arch-kwargs is not JSON: {exc}") from exc
        if not isinstance(kwargs, dict):
            raise ConfigError(f"--arch-kwargs must be a JSON object, got {type(kwargs).__name__}")
    return ModelRequest(
        arch=args.arch,
        arch_kwargs=kwargs,
        code_path=args.code_path,
        layer=args.layer,
        weights=args.weights,
        mean=tuple(args.mean) if args.mean else None,
        std=tuple(args.std) if args.std else None,
        input_size=args.input_size,
        channels=args.channels,
        exclude_indices=args.exclude_indices,
        expected_accuracy=args.expected_accuracy,
        allow_low_accuracy=args.allow_low_accuracy,
    )


def cmd_train(args: argparse.Namespace) -> None:
    profile = _profile_from(args)
    request = _model_from(args)
    bundle, arrays = prepare(args.out, _source_from(args), profile, overwrite=args.overwrite, model=request)
    train_stage(
        bundle,
        arrays,
        epochs=profile.epochs,
        seed=profile.seed,
        batch_size=profile.batch_size,
        weights=args.weights,
        device=args.device,
        progress=progress_wanted(),
        profile=profile,
    )
    info = bundle.manifest["training"]
    print(
        f"trained {args.arch} on {args.dataset}: cnn-train acc {info['cnn-train_accuracy']:.4f}, "
        f"val acc {info['val_accuracy']:.4f}, test acc {info['test_accuracy']:.4f} -> {bundle.path}"
    )
    check = accuracy_check(bundle, arrays, expected=request.expected_accuracy, allow_low=True)
    for message in check.messages:
        print(f"warning: {message}", file=sys.stderr)


def cmd_build(args: argparse.Namespace) -> None:
    if args.reviews is not None:
        if args.base is None or args.redo != "detectors":
            raise ConfigError(
                "--reviews refits a finished bundle's detectors: give --from BUNDLE --redo detectors "
                "(and --out for the new bundle)"
            )
        refit_from_reviews(
            args.base,
            args.out,
            args.reviews,
            held_out=args.review_held_out,
            seed=args.review_seed,
            progress=progress_wanted(),
        )
        return
    build_bundle(
        args.out,
        _source_from(args),
        _profile_from(args),
        device=args.device,
        default_set=args.default_set,
        overwrite=args.overwrite,
        redo=args.redo,
        base=args.base,
        progress=progress_wanted(),
        model=_model_from(args),
        engine=engine_from(args),
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
        bundle,
        arrays,
        operator=args.operator or profile["operator"],
        rate=args.rate or profile["mutation_rate"],
        n_mutants=args.n or profile["n_mutants"],
        seed=profile["seed"],
        modules=args.modules or profile.get("mutant_modules"),
        progress=progress_wanted(),
    )
    info = bundle.manifest["mutants"]
    print(
        f"{info['count']} {info['operator']} mutants at rate {info['rate']} in "
        f"{info.get('modules') or 'all layers'} ({info['filters_per_mutant']} of "
        f"{info['total_filters']} filters each), acceptance rate {info['acceptance_rate']:.2f}"
    )


def cmd_features(args: argparse.Namespace) -> None:
    bundle, arrays = _open_for_stage(args, "features")
    profile = bundle.manifest["profile"]
    features_stage(
        bundle,
        arrays,
        batch_size=args.batch_size,
        early_stopping_alpha=profile.get("lcr_sprt_alpha"),
        early_stopping_chunk=profile.get("lcr_chunk", 10),
        progress=progress_wanted(),
        engine=engine_from(args),
    )
    print(f"features written to {bundle.path / 'features'}")


def cmd_sweep(args: argparse.Namespace) -> int:
    return sweep_main(args.sweep_args)


def cmd_report(args: argparse.Namespace) -> None:
    bundle = load_bundle(args.bundle)
    if args.sweep_from is not None:
        copy_sweep(load_bundle(args.sweep_from), bundle)
    arrays = load_splits(bundle)
    out = write_report(
        bundle, val_images=arrays["val"].images, n_boot=args.n_boot, progress=progress_wanted()
    )
    print(f"report written to {out}")


def cmd_serve(args: argparse.Namespace) -> int:
    overrides = {
        "bundle": args.bundle,
        "host": args.host,
        "port": args.port,
        "signal_set": args.signal_set,
        "operating_point": args.operating_point,
        "device": args.device,
        "backend": args.backend,
        "cascade_bundle": args.cascade_bundle,
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
        "--redo",
        default=None,
        choices=["conductance", "mutants", "features", "detectors", "report"],
        help="run this stage and every later one again (earlier stages stay as built)",
    )
    build.add_argument(
        "--from",
        dest="base",
        type=Path,
        default=None,
        metavar="BUNDLE",
        help="start --out as a copy of BUNDLE (new id), e.g. to --redo detectors with other settings",
    )
    build.add_argument(
        "--reviews",
        type=Path,
        default=None,
        metavar="DB",
        help="with --from B --redo detectors: refit B's served signal set with the reviewed rejections of "
        "this outbox (the server's PREDGATE_FALLBACK_DIR or its outbox.sqlite3); the report says if it "
        "helped",
    )
    build.add_argument(
        "--review-held-out",
        type=float,
        default=0.5,
        help="share of the reviews held out to judge the refit (stratified by right/wrong; default 0.5)",
    )
    build.add_argument("--review-seed", type=int, default=0, help="seed of the refit / held-out split")
    add_engine_arguments(build)
    build.set_defaults(func=cmd_build)

    serve = sub.add_parser("serve", help="serve a bundle over HTTP (other settings: PREDGATE_* variables)")
    serve.add_argument("--bundle", type=Path, default=None)
    serve.add_argument("--host", default=None)
    serve.add_argument("--port", type=int, default=None)
    serve.add_argument("--signal-set", default=None, help="signal set for verdicts (default: the bundle's)")
    serve.add_argument(
        "--operating-point", default=None, help="stored operating point (default: equal-recall)"
    )
    serve.add_argument("--device", default=None, help="auto, cpu or cuda")
    serve.add_argument(
        "--backend", default=None, choices=["torch", "onnx"], help="torch (default) or onnx (ONNX Runtime)"
    )
    serve.add_argument(
        "--cascade-bundle",
        type=Path,
        default=None,
        help="second bundle that decides the images the first answers unknown (PREDGATE_CASCADE_BUNDLE)",
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
    add_engine_arguments(features)
    features.set_defaults(func=cmd_features)

    sweep = sub.add_parser("sweep", help="LCR by mutation operator and rate (python -m offline.sweep --help)")
    sweep.add_argument("sweep_args", nargs=argparse.REMAINDER)
    sweep.set_defaults(func=cmd_sweep)

    report = sub.add_parser("report", help="(re)write a bundle's evaluation report")
    report.add_argument("--bundle", type=Path, required=True)
    report.add_argument("--n-boot", type=int, default=1000)
    report.add_argument(
        "--sweep-from",
        type=Path,
        default=None,
        help="include the mutation sweep run on this bundle (it must hold the same CNN weights)",
    )
    report.set_defaults(func=cmd_report)

    # Jobs that bring their own arguments (add_arguments) and entry point (run(args, progress)).
    jobs = (
        ("open-world", open_world_job, "shifted, unknown and mixed inputs: every signal set vs MSP"),
        ("shift", shift_job, "write the open-world suites (corrupted, unknown, mixed images) as npz"),
        ("attack", attack_job, "adversarial versions of the test split (torchattacks), into the bundle"),
        ("robustness", robustness_report, "every signal set on the bundle's adversarial images vs MSP"),
        ("adaptive", adaptive_job, "white-box PGD that knows the gate: what survives, per signal set vs MSP"),
        (
            "attribution",
            attribution_job,
            "attribution maps of natural vs robust models on clean vs adversarial inputs",
        ),
    )
    for name, job, help_text in jobs:
        job_parser = sub.add_parser(name, help=help_text)
        job.add_arguments(job_parser)
        job_parser.set_defaults(func=lambda args, job=job: job.run(args, progress_wanted()))
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    stderr = sys.stderr
    install_line_progress()  # a redirected log gets a line per few percent, not every redraw
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        code = args.func(args)
    except PredgateError as exc:
        print(f"predgate {args.command}: error: {exc}", file=sys.stderr)
        return 2
    finally:
        sys.stderr = stderr
    return code if isinstance(code, int) else 0


if __name__ == "__main__":
    sys.exit(main())
