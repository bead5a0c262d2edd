"""The model card states the scope checks as the manifest sets them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from models.training.model_card import write_model_card

BUNDLES = Path(__file__).resolve().parents[2] / "models"


def _intended_use_line(bundle: Path) -> str:
    lines = (bundle / "MODEL_CARD.md").read_text(encoding="utf-8").splitlines()
    (line,) = [line for line in lines if line.startswith("- Intended use:")]
    return line


@pytest.mark.parametrize("allowed", [True, False])
def test_the_card_says_whether_a_missing_body_part_or_view_is_allowed(
    tmp_path: Path, allowed: bool
) -> None:
    manifest = json.loads((BUNDLES / "chest-dx-demo" / "manifest.json").read_text())
    manifest["intended_use"]["allow_missing_body_part"] = allowed
    manifest["intended_use"]["allow_missing_view_position"] = not allowed
    write_model_card(tmp_path, manifest)
    line = _intended_use_line(tmp_path)
    body, view = ("allowed", "escalated") if allowed else ("escalated", "allowed")
    assert "body part CHEST (Body Part Examined and the Anatomic Region Sequence" in line
    assert f"which must agree; missing: {body})" in line
    assert f"view position PA, AP (missing: {view})" in line


@pytest.mark.parametrize("name", ["chest-dx-demo", "central-dx-demo"])
def test_the_shipped_cards_are_what_their_manifests_make(tmp_path: Path, name: str) -> None:
    bundle = BUNDLES / name
    write_model_card(tmp_path, json.loads((bundle / "manifest.json").read_text()))
    assert (tmp_path / "MODEL_CARD.md").read_text(encoding="utf-8") == (
        bundle / "MODEL_CARD.md"
    ).read_text(encoding="utf-8")
