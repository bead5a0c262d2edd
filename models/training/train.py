"""Train, calibrate, quantize and package the demo edge model from scratch.

    python -m models.training.train            # the shipped bundle (~20 min on 2 cores)
    python -m models.training.train --quick    # a small smoke run into a scratch directory
    python -m models.training.train --target central   # the central server's FP32 model (~35 min)

Steps: render synthetic phantoms (training seed and a separate calibration seed) through the
app's own reader and preprocessing; train the CNN; export ONNX; quantize to static INT8 (QDQ,
per-channel, uint8 activations) and keep it only if it passes the gate (≥ 1.5× faster and AUROC
drop ≤ 0.005 on the calibration split); fit the temperature and the default thresholds on the
calibration split with the model that ships; fit the input profile; write the bundle. Figures on
an unseen seed come from ``models.training.evaluate``, never from the data used here.

``--target central`` builds the larger model the central diagnostic server runs on escalated
cases: ``CentralNet`` at 192×192, trained the same way on the same generator and seeds, shipped
in FP32 without the quantization step, into ``models/central-dx-demo``. Its figures, side by
side with the edge model's on the same unseen images, come from
``models.training.evaluate_central``.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from onnxruntime.quantization import (
    CalibrationDataReader,
    QuantFormat,
    QuantType,
    quant_pre_process,
    quantize_static,
)
from torch.nn import functional

from models.training.calibrate import auroc, choose_thresholds, fit_temperature
from models.training.data import RUNS_DIR, Split, build_split
from models.training.mirror_check import mirror_figures
from models.training.model_card import write_model_card
from models.training.net import CentralNet, EdgeNet
from triage_app.model.classifier import make_session, softmax_with_temperature
from triage_app.model.input_profile import InputProfile
from triage_app.model.manifest import FORMAT_VERSION, sha256_file
from triage_app.model.preprocess import PreprocessSpec, to_tensor

logger = logging.getLogger("models.training.train")

MODELS_DIR = Path(__file__).resolve().parents[1]
MODEL_NAME = "chest-dx-demo"
TRAIN_SEED = 1001
CALIBRATION_SEED = 1002
MAX_LOCAL_ERROR = 0.006  # budget on the calibration split; the product target is ≤ 1 %
INT8_MIN_SPEEDUP = 1.5
INT8_MAX_AUROC_DROP = 0.005


@dataclass(frozen=True)
class Target:
    """What is built: architecture, input size, precision policy, destination and defaults."""

    name: str  # bundle folder under models/ and the manifest's name
    side: int  # square model input, rows = columns
    make_net: Callable[[], EdgeNet]
    quantize: bool  # try static INT8 behind the gate, or ship FP32 as trained
    train_count: int
    calibration_count: int
    epochs: int
    threads: int  # torch intra-op threads in ``main``
    channels_last: bool  # NHWC in training: ~1.3× faster for the wider net on one thread
    # bfloat16 autocast for the convolutions in training (weights, loss and the exported graph
    # stay FP32): ~2× faster on CPUs with AVX512-BF16, which buys the wider net its epochs.
    mixed_precision: bool
    work_dir: Path  # intermediate ONNX files
    role: str | None = None  # written to the manifest when set

    def spec(self) -> PreprocessSpec:
        return PreprocessSpec(rows=self.side, columns=self.side)


EDGE = Target(
    name=MODEL_NAME,
    side=128,
    make_net=EdgeNet,
    quantize=True,
    train_count=18000,
    calibration_count=4000,
    epochs=16,
    threads=2,
    channels_last=False,
    mixed_precision=False,
    work_dir=RUNS_DIR / "build",
)
CENTRAL = Target(
    name="central-dx-demo",
    side=192,
    make_net=CentralNet,
    quantize=False,
    train_count=12000,
    calibration_count=4000,
    epochs=14,
    threads=1,
    channels_last=True,
    mixed_precision=True,
    work_dir=RUNS_DIR / "build-central",
    role="central: classifies the cases edge devices escalate (their uncertain band)",
)
TARGETS = {"edge": EDGE, "central": CENTRAL}


@dataclass(frozen=True)
class Plan:
    train_count: int
    calibration_count: int
    epochs: int
    batch: int
    out_dir: Path
    version: str
    work_dir: Path = RUNS_DIR / "build"  # intermediate ONNX files
    cache: bool = True  # keep rendered splits in RUNS_DIR for the next run
    target: Target = field(default=EDGE)


def _tensors(split: Split, spec: PreprocessSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Model inputs made by the app's own ``to_tensor`` (equalisation + normalisation)."""
    x = np.concatenate([to_tensor(unit, spec) for unit in split.units])
    return torch.from_numpy(x), torch.from_numpy(split.labels.astype(np.int64))


def train_model(train: Split, spec: PreprocessSpec, plan: Plan) -> EdgeNet:
    """Image label + per-cell lesion masks; see ``net.py`` for why the cells are supervised."""
    torch.manual_seed(0)
    x, y = _tensors(train, spec)
    masks = torch.from_numpy(train.masks.astype(np.float32))[:, None]
    model = plan.target.make_net()
    layout = torch.channels_last if plan.target.channels_last else torch.contiguous_format
    _set_layout(model, layout)
    optimiser = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    steps = plan.epochs * ((len(x) + plan.batch - 1) // plan.batch)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimiser, max_lr=3e-3, total_steps=steps, pct_start=0.15
    )
    cell_weight = torch.tensor(5.0)  # lesion cells are rare: a few of 64 in a third of images
    generator = torch.Generator().manual_seed(0)
    for epoch in range(plan.epochs):
        model.train()
        started, total = time.perf_counter(), 0.0
        for idx in torch.randperm(len(x), generator=generator).split(plan.batch):
            images, cell_masks = _augment(x[idx], masks[idx], generator)
            images = images.contiguous(memory_format=layout)
            with torch.autocast("cpu", torch.bfloat16, enabled=plan.target.mixed_precision):
                cells = model.lesion_map(images).float()
            targets = functional.adaptive_max_pool2d(cell_masks, cells.shape[-2:])
            loss = functional.binary_cross_entropy_with_logits(
                cells, targets, pos_weight=cell_weight
            ) + functional.binary_cross_entropy_with_logits(
                model.image_score(cells), y[idx].float()
            )
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            schedule.step()
            total += float(loss.detach()) * len(idx)
        logger.info(
            "epoch %d/%d loss %.4f (%.0f s)",
            epoch + 1,
            plan.epochs,
            total / len(x),
            time.perf_counter() - started,
        )
    _set_layout(model, torch.contiguous_format)
    return model.eval()


def _set_layout(model: EdgeNet, layout: torch.memory_format) -> None:
    """Convolution weights in ``layout`` (what ``Module.to(memory_format=…)`` does)."""
    for param in model.parameters():
        if param.dim() == 4:
            param.data = param.data.contiguous(memory_format=layout)


def _augment(
    images: torch.Tensor, masks: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Small shifts, in whole mask pixels so image and mask stay aligned.

    The renderer already varies anatomy, positioning, dose and vendor processing.
    """
    scale = images.shape[-1] // masks.shape[-1]
    dy, dx = (int(v) for v in torch.randint(-1, 2, (2,), generator=generator))
    return (
        torch.roll(images, shifts=(dy * scale, dx * scale), dims=(2, 3)),
        torch.roll(masks, shifts=(dy, dx), dims=(2, 3)),
    )


def export_onnx(model: EdgeNet, spec: PreprocessSpec, path: Path) -> None:
    """Plain opset-17 graph via the TorchScript exporter (the graph ORT's static INT8
    quantizer was validated with); moving to the torch.export-based exporter is a follow-up."""
    example = torch.zeros(1, 1, spec.rows, spec.columns)
    with warnings.catch_warnings():
        # Scoped to this call: the legacy exporter announces its deprecation at several points.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model,
            (example,),
            str(path),
            input_names=["image"],
            output_names=["logits"],
            dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
            opset_version=17,
            dynamo=False,
        )


class _Calibration(CalibrationDataReader):
    def __init__(self, tensors: np.ndarray) -> None:
        self._items = iter(tensors[i : i + 1] for i in range(len(tensors)))

    def get_next(self) -> dict[str, np.ndarray] | None:
        item = next(self._items, None)
        return None if item is None else {"image": item}


def quantize(fp32: Path, int8: Path, calibration: np.ndarray) -> None:
    prepared = fp32.with_suffix(".prep.onnx")
    quant_pre_process(str(fp32), str(prepared))
    quantize_static(
        str(prepared),
        str(int8),
        _Calibration(calibration),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
    )
    prepared.unlink()


def batch_logits(sess: ort.InferenceSession, tensors: np.ndarray, batch: int = 64) -> np.ndarray:
    out = [
        sess.run(None, {"image": tensors[i : i + batch]})[0] for i in range(0, len(tensors), batch)
    ]
    return np.concatenate(out).astype(np.float64)


def alternating_latency(
    a: ort.InferenceSession, b: ort.InferenceSession, sample: np.ndarray, rounds: int = 400
) -> tuple[float, float]:
    """Median batch-1 latency of two sessions, measured alternately so both see the same noise."""
    times_a: list[float] = []
    times_b: list[float] = []
    for sess in (a, b):  # warm-up
        for _ in range(20):
            sess.run(None, {"image": sample})
    for _ in range(rounds):
        for sess, times in ((a, times_a), (b, times_b)):
            t = time.perf_counter()
            sess.run(None, {"image": sample})
            times.append(time.perf_counter() - t)
    return float(np.median(times_a) * 1e3), float(np.median(times_b) * 1e3)


def quantization_gate(
    fp32_path: Path, int8_path: Path, calib_x: np.ndarray, labels: np.ndarray
) -> tuple[dict[str, Any], np.ndarray]:
    """Quantize to static INT8 and decide, on the calibration split, which precision ships.

    Returns the gate's record and the calibration logits of the model that ships.
    """
    quantize(fp32_path, int8_path, calib_x[:256])
    fp32, int8 = make_session(fp32_path), make_session(int8_path)
    logits_fp32, logits_int8 = batch_logits(fp32, calib_x), batch_logits(int8, calib_x)
    auroc_fp32 = auroc(logits_fp32[:, 1] - logits_fp32[:, 0], labels)
    auroc_int8 = auroc(logits_int8[:, 1] - logits_int8[:, 0], labels)
    ms_fp32, ms_int8 = alternating_latency(fp32, int8, calib_x[:1])
    speedup = ms_fp32 / ms_int8
    int8_ships = speedup >= INT8_MIN_SPEEDUP and auroc_fp32 - auroc_int8 <= INT8_MAX_AUROC_DROP
    gate = {
        "fp32_ms": round(ms_fp32, 4),
        "int8_ms": round(ms_int8, 4),
        "speedup": round(speedup, 3),
        "auroc_fp32": round(auroc_fp32, 5),
        "auroc_int8": round(auroc_int8, 5),
        "auroc_drop": round(auroc_fp32 - auroc_int8, 5),
        "rule": f"INT8 ships only if speedup >= {INT8_MIN_SPEEDUP} "
        f"and AUROC drop <= {INT8_MAX_AUROC_DROP}",
        "shipped": "int8" if int8_ships else "fp32",
        "measured_on": f"calibration split, seed {CALIBRATION_SEED}, n={len(labels)}",
    }
    logger.info("quantization gate: %s", gate)
    return gate, logits_int8 if int8_ships else logits_fp32


def build(plan: Plan) -> dict[str, Any]:
    target = plan.target
    spec = target.spec()
    started = time.perf_counter()
    train = build_split(TRAIN_SEED, plan.train_count, spec, cache=plan.cache)
    calib = build_split(CALIBRATION_SEED, plan.calibration_count, spec, cache=plan.cache)
    data_seconds = time.perf_counter() - started
    logger.info("data ready in %.0f s", data_seconds)

    model = train_model(train, spec, plan)
    train_seconds = time.perf_counter() - started - data_seconds

    work = plan.work_dir
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    fp32_path, int8_path = work / "model.fp32.onnx", work / "model.int8.onnx"
    export_onnx(model, spec, fp32_path)
    calib_x = _tensors(calib, spec)[0].numpy()
    labels = calib.labels.astype(np.int64)
    if target.quantize:
        gate, shipped_logits = quantization_gate(fp32_path, int8_path, calib_x, labels)
    else:
        gate, shipped_logits = None, batch_logits(make_session(fp32_path), calib_x)
    int8_ships = gate is not None and gate["shipped"] == "int8"
    calibration = calibrate(shipped_logits, labels)
    profile = InputProfile.fit(train.units[:4000], components=min(24, len(train.units) // 4))

    out = plan.out_dir
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("*.onnx"):
        stale.unlink()
    shutil.copyfile(int8_path if int8_ships else fp32_path, out / "model.onnx")
    if int8_ships:
        # The FP32 original stays beside it so the INT8-vs-FP32 figures can be re-measured.
        shutil.copyfile(fp32_path, out / "model.fp32.onnx")
    profile.save(out / "input_profile.npz")
    with torch.no_grad():
        grid = list(model.lesion_map(torch.zeros(1, 1, spec.rows, spec.columns)).shape[-2:])
    central = (
        {
            "role": target.role,
            "architecture": {
                "class": type(model).__name__,
                "parameters": sum(p.numel() for p in model.parameters()),
                "lesion_grid": grid,
                "torch_threads": torch.get_num_threads(),
            },
        }
        if target.role
        else {}
    )
    manifest = {
        "format_version": FORMAT_VERSION,
        "name": target.name,
        "version": plan.version,
        "created": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "file": "model.onnx",
        "sha256": sha256_file(out / "model.onnx"),
        "precision": "int8" if int8_ships else "fp32",
        **central,
        "input": {"name": "image", "shape": [1, 1, spec.rows, spec.columns], "dtype": "float32"},
        "output": {"name": "logits", "kind": "logits, one per label"},
        "preprocessing": spec.to_json(),
        "labels": ["normal", "abnormal"],
        "positive_label": "abnormal",
        **calibration,
        "intended_use": {
            "modalities": ["DX", "CR"],
            "body_parts": ["CHEST"],
            "photometric": ["MONOCHROME1", "MONOCHROME2"],
            "allow_missing_body_part": True,
            # Trained on frontal views only: a lateral or oblique is escalated as out of scope.
            # CR images often lack View Position, so a missing one is allowed.
            "view_positions": ["PA", "AP"],
            "allow_missing_view_position": True,
            "description": "Frontal chest radiographs (PA/AP) from the project's synthetic "
            "phantom generator. Demonstrates the pipeline; NOT for clinical use.",
        },
        "input_profile": {
            "file": "input_profile.npz",
            "sha256": sha256_file(out / "input_profile.npz"),
            "method": "PCA reconstruction error of the 32x32 unit image, 24 components",
            "limit": round(profile.limit, 6),
            # Re-measured on held-out images by `python -m models.training.mirror_check`.
            "mirror_check": mirror_figures(
                profile,
                calib.units,
                f"calibration split, seed {CALIBRATION_SEED}, n={len(calib.units)}",
            ),
        },
        "quantization": gate,
        "reference_fp32": {
            "file": "model.fp32.onnx",
            "sha256": sha256_file(out / "model.fp32.onnx"),
        }
        if int8_ships
        else None,
        "training": {
            "data": f"synthetic phantoms, seed {TRAIN_SEED}, n={len(train.labels)}, "
            f"abnormal share {float(train.labels.mean()):.3f}",
            "epochs": plan.epochs,
            "batch": plan.batch,
            "data_seconds": round(data_seconds),
            "train_seconds": round(train_seconds),
            "total_seconds": round(time.perf_counter() - started),
            "torch": torch.__version__,
            "onnxruntime": ort.__version__,
        },
        "evaluation": None,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    write_model_card(out, manifest)
    logger.info("bundle written to %s in %.0f s", out, time.perf_counter() - started)
    return manifest


def calibrate(logits: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """Temperature and default thresholds from held-out logits: the manifest's two blocks."""
    temperature = fit_temperature(logits, labels)
    scores = softmax_with_temperature(logits, temperature)[:, 1]
    point = choose_thresholds(scores, labels, MAX_LOCAL_ERROR)
    logger.info("temperature %.3f, operating point %s", temperature, point)
    return {
        "calibration": {
            "method": "temperature",
            "temperature": temperature,
            "fitted_on": f"calibration split, seed {CALIBRATION_SEED}, n={len(labels)}",
        },
        "thresholds": {
            "normal_below": point.normal_below,
            "abnormal_at_or_above": point.abnormal_at_or_above,
            "chosen_on": f"calibration split, seed {CALIBRATION_SEED}: widest local region "
            f"with local error rate <= {MAX_LOCAL_ERROR}",
            "calibration_operating_point": point.to_json(),
        },
    }


def recalibrate(bundle: Path, calibration_count: int) -> dict[str, Any]:
    """Re-fit temperature and thresholds of an existing bundle without retraining it."""
    manifest: dict[str, Any] = json.loads((bundle / "manifest.json").read_text(encoding="utf-8"))
    spec = PreprocessSpec.from_json(manifest["preprocessing"])
    calib = build_split(CALIBRATION_SEED, calibration_count, spec)
    logits = batch_logits(make_session(bundle / manifest["file"]), _tensors(calib, spec)[0].numpy())
    manifest.update(calibrate(logits, calib.labels.astype(np.int64)))
    (bundle / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    write_model_card(bundle, manifest)
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--target",
        choices=sorted(TARGETS),
        default="edge",
        help="edge: the INT8 128×128 device model (default); central: the FP32 192×192 server "
        "model for escalated cases",
    )
    parser.add_argument("--quick", action="store_true", help="small smoke run into runs/quick")
    parser.add_argument("--train-count", type=int, help="default: 18000 edge, 12000 central")
    parser.add_argument("--calibration-count", type=int, help="default: 4000")
    parser.add_argument("--epochs", type=int, help="default: 16 edge, 14 central")
    parser.add_argument("--out", type=Path, help="default: models/<the target's bundle name>")
    parser.add_argument("--version", default="1.2.0")
    parser.add_argument(
        "--recalibrate",
        action="store_true",
        help="only re-fit temperature and thresholds of the bundle in --out",
    )
    args = parser.parse_args(argv)
    target = TARGETS[args.target]
    out: Path = MODELS_DIR / target.name if args.out is None else args.out
    calibration_count: int = (
        target.calibration_count if args.calibration_count is None else args.calibration_count
    )
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(target.threads)
    if args.recalibrate:
        recalibrate(out, calibration_count)
        return 0
    if args.quick:
        quick = RUNS_DIR / ("quick" if target is EDGE else f"quick-{args.target}")
        plan = Plan(
            600,
            300,
            1,
            64,
            quick,
            args.version + "-quick",
            work_dir=target.work_dir,
            target=target,
        )
    else:
        plan = Plan(
            target.train_count if args.train_count is None else args.train_count,
            calibration_count,
            target.epochs if args.epochs is None else args.epochs,
            32,
            out,
            args.version,
            work_dir=target.work_dir,
            target=target,
        )
    build(plan)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
