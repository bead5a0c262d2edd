"""The phantom renderer: deterministic per (seed, index), labels and acquisitions as configured."""

from __future__ import annotations

import numpy as np
import pytest

from triage_app.synthetic import LABELS, Phantom, PhantomConfig, render_phantom

SMALL = PhantomConfig(size_range=(160, 256))
# Label, photometric, bit depth and findings are drawn independently of the image size, so the
# population statistics are checked on very small renders to keep the suite fast.
TINY = PhantomConfig(size_range=(48, 64))
SEED = 31


@pytest.fixture(scope="module")
def population() -> list[Phantom]:
    return [render_phantom(SEED, index, TINY) for index in range(300)]


def _same(a: Phantom, b: Phantom) -> bool:
    return (
        a.label == b.label
        and a.findings == b.findings
        and a.acquisition == b.acquisition
        and a.stored.shape == b.stored.shape
        and bool(np.array_equal(a.stored, b.stored))
    )


def test_rendering_is_deterministic() -> None:
    assert _same(render_phantom(SEED, 5, SMALL), render_phantom(SEED, 5, SMALL))


def test_rendering_does_not_depend_on_call_order() -> None:
    forwards = [render_phantom(SEED, i, SMALL) for i in (3, 4, 5)]
    backwards = [render_phantom(SEED, i, SMALL) for i in (5, 4, 3)][::-1]
    interleaved = render_phantom(SEED + 1, 0, SMALL)  # other work in between changes nothing
    assert interleaved.seed == SEED + 1
    assert all(_same(a, b) for a, b in zip(forwards, backwards, strict=True))
    assert _same(render_phantom(SEED, 4, SMALL), forwards[1])


def test_global_numpy_random_state_is_irrelevant() -> None:
    saved = np.random.get_state()
    try:
        np.random.seed(1)  # the renderer must ignore the legacy global state
        first = render_phantom(SEED, 7, SMALL)
        np.random.seed(2)
        assert _same(first, render_phantom(SEED, 7, SMALL))
    finally:
        np.random.set_state(saved)


def test_different_indices_and_seeds_differ() -> None:
    base = render_phantom(SEED, 0, SMALL)
    assert not _same(base, render_phantom(SEED, 1, SMALL))
    assert not _same(base, render_phantom(SEED + 1, 0, SMALL))


def test_identity_fields() -> None:
    phantom = render_phantom(SEED, 12, SMALL)
    assert (phantom.seed, phantom.index) == (SEED, 12)
    assert phantom.label in LABELS
    assert phantom.is_abnormal == (phantom.label == "abnormal")


def test_label_share_is_near_the_configured_fraction(population: list[Phantom]) -> None:
    share = np.mean([p.is_abnormal for p in population])
    # n = 300, p = 0.35: one standard deviation is 0.028; the bound is over 3.5 of them.
    assert abs(share - TINY.abnormal_fraction) < 0.1


@pytest.mark.parametrize("fraction", [0.0, 0.8, 1.0])
def test_abnormal_fraction_is_honoured(fraction: float) -> None:
    config = PhantomConfig(size_range=(48, 64), abnormal_fraction=fraction)
    share = np.mean([render_phantom(SEED, i, config).is_abnormal for i in range(150)])
    assert abs(share - fraction) < 0.12


def test_abnormal_phantoms_have_lesions_and_normal_ones_none(population: list[Phantom]) -> None:
    lesions = {"nodule", "opacity"}
    lookalikes = {"nipple_shadow", "vessel_end_on"}
    for phantom in population:
        kinds = {f.kind for f in phantom.findings}
        assert kinds <= lesions | lookalikes
        if phantom.is_abnormal:
            assert kinds & lesions, phantom.index
        else:
            assert not kinds & lesions, phantom.index
    # Look-alikes do occur in normal images (that is what makes some of them hard).
    assert any(f.kind in lookalikes for p in population if not p.is_abnormal for f in p.findings)


def test_lesion_sizes_and_contrasts_are_within_the_configured_ranges(
    population: list[Phantom],
) -> None:
    for phantom in population:
        for finding in phantom.findings:
            if finding.kind == "nodule":
                size, contrast = TINY.nodule_radius_mm, TINY.nodule_contrast
            elif finding.kind == "opacity":
                size, contrast = TINY.opacity_radius_mm, TINY.opacity_contrast
            else:
                continue
            assert size[0] <= finding.size_mm <= size[1]
            assert contrast[0] <= finding.contrast <= contrast[1]


def test_stored_values_fit_the_bit_depth(population: list[Phantom]) -> None:
    depths = set()
    for phantom in population:
        bits = phantom.acquisition.bits_stored
        depths.add(bits)
        assert phantom.stored.dtype == np.uint16
        assert phantom.stored.ndim == 2
        assert int(phantom.stored.max()) <= 2**bits - 1
        assert int(phantom.stored.max()) > int(phantom.stored.min())  # not a flat image
    assert depths == {12, 14, 16}


def test_image_size_follows_the_configured_range() -> None:
    for index in range(20):
        phantom = render_phantom(SEED, index, SMALL)
        rows, columns = phantom.stored.shape
        assert SMALL.size_range[0] <= columns <= SMALL.size_range[1]
        assert 0.94 * columns <= rows <= 1.26 * columns  # portrait or square detectors


def test_monochrome1_share_is_near_the_configured_fraction(population: list[Phantom]) -> None:
    photometrics = [p.acquisition.photometric for p in population]
    assert set(photometrics) == {"MONOCHROME1", "MONOCHROME2"}
    share = photometrics.count("MONOCHROME1") / len(photometrics)
    assert abs(share - TINY.monochrome1_fraction) < 0.1


@pytest.mark.parametrize(("fraction", "expected"), [(0.0, "MONOCHROME2"), (1.0, "MONOCHROME1")])
def test_monochrome1_fraction_is_honoured(fraction: float, expected: str) -> None:
    config = PhantomConfig(size_range=(48, 64), monochrome1_fraction=fraction)
    assert {render_phantom(SEED, i, config).acquisition.photometric for i in range(30)} == {
        expected
    }


def test_monochrome1_stores_dense_structures_dark() -> None:
    # The spine column (dense) is bright in MONOCHROME2 and dark in MONOCHROME1 stored values.
    seen = set()
    for index in range(40):
        phantom = render_phantom(SEED, index, SMALL)
        values = phantom.stored.astype(np.float64)
        rows, columns = values.shape
        middle = values[rows // 3 : rows // 2, columns // 2 - 3 : columns // 2 + 3].mean()
        lung = values[rows // 3 : rows // 2, columns // 5 : columns // 3].mean()
        photometric = phantom.acquisition.photometric
        seen.add(photometric)
        if photometric == "MONOCHROME2":
            assert middle > lung, index
        else:
            assert middle < lung, index
    assert seen == {"MONOCHROME1", "MONOCHROME2"}


def test_acquisition_fields_are_plausible(population: list[Phantom]) -> None:
    for phantom in population:
        acq = phantom.acquisition
        assert acq.modality in {"DX", "CR"}
        assert acq.view_position in {"PA", "AP"}
        assert acq.rescale_slope > 0
        assert acq.window_width >= 1
        assert acq.pixel_spacing_mm > 0
    assert {p.acquisition.modality for p in population} == {"DX", "CR"}


def test_label_record_has_the_ground_truth() -> None:
    phantom = render_phantom(SEED, 9, SMALL)
    record = phantom.label_record()
    assert record["label"] == phantom.label
    assert (record["seed"], record["index"]) == (SEED, 9)
    assert (record["rows"], record["columns"]) == phantom.stored.shape
    assert record["findings"] == [f.to_json() for f in phantom.findings]
    assert record["photometric"] == phantom.acquisition.photometric
