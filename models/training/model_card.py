"""MODEL_CARD.md, generated from the manifest so the card never disagrees with the bundle."""

from __future__ import annotations

from pathlib import Path
from typing import Any

DISCLAIMER = """\
> **Not for clinical use.** This model was trained and evaluated only on synthetic chest
> phantoms that the project renders itself (no clinical data set can be downloaded where it is
> built). It exists to demonstrate and test the triage pipeline end to end. A site plugs in its
> own validated model by pointing `paths.model_dir` at a bundle with its own manifest."""

PHANTOMS = """\
Phantoms: attenuation model of torso, lungs, heart, mediastinum, spine, ribs, clavicles and lung
texture; log detector with quantum noise; collimation; vendor-like edge enhancement; 12–16 bit;
MONOCHROME1 and 2; varied size and positioning. Abnormal: 1–3 nodules (8–30 mm) or opacities
(20–70 mm) with contrast drawn log-uniformly from faint to obvious; normal images may carry
look-alikes (nipple shadows, end-on vessels)."""

CENTRAL_DISCLAIMER = """\
> **Not for clinical use.** This model was trained and evaluated only on synthetic chest
> phantoms that the project renders itself (no clinical data set can be downloaded where it is
> built). It exists to demonstrate and test the escalation path end to end: the central server's
> second look at the cases edge devices do not decide themselves. Its figures say how it does on
> the phantoms, nothing about real radiographs."""

CENTRAL_ROLE = """\
Edge devices run the small INT8 model (`chest-dx-demo`) and escalate what they are unsure of.
This model is what the central diagnostic server runs on those escalated cases: the same design
(plain 3×3 convolutions, a lesion map supervised by the phantoms' lesion masks, a soft-OR image
score), 1.5× wider, on a 1.5× larger input, with the last two stages' convolutions dilated so that
its receptive field spans about the same share of the image, and in FP32 because the server has
the compute. It is trained by the same script (`python -m models.training.train --target
central`) on the same generator and seeds, through the app's own reader and preprocessing at its
own input size; the convolutions run under bfloat16 autocast in training only (the weights and
the shipped graph are FP32)."""

LIMITATIONS = """\
## Limitations

- Synthetic data only: performance on real radiographs is unknown and must not be assumed.
- Two finding types only; no devices, fractures, effusions, pneumothorax or lateral views.
- The mirror check knows the phantoms' anatomy; on real images it needs validating anew.
- The input profile flags images unlike the phantoms; it is not a guarantee of validity.
"""

CENTRAL_LIMITATIONS = """\
- Temperature and thresholds are fitted on the whole calibration split, not on the escalated
  cases alone. On those harder cases the probabilities are less well calibrated than overall, and
  the thresholds do not hold the error budget there (`central_confident_error_rate` above): a
  server that decides escalated cases automatically needs thresholds chosen on escalated cases.
- The escalated cases are the edge model's uncertain band at its manifest defaults; a site that
  approves other thresholds escalates a different mix.
"""


def _rows(block: dict[str, Any]) -> str:
    return "\n".join(
        f"| {key} | {value} |" for key, value in block.items() if not isinstance(value, dict)
    )


def _table(title: str, block: dict[str, Any]) -> list[str]:
    return [title, "", "| figure | value |", "|---|---|", _rows(block), ""]


def _versus_table(title: str, block: dict[str, Any]) -> list[str]:
    """Rows with an edge and a central value side by side; single values as a list after it."""
    pairs = {
        k: v for k, v in block.items() if isinstance(v, dict) and set(v) == {"edge", "central"}
    }
    rows = [f"| {key} | {value['edge']} | {value['central']} |" for key, value in pairs.items()]
    notes = [f"- {key}: {value}" for key, value in block.items() if key not in pairs]
    return [title, "", "| figure | edge | central |", "|---|---|---|", *rows, "", *notes, ""]


CENTRAL_DATA_NOTE = (
    "A data time of a few seconds means the rendered splits were read from the cache in "
    "`models/training/runs`; rendering them from scratch takes minutes."
)


def _central_role(manifest: dict[str, Any]) -> list[str]:
    architecture = manifest["architecture"]
    return [
        "## Role",
        "",
        CENTRAL_ROLE,
        "",
        f"- Architecture: `{architecture['class']}`, {architecture['parameters']:,} parameters, "
        f"lesion map of {architecture['lesion_grid'][0]}×{architecture['lesion_grid'][1]} cells; "
        f"trained with {architecture['torch_threads']} torch thread(s).",
        f"- Role in the manifest: {manifest['role']}.",
        "",
    ]


def _central_comparison(versus: dict[str, Any]) -> list[str]:
    lines = [
        "## Compared with the edge model on the same images",
        "",
        f"Edge model: {versus['edge_model']}, with its manifest's thresholds. Scores are each "
        "model's calibrated probability of abnormal; `_at_0.5` figures call abnormal at ≥ 0.5.",
        "",
    ]
    lines += _versus_table("### All held-out images", versus["all_images"])
    lines += _versus_table(
        "### The cases the edge model escalates (its uncertain band and atypical inputs)",
        versus["edge_escalated"],
    )
    lines += [
        "Differences are central − edge, with 95 % paired bootstrap intervals. "
        "`central_confident_*`: the share of these cases the central model would decide with its "
        "own thresholds, and its error rate on them.",
        "",
    ]
    lines += _versus_table(
        "### Two tiers: the edge decides what it is sure of, the named model answers the rest",
        versus["two_tier"],
    )
    return lines


def _mirror_check(profile: dict[str, Any]) -> list[str]:
    """The mirror check as the card states it, with its held-out figures; nothing if off."""
    figures = profile.get("mirror_check")
    if not figures:
        return []
    n = figures["images"]
    lines = [
        "- A left-right mirrored image (stored mirrored, or dextrocardia) is "
        f"{figures['rule']} ({figures['margin']}). On "
        f"{figures['data']}: {figures['images_flagged']} of {n} images flagged, "
        f"{figures['mirrored_flagged']} of their {n} mirrored copies caught."
    ]
    for name, cut in (figures.get("framing") or {}).items():
        share = name.removeprefix("cut_").removesuffix("pct")
        lines.append(
            f"  - With {share}% of the width cut off one side ({cut['images']} images, each "
            f"side in turn): {cut['images_flagged']} flagged, {cut['mirrored_flagged']} of "
            f"their mirrored copies caught."
        )
    return lines


def _views(use: dict[str, Any]) -> str:
    """The view check as the card states it; nothing for bundles that declare no views."""
    views = use.get("view_positions")
    if not views:
        return ""
    missing = "allowed" if use.get("allow_missing_view_position") else "escalated"
    return f"view position {', '.join(views)} (missing: {missing}); "


def _body_parts(use: dict[str, Any]) -> str:
    """The body part check as the card states it (``reader.body_part`` reads both places)."""
    missing = "allowed" if use.get("allow_missing_body_part") else "escalated"
    return (
        f"body part {', '.join(use['body_parts'])} (Body Part Examined and the Anatomic Region "
        f"Sequence's code, which must agree; missing: {missing}); "
    )


def write_model_card(bundle: Path, manifest: dict[str, Any]) -> None:
    evaluation = manifest.get("evaluation") or {}
    central = manifest.get("role") is not None
    accuracy = evaluation.get("accuracy", {})
    quant = evaluation.get("int8_vs_fp32") or manifest.get("quantization", {})
    thresholds = manifest["thresholds"]
    use = manifest["intended_use"]
    training = manifest["training"]
    prep = manifest["preprocessing"]
    positive = manifest["positive_label"]
    lines = [
        f"# Model card: {manifest['name']} {manifest['version']}",
        "",
        CENTRAL_DISCLAIMER if central else DISCLAIMER,
        "",
        "## What it does",
        "",
        f"Binary classification of a frontal chest radiograph into `{manifest['labels'][0]}` / "
        f"`{positive}` (nodules or opacities). Output: a temperature-calibrated probability of "
        f"`{positive}` (T = {manifest['calibration']['temperature']}).",
        "",
        f"- Intended use: modalities {', '.join(use['modalities'])}; {_body_parts(use)}"
        f"{_views(use)}{', '.join(use['photometric'])}. "
        f"{use['description']}",
        "- Anything else (wrong modality, body part, view position or photometric "
        "interpretation, multi-frame, or an image unlike the training data by the input "
        "profile) is escalated as out of scope.",
        *_mirror_check(manifest["input_profile"]),
        f"- Input: {manifest['input']['shape']} float32; preprocessing: resize to {prep['size']} "
        f"(area, on {prep.get('resize_dtype', 'stored')} values), window {prep['windowing']}, "
        f"MONOCHROME1 inverted, CLAHE {prep.get('clahe')}, "
        f"normalised {prep['normalise']}.",
        f"- Precision shipped: **{manifest['precision']}** "
        f"(ONNX, sha256 `{manifest['sha256'][:16]}…`).",
        "",
        *(_central_role(manifest) if central else []),
        "## Training data",
        "",
        f"{training['data']}; {training['epochs']} epochs. {PHANTOMS}",
        "",
        f"Built in {training['total_seconds']} s on 2 CPU cores "
        f"(data {training['data_seconds']} s, "
        f"training {training['train_seconds']} s).",
        *([CENTRAL_DATA_NOTE] if central else []),
        "",
        "## Default thresholds",
        "",
        f"normal below **{thresholds['normal_below']}**, abnormal at or above "
        f"**{thresholds['abnormal_at_or_above']}**; {thresholds['chosen_on']}.",
        "",
        "## Evaluation (held-out seed, never used in training or calibration)",
        "",
    ]
    if accuracy:
        lines += [evaluation["data"], ""]
        title = "### Deciding alone with its own thresholds" if central else "### Accuracy"
        lines += _table(title, accuracy)
        lines += [f"Decisions by reason: {accuracy['reasons']}", ""]
    else:
        tool = "evaluate_central" if central else "evaluate"
        lines += [f"Not evaluated yet: run `python -m models.training.{tool}`.", ""]
    if evaluation.get("versus_edge"):
        lines += _central_comparison(evaluation["versus_edge"])
    if quant:
        lines += _table("## INT8 versus FP32", quant)
    if evaluation.get("latency"):
        title = f"## Speed ({evaluation['machine']}, {evaluation['measured']})"
        lines += _versus_table(title, evaluation["latency"])
    if evaluation.get("throughput"):
        speed = {**evaluation["throughput"], **evaluation["cold_start"]}
        lines += _table(f"## Speed ({evaluation['machine']}, {evaluation['measured']})", speed)
    lines.append(LIMITATIONS + (CENTRAL_LIMITATIONS if central else ""))
    (bundle / "MODEL_CARD.md").write_text("\n".join(lines), encoding="utf-8")
