"""The --loss-type / --sed-* command-line flags and their checks, defined in one place.

`add_sed_args(parser)` is shared by megatron-sed-train and by Megatron-LM's
`extra_args_provider` (megatron_sed.megatron_lm), so the flags, defaults, help texts and
checks never drift apart; `validate_sed_args` is the one place they are checked.
"""

from __future__ import annotations

import argparse

import torch

from megatron_sed.ops.config import MASKS, REGULARIZERS, THRESHOLD_SIDE, KernelOptions, SEDConfig


class ArgumentError(ValueError):
    """A flag or flag combination that cannot work; the message names the flags."""


# The authors' defaults (pppa2019/SED-SFT): lambda = 1.0 in their scripts, k = 2,
# about 30 % of supervised tokens regularised (cumsum_ratio 0.7).
DEFAULT_SED_COEF = 1.0
DEFAULT_SED_TOP_K = 2
DEFAULT_SED_THRESHOLD = 0.95
DEFAULT_CALIBRATION_SAMPLES = 100
# --sed-calibration: megatron_sed.calibration.recipes says what each recipe does.
RECIPES = ("authors", "supervised")
DEFAULT_RECIPE = "authors"
AUTHORS_CALIBRATION_TOP_K = 10  # the authors' code calibrates with k = 10 (their loss: k = 2)


def add_sed_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the SED-SFT flags to `parser` (an argparse parser) and return it."""
    group = parser.add_argument_group(title="SED-SFT loss")
    group.add_argument(
        "--loss-type",
        type=str,
        default="ce",
        choices=["ce", "sed"],
        help="Language-model loss: 'ce' (plain cross-entropy) or 'sed' "
        "(cross-entropy + selective diversity regulariser, SED-SFT).",
    )
    group.add_argument(
        "--sed-coef",
        "--sed-lambda",
        dest="sed_coef",
        type=float,
        default=DEFAULT_SED_COEF,
        help="lambda: weight of the SED regulariser (>= 0).",
    )
    group.add_argument(
        "--sed-top-k",
        type=int,
        default=DEFAULT_SED_TOP_K,
        help="k of the top-k probability mass that selects the regularised tokens.",
    )
    group.add_argument(
        "--sed-threshold",
        type=float,
        default=None,
        help="tau. --sed-mask topk_mass: regularise tokens whose top-k mass < tau; "
        "--sed-mask entropy: tokens whose entropy (nats) > tau. Overrides --sed-mask-ratio. "
        f"Default {DEFAULT_SED_THRESHOLD} when neither is given.",
    )
    group.add_argument(
        "--sed-mask",
        type=str,
        default="topk_mass",
        choices=list(MASKS),
        help="Which tokens get the regulariser: topk_mass (the paper), entropy, all, none.",
    )
    group.add_argument(
        "--sed-regularizer",
        type=str,
        default="quadratic",
        choices=list(REGULARIZERS),
        help="quadratic: (p_target - 1/2)^2 (the paper); entropy: -H(p).",
    )
    group.add_argument(
        "--sed-mask-ratio",
        type=float,
        default=None,
        help="Calibrate tau before training so that this fraction of supervised tokens "
        "is regularised (the paper: 0.3). Ignored when --sed-threshold is given.",
    )
    group.add_argument(
        "--sed-calibration-samples",
        type=int,
        default=DEFAULT_CALIBRATION_SAMPLES,
        help="Held-out samples used to calibrate tau (--sed-mask-ratio).",
    )
    group.add_argument(
        "--sed-calibration",
        type=str,
        default=DEFAULT_RECIPE,
        choices=list(RECIPES),
        help="How --sed-mask-ratio calibrates tau. authors (the SED-SFT authors' code, the "
        "default): top-k mass with k = --sed-calibration-top-k (10) at every position of "
        "the first --sed-calibration-samples held-out samples, tau = sorted(x)[-int((1 - "
        "ratio) N)]. supervised: the loss's own statistic (same k) at the supervised "
        "tokens, tau its ratio quantile, so that exactly that share is regularised.",
    )
    group.add_argument(
        "--sed-calibration-top-k",
        type=int,
        default=None,
        help=f"k of the top-k mass the calibration measures (default: "
        f"{AUTHORS_CALIBRATION_TOP_K} for --sed-calibration authors, --sed-top-k for supervised).",
    )
    group.add_argument(
        "--sed-threshold-update",
        type=str,
        default="fixed",
        choices=["fixed", "ema"],
        help="fixed: tau stays as set/calibrated; ema: re-estimate the --sed-mask-ratio "
        "quantile on every batch and track it with an exponential moving average.",
    )
    group.add_argument(
        "--sed-threshold-ema",
        type=float,
        default=0.9,
        help="Decay of the EMA used by --sed-threshold-update ema.",
    )
    group.add_argument(
        "--sed-fused-chunk-tokens",
        type=int,
        default=None,
        help="With --cross-entropy-loss-fusion --cross-entropy-fusion-impl linear (the output "
        "layer fused with the loss, no [s, b, V/tp] logits): tokens per chunk. Default: 1/16 "
        "of the micro-batch's tokens, at least 256, at most 256 MiB of float32 logits per "
        "chunk (docs/loss.md works the memory through).",
    )
    return parser


def linear_fusion_requested(args: argparse.Namespace) -> bool:
    """--cross-entropy-loss-fusion --cross-entropy-fusion-impl linear: the output layer
    fused with the loss (megatron_sed.ops.fused_linear_sed)."""
    return bool(getattr(args, "cross_entropy_loss_fusion", False)) and (
        getattr(args, "cross_entropy_fusion_impl", None) == "linear"
    )


def validate_sed_args(args: argparse.Namespace) -> None:
    """Check the SED flags; raise ArgumentError (a ValueError) naming the offending flag."""
    try:
        _validate_sed_args(args)
    except ArgumentError:
        raise
    except ValueError as err:
        raise ArgumentError(str(err)) from None


def _validate_sed_args(args: argparse.Namespace) -> None:
    if getattr(args, "loss_type", "ce") not in ("ce", "sed"):
        raise ValueError(f"--loss-type must be 'ce' or 'sed', got {args.loss_type!r}")
    chunk = getattr(args, "sed_fused_chunk_tokens", None)
    if chunk is not None and chunk < 1:
        raise ValueError(f"--sed-fused-chunk-tokens must be >= 1, got {chunk}")
    if chunk is not None and not linear_fusion_requested(args):
        raise ValueError(
            "--sed-fused-chunk-tokens sizes the chunks of the fused output layer + loss: it "
            "needs --cross-entropy-loss-fusion --cross-entropy-fusion-impl linear"
        )
    if args.sed_coef < 0:
        raise ValueError(f"--sed-coef must be >= 0, got {args.sed_coef}")
    if args.sed_top_k < 1:
        raise ValueError(f"--sed-top-k must be >= 1, got {args.sed_top_k}")
    ratio = getattr(args, "sed_mask_ratio", None)
    if ratio is not None and not 0.0 < ratio < 1.0:
        raise ValueError(f"--sed-mask-ratio must lie in (0, 1), got {ratio}")
    if getattr(args, "sed_calibration_samples", 1) < 1:
        raise ValueError(f"--sed-calibration-samples must be >= 1, got {args.sed_calibration_samples}")
    if getattr(args, "sed_threshold_update", "fixed") == "ema" and ratio is None:
        raise ValueError("--sed-threshold-update ema needs --sed-mask-ratio (the quantile to track)")
    ema = getattr(args, "sed_threshold_ema", 0.9)
    if not 0.0 <= ema < 1.0:
        raise ValueError(f"--sed-threshold-ema must lie in [0, 1), got {ema}")
    calibrates = (
        getattr(args, "loss_type", "ce") == "sed" and ratio is not None and args.sed_threshold is None
    )
    if calibrates and args.sed_mask not in THRESHOLD_SIDE:
        raise ValueError(
            f"--sed-mask-ratio calibrates a threshold, but --sed-mask "
            f"{args.sed_mask} has none: use --sed-mask topk_mass or entropy"
        )
    if getattr(args, "loss_type", "ce") == "sed" and getattr(args, "mtp_num_layers", None):
        from megatron_sed.model.loss_hook import supports_output_processor  # noqa: PLC0415 (imports megatron-core)

        if not supports_output_processor():
            raise ValueError(
                "--mtp-num-layers with --loss-type sed needs megatron-core >= 0.18 (GPTModel's "
                "output_processor hook, which keeps Megatron's CE for the MTP heads while the "
                "main head computes SED): upgrade megatron-core or drop --mtp-num-layers"
            )
    recipe = getattr(args, "sed_calibration", "supervised")
    if recipe not in RECIPES:
        raise ValueError(f"--sed-calibration must be one of {', '.join(RECIPES)}, got {recipe!r}")
    calibration_k = getattr(args, "sed_calibration_top_k", None)
    if calibration_k is not None and calibration_k < 1:
        raise ValueError(f"--sed-calibration-top-k must be >= 1, got {calibration_k}")
    if calibrates and recipe == "authors" and args.sed_mask != "topk_mass":
        raise ValueError(
            f"--sed-calibration authors calibrates a top-k mass threshold, but --sed-mask is "
            f"{args.sed_mask}: use --sed-calibration supervised for the entropy mask"
        )
    if calibrates and recipe == "authors" and getattr(args, "sed_threshold_update", "fixed") == "ema":
        raise ValueError(
            "--sed-threshold-update ema tracks the --sed-mask-ratio quantile of the supervised "
            "tokens, which the authors' recipe does not calibrate: add --sed-calibration supervised"
        )
    if calibrates and (getattr(args, "pipeline_model_parallel_size", 1) or 1) > 1:
        raise ValueError(
            "--sed-mask-ratio calibrates tau with the model's logits, which only the last "
            "pipeline stage has: calibrate at --pipeline-model-parallel-size 1 (the log says "
            "'calibrated SED threshold tau=...') and pass --sed-threshold"
        )
    try:
        sed_config_from_args(args)
    except ValueError as err:  # re-word SEDConfig's message in flag names
        msg = str(err).replace("SEDConfig.threshold", "--sed-threshold")
        msg = msg.replace("SEDConfig.coef", "--sed-coef").replace("SEDConfig.top_k", "--sed-top-k")
        raise ValueError(msg) from None


def sed_config_from_args(args: argparse.Namespace, threshold: float | None = None) -> SEDConfig:
    """The SEDConfig the flags describe. `threshold` (e.g. a calibrated tau) wins over
    --sed-threshold's default but not over an explicit --sed-threshold.
    --loss-type ce gives a config whose regulariser never acts (mask 'none')."""
    tau = args.sed_threshold if args.sed_threshold is not None else threshold
    if tau is None:
        tau = DEFAULT_SED_THRESHOLD
    loss_type = getattr(args, "loss_type", "sed")
    return SEDConfig(
        coef=float(args.sed_coef),
        top_k=int(args.sed_top_k),
        threshold=tau if isinstance(tau, torch.Tensor) else float(tau),  # a tensor: the EMA's
        mask=args.sed_mask if loss_type == "sed" else "none",
        regularizer=args.sed_regularizer,
        ignore_index=-100,
        impl=getattr(args, "sed_impl", "auto"),
        kernel=KernelOptions(
            linear_fusion=linear_fusion_requested(args),
            fused_chunk_tokens=getattr(args, "sed_fused_chunk_tokens", None),
        ),
    )
