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

LIMITATIONS = """\
## Limitations

- Synthetic data only: performance on real radiographs is unknown and must not be assumed.
- Two finding types only; no devices, fractures, effusions, pneumothorax or lateral views.
- The input profile flags images unlike the phantoms; it is not a guarantee of validity.
"""


def _rows(block: dict[str, Any]) -> str:
    return "\n".join(
        f"| {key} | {value} |" for key, value in block.items() if not isinstance(value, dict)
    )


def _table(title: str, block: dict[str, Any]) -> list[str]:
    return [title, "", "| figure | value |", "|---|---|", _rows(block), ""]


def write_model_card(bundle: Path, manifest: dict[str, Any]) -> None:
    evaluation = manifest.get("evaluation") or {}
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
        DISCLAIMER,
        "",
        "## What it does",
        "",
        f"Binary classification of a frontal chest radiograph into `{manifest['labels'][0]}` / "
        f"`{positive}` (nodules or opacities). Output: a temperature-calibrated probability of "
        f"`{positive}` (T = {manifest['calibration']['temperature']}).",
        "",
        f"- Intended use: modalities {', '.join(use['modalities'])}; body part "
        f"{', '.join(use['body_parts'])}; {', '.join(use['photometric'])}. {use['description']}",
        "- Anything else (wrong modality, body part or photometric interpretation, multi-frame, or "
        "an image unlike the training data by the input profile) is escalated as out of scope.",
        f"- Input: {manifest['input']['shape']} float32; preprocessing: resize to {prep['size']} "
        f"(area), window {prep['windowing']}, MONOCHROME1 inverted, CLAHE {prep.get('clahe')}, "
        f"normalised {prep['normalise']}.",
        f"- Precision shipped: **{manifest['precision']}** "
        f"(ONNX, sha256 `{manifest['sha256'][:16]}…`).",
        "",
        "## Training data",
        "",
        f"{training['data']}; {training['epochs']} epochs. {PHANTOMS}",
        "",
        f"Built in {training['total_seconds']} s on 2 CPU cores "
        f"(data {training['data_seconds']} s, "
        f"training {training['train_seconds']} s).",
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
        lines += _table("### Accuracy", accuracy)
        lines += [f"Decisions by reason: {accuracy['reasons']}", ""]
    else:
        lines += ["Not evaluated yet: run `python -m models.training.evaluate`.", ""]
    if quant:
        lines += _table("## INT8 versus FP32", quant)
    if evaluation.get("throughput"):
        speed = {**evaluation["throughput"], **evaluation["cold_start"]}
        lines += _table(f"## Speed ({evaluation['machine']}, {evaluation['measured']})", speed)
    lines.append(LIMITATIONS)
    (bundle / "MODEL_CARD.md").write_text("\n".join(lines), encoding="utf-8")
