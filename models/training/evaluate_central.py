"""The central model beside the edge model, on the same unseen images, and on what it is for.

    python -m models.training.evaluate_central              # 4,000 held-out images
    python -m models.training.evaluate_central --no-write   # print only; leave the bundle alone

Both bundles are loaded through the app's own loader (``Classifier``: manifest, hash checks,
ONNX Runtime session on one thread) and every image through the app's own reader and
preprocessing, at each model's own input size. The edge model decides with its manifest's
thresholds; the cases it would escalate (its uncertain band, and any image its input profile
calls atypical) are the central model's job and get figures of their own, with paired bootstrap
intervals for the differences. Unless ``--no-write``, the figures go into the central manifest's
``evaluation`` block and its MODEL_CARD.md is regenerated.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from models.training.calibrate import auroc, expected_calibration_error, operating_point
from models.training.evaluate import EVAL_SEED, _cores, _cpu_name, held_out_folder, read_truth
from models.training.model_card import write_model_card
from triage_app.dicom import load_image
from triage_app.model.classifier import Classifier, softmax_with_temperature
from triage_app.model.manifest import MANIFEST_NAME, sha256_file
from triage_app.model.preprocess import to_tensor, to_unit_image

MODELS_DIR = Path(__file__).resolve().parents[1]
EDGE_BUNDLE = MODELS_DIR / "chest-dx-demo"
CENTRAL_BUNDLE = MODELS_DIR / "central-dx-demo"
CHUNK = 64  # images decoded, preprocessed and scored together
LATENCY_IMAGES = 200
BOOTSTRAP_ROUNDS = 1000


@dataclass(frozen=True)
class Scored:
    """One model's view of the held-out images."""

    scores: np.ndarray  # calibrated probability of the positive label
    typical: np.ndarray  # bool: within the model's input profile
    inputs: np.ndarray  # the first LATENCY_IMAGES model inputs, for timing


def score_images(files: Sequence[Path], models: Sequence[Classifier]) -> list[Scored]:
    """Each file read once, then preprocessed and scored by every model at its own size."""
    scores: list[list[np.ndarray]] = [[] for _ in models]
    typical: list[list[bool]] = [[] for _ in models]
    kept: list[list[np.ndarray]] = [[] for _ in models]
    for start in range(0, len(files), CHUNK):
        images = [load_image(path) for path in files[start : start + CHUNK]]
        for m, model in enumerate(models):
            spec = model.manifest.preprocessing
            units = [to_unit_image(image, spec) for image in images]
            batch = np.concatenate([to_tensor(unit, spec) for unit in units])
            logits = model.logits(batch)
            probs = softmax_with_temperature(logits, model.manifest.temperature)
            scores[m].append(probs[:, model.manifest.positive_index])
            typical[m] += [model.profile.is_typical(model.profile.score(u), u) for u in units]
            if start < LATENCY_IMAGES:
                kept[m].append(batch)
    return [
        Scored(np.concatenate(s), np.array(t), np.concatenate(k)[:LATENCY_IMAGES])
        for s, t, k in zip(scores, typical, kept, strict=True)
    ]


def figures(scores: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Threshold-free and 0.5-threshold figures of calibrated scores."""
    called = scores >= 0.5
    positives = labels == 1
    return {
        "auroc": round(auroc(scores, labels), 5),
        "accuracy_at_0.5": round(float((called == positives).mean()), 5),
        "sensitivity_at_0.5": round(float(called[positives].mean()), 5),
        "specificity_at_0.5": round(float((~called[~positives]).mean()), 5),
        "ece": round(float(expected_calibration_error(scores, labels)), 5),
    }


def side_by_side(edge: dict[str, float], central: dict[str, float]) -> dict[str, dict[str, float]]:
    return {key: {"edge": edge[key], "central": central[key]} for key in edge}


def paired_interval(
    statistic: Callable[[np.ndarray, np.ndarray], float],
    edge: np.ndarray,
    central: np.ndarray,
    labels: np.ndarray,
) -> list[float]:
    """95 % percentile interval of statistic(central) − statistic(edge) over paired resamples."""
    rng = np.random.default_rng(0)
    differences = []
    for _ in range(BOOTSTRAP_ROUNDS):
        pick = rng.integers(0, len(labels), len(labels))
        if labels[pick].min() == labels[pick].max():
            continue
        differences.append(
            statistic(central[pick], labels[pick]) - statistic(edge[pick], labels[pick])
        )
    low, high = np.quantile(differences, [0.025, 0.975])
    return [round(float(low), 5), round(float(high), 5)]


def _accuracy(scores: np.ndarray, labels: np.ndarray) -> float:
    return float(((scores >= 0.5) == (labels == 1)).mean())


def own_decisions(
    scores: np.ndarray, typical: np.ndarray, labels: np.ndarray, classifier: Classifier
) -> dict[str, Any]:
    """The model deciding alone with its manifest's thresholds, in the edge evaluation's terms."""
    low = classifier.manifest.thresholds.normal_below
    high = classifier.manifest.thresholds.abnormal_at_or_above
    normal = typical & (scores < low)
    abnormal = typical & (scores >= high)
    local = normal | abnormal
    errors = int(((normal & (labels == 1)) | (abnormal & (labels == 0))).sum())
    missed = int((normal & (labels == 1)).sum()) / max(int(labels.sum()), 1)
    return {
        "n": len(labels),
        "abnormal_share": round(float(labels.mean()), 4),
        "auroc": round(auroc(scores, labels), 5),
        "ece": round(float(expected_calibration_error(scores, labels)), 5),
        "local_share": round(float(local.mean()), 4),
        "local_error_rate": round(errors / max(int(local.sum()), 1), 5),
        "local_errors": errors,
        "missed_abnormal_rate": round(missed, 5),
        "reasons": {
            "confident_normal": int(normal.sum()),
            "confident_abnormal": int(abnormal.sum()),
            "uncertain": int((typical & ~local).sum()),
            "out_of_scope": int((~typical).sum()),
        },
    }


def versus_edge(
    edge: Scored,
    central: Scored,
    labels: np.ndarray,
    edge_model: Classifier,
    central_model: Classifier,
) -> dict[str, Any]:
    low = edge_model.manifest.thresholds.normal_below
    high = edge_model.manifest.thresholds.abnormal_at_or_above
    uncertain = edge.typical & (edge.scores >= low) & (edge.scores < high)
    escalated = uncertain | ~edge.typical
    band = labels[escalated]
    e_band, c_band = edge.scores[escalated], central.scores[escalated]
    c_low = central_model.manifest.thresholds.normal_below
    c_high = central_model.manifest.thresholds.abnormal_at_or_above
    central_point = operating_point(c_band, band, c_low, c_high)
    local = ~escalated
    local_errors = int(((edge.scores[local] >= 0.5) != (labels[local] == 1)).sum())

    def system_errors(answers: np.ndarray) -> int:
        return local_errors + int(((answers >= 0.5) != (band == 1)).sum())

    return {
        "edge_model": f"{edge_model.manifest.key}, {edge_model.manifest.raw['precision']}, "
        f"{edge_model.manifest.preprocessing.rows}×{edge_model.manifest.preprocessing.columns}",
        "all_images": {
            "n": len(labels),
            **side_by_side(figures(edge.scores, labels), figures(central.scores, labels)),
        },
        "edge_escalated": {
            "n": int(escalated.sum()),
            "share_of_all": round(float(escalated.mean()), 4),
            "uncertain_band": int(uncertain.sum()),
            "atypical_input": int((~edge.typical).sum()),
            "abnormal_share": round(float(band.mean()), 4),
            **side_by_side(figures(e_band, band), figures(c_band, band)),
            "auroc_difference_95ci": paired_interval(auroc, e_band, c_band, band),
            "accuracy_difference_95ci": paired_interval(_accuracy, e_band, c_band, band),
            "central_confident_share": round(central_point.local_share, 4),
            "central_confident_error_rate": round(central_point.local_error_rate, 5),
        },
        "two_tier": {
            "edge_local_share": round(float(local.mean()), 4),
            "edge_local_errors": local_errors,
            "escalated_answered_by": "the named model at 0.5",
            "system_errors": {
                "edge": system_errors(e_band),
                "central": system_errors(c_band),
            },
            "system_accuracy": {
                "edge": round(1 - system_errors(e_band) / len(labels), 5),
                "central": round(1 - system_errors(c_band) / len(labels), 5),
            },
        },
    }


def latency(
    edge_model: Classifier, central_model: Classifier, edge: Scored, central: Scored
) -> dict[str, Any]:
    """Batch-1 ``Classifier.predict`` on one thread, the two models alternating image by image
    so that both see the same machine noise."""
    times: dict[str, list[float]] = {"edge": [], "central": []}
    pairs = (("edge", edge_model, edge.inputs), ("central", central_model, central.inputs))
    for _, model, inputs in pairs:
        for i in range(30):
            model.predict(inputs[i : i + 1])
    for i in range(3 * LATENCY_IMAGES):
        j = i % LATENCY_IMAGES
        for name, model, inputs in pairs:
            started = time.perf_counter()
            model.predict(inputs[j : j + 1])
            times[name].append(time.perf_counter() - started)

    def row(name: str, model: Classifier) -> dict[str, float]:
        values = sorted(times[name])
        path = model.bundle_dir / model.manifest.onnx_file
        return {
            "infer_ms_median": round(statistics.median(values) * 1e3, 3),
            "infer_ms_p95": round(values[int(0.95 * (len(values) - 1))] * 1e3, 3),
            "model_file_mb": round(path.stat().st_size / 1e6, 3),
        }

    edge_row, central_row = row("edge", edge_model), row("central", central_model)
    return {
        "method": f"Classifier.predict, batch 1, 1 thread, alternating, "
        f"{3 * LATENCY_IMAGES} runs each",
        **side_by_side(edge_row, central_row),
        "central_over_edge": round(central_row["infer_ms_median"] / edge_row["infer_ms_median"], 2),
    }


def _print(block: dict[str, Any], indent: str = "  ") -> None:
    for key, value in block.items():
        if isinstance(value, dict) and set(value) != {"edge", "central"}:
            print(f"{indent}{key}")
            _print(value, indent + "  ")
        else:
            print(f"{indent}{key}: {value}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--count", type=int, default=4000)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)

    folder = held_out_folder(args.count)
    truth = read_truth(folder)
    files = sorted(folder.glob("*.dcm"))
    labels = np.array([truth[p.name]["label"] == "abnormal" for p in files], np.int64)
    edge_model = Classifier(EDGE_BUNDLE, threads=1)
    central_model = Classifier(CENTRAL_BUNDLE, threads=1)
    edge, central = score_images(files, [edge_model, central_model])

    accuracy = own_decisions(central.scores, central.typical, labels, central_model)
    comparison = versus_edge(edge, central, labels, edge_model, central_model)
    speed = latency(edge_model, central_model, edge, central)
    for title, block in (
        (f"Central model alone on held-out seed {EVAL_SEED} (n={len(files)})", accuracy),
        ("Versus the edge model, same images", comparison),
        ("Latency", speed),
    ):
        print(f"\n{title}")
        _print(block)

    evaluation = {
        "data": f"synthetic phantoms, seed {EVAL_SEED} (never used in training or calibration "
        f"of either model), n={len(files)}, abnormal share {accuracy['abnormal_share']}",
        "accuracy": accuracy,
        "versus_edge": comparison,
        "latency": speed,
        "machine": f"{_cpu_name()}, {_cores()} cores",
        "measured": time.strftime("%Y-%m-%d"),
    }
    manifest = json.loads((CENTRAL_BUNDLE / MANIFEST_NAME).read_text(encoding="utf-8"))
    if not args.no_write:
        manifest["evaluation"] = evaluation
        text = json.dumps(manifest, indent=2) + "\n"
        (CENTRAL_BUNDLE / MANIFEST_NAME).write_text(text, encoding="utf-8")
        write_model_card(CENTRAL_BUNDLE, manifest)
        print(f"\nwrote the figures to {CENTRAL_BUNDLE / MANIFEST_NAME} and MODEL_CARD.md")
    assert sha256_file(CENTRAL_BUNDLE / manifest["file"]) == manifest["sha256"]
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
