"""Saved model folders (`save_pretrained` output): their config.json read and checked before any work, and the
model loaded the one way the project loads models (AutoModel with trust_remote_code, offline)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from common.errors import UserError, first_line


def read_model_config(folder: Path, flag: str) -> dict[str, Any]:
    """config.json of a saved model folder, as a dict; one-line errors for missing or broken folders."""
    if not folder.is_dir():
        raise UserError(f"{flag} {folder}: folder not found")
    path = folder / "config.json"
    if not path.is_file():
        raise UserError(f"{flag} {path}: missing (expected a model folder written by save_pretrained)")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{flag} {path}: not valid JSON ({err})") from None
    if not isinstance(config, dict):
        raise UserError(f"{flag} {path}: expected a JSON object")
    return config


def check_model_config(config: dict, folder: Path, flag: str, kinds: Sequence[str], tasks: Sequence[str],
                       layout: str) -> None:
    """A saved model folder's config.json (read_model_config) names one of `kinds` (model_type), the state layout
    `layout` and, when it records them, every task of `tasks`."""
    model_type = config.get("model_type")
    if model_type not in kinds:
        raise UserError(f"{flag} {folder}/config.json: model_type {model_type!r}, expected one of {list(kinds)}")
    saved = config.get("state_layout")
    if saved != layout:
        raise UserError(f"{flag} {folder}/config.json: state_layout {saved!r} does not match this code's {layout!r}")
    trained = config.get("tasks") or []
    unknown = [t for t in tasks if trained and t not in trained]
    if unknown:
        raise UserError(f"{flag} {folder}/config.json: tasks {trained} do not include {unknown}; pass --tasks from that list")


def load_model(folder: Path, flag: str, device: str) -> Any:
    """AutoModel.from_pretrained(folder, trust_remote_code=True), offline, in eval mode on `device`.

    Weights that do not fit the folder's config are refused by the models' from_pretrained (modeling_shared.NormalizedModelMixin)."""
    from safetensors import SafetensorError
    from transformers import AutoModel

    try:
        model = AutoModel.from_pretrained(str(folder), trust_remote_code=True, local_files_only=True)
    except SafetensorError as err:
        raise UserError(f"{flag} {folder}: cannot read its weights, truncated or corrupt? ({first_line(err)})") from None
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise UserError(f"{flag} {folder}: cannot load the model ({type(err).__name__}: {first_line(err)})") from None
    return model.to(device).eval()
