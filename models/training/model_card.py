"""MODEL_CARD.md, generated from the manifest so the card never disagrees with the bundle."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _rows(block: dict[str, Any]) -> str:
    return "\n".join(f"| {key} | {value} |" for key, value in block.items() if not isinstance(value, dict))


def write_model_card(bundle: Path, manifest: dict[str, Any]) -> None:
    evaluation = manifest.get("evaluation") or {}
    accuracy = evaluation.get("accuracy", {})
    quant = evaluation.get("int8_vs_fp32") or manifest.get("quantization", {})
    thresholds = manifest["thresholds"]
    use = manifest["intended_use"]
    training = manifest["training"]
    lines = [
        f"# Model card: {manifest['name']} {manifest['version']}",
        "",
        "> **Not for clinical use.** This model was trained and evaluated only on synthetic chest",
        "> phantoms that the project renders itself (no clinical data set can be downloaded where it",
        "> is built). It exists to demonstrate and test the triage pipeline end to end. A site plugs in",
        "> its own validated model by pointing `paths.model_dir` at a bundle with its own manifest.",
        "",
        "## What it does",
        "",
        f"Binary classification of a frontal chest radiograph into `{manifest['labels'][0]}` / "
        f"`{manifest['positive_label']}` (nodules or opacities). Output: a temperature-calibrated "
        f"probability of `{manifest['positive_label']}` (T = {manifest['calibration']['temperature']}).",
        "",
        f"- Intended use: modalities {', '.join(use['modalities'])}; body part "
        f"{', '.join(use['body_parts'])}; {', '.join(use['photometric'])}. {use['description']}",
        "- Anything else (wrong modality/body part/photometric, multi-frame, or an image whose "
        "appearance is unlike the training data by the input profile) is escalated as out of scope.",
        f"- Input: {manifest['input']['shape']} float32; preprocessing: resize to "
        f"{manifest['preprocessing']['size']} (area), window "
        f"{manifest['preprocessing']['windowing']}, MONOCHROME1 inverted, normalised "
        f"{manifest['preprocessing']['normalise']}.",
        f"- Precision shipped: **{manifest['precision']}** (ONNX, sha256 `{manifest['sha256'][:16]}…`).",
        "",
        "## Training data",
        "",
        f"{training['data']}; {training['epochs']} epochs. Phantoms: attenuation model of torso, "
        "lungs, heart, mediastinum, spine, ribs, clavicles, lung texture; log detector with quantum "
        "noise; collimation; vendor-like edge enhancement; 12–16 bit; MONOCHROME1 and 2; varied size "
        "and positioning. Abnormal: 1–3 nodules (4–30 mm) or opacities (20–70 mm) with contrast drawn "
        "log-uniformly down to near-invisible; normal images may carry look-alikes (nipple shadows, "
        "end-on vessels).",
        f"Built in {training['total_seconds']} s on 2 CPU cores "
        f"(data {training['data_seconds']} s, training {training['train_seconds']} s).",
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
        lines += [
            evaluation["data"],
            "",
            "| figure | value |",
            "|---|---|",
            _rows(accuracy),
            "",
            f"Decisions by reason: {accuracy['reasons']}",
            "",
        ]
    else:
        lines += ["Not evaluated yet: run `python -m models.training.evaluate`.", ""]
    if quant:
        lines += ["## INT8 versus FP32", "", "| figure | value |", "|---|---|", _rows(quant), ""]
    if evaluation.get("throughput"):
        lines += [
            f"## Speed ({evaluation['machine']}, {evaluation['measured']})",
            "",
            "| figure | value |",
            "|---|---|",
            _rows(evaluation["throughput"]),
            _rows(evaluation["cold_start"]),
            "",
        ]
    lines += [
        "## Limitations",
        "",
        "- Synthetic data only: performance on real radiographs is unknown and must not be assumed.",
        "- Two finding types only; no devices, fractures, effusions, pneumothorax or lateral views.",
        "- The input profile flags images unlike the phantoms; it is not a guarantee of validity.",
        "",
    ]
    (bundle / "MODEL_CARD.md").write_text("\n".join(lines), encoding="utf-8")
