"""Model/dataset cards from results files, and `vla-export` into a Hub repo folder + the local HF cache.

The exported repos are loaded in a fresh Python process with HF_HUB_OFFLINE=1 and HF_HOME in tmp,
exactly as a user would: by repo id, through `trust_remote_code` and `datasets.load_dataset`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml
from conftest import python_without_the_project
from transformers.dynamic_module_utils import get_relative_imports

from common.errors import UserError
from data_prep.tasks import STATE_DIM
from evaluation.metrics import SuccessSummary
from hub_cards.cards import Results, format_value, model_card
from hub_cards.export import code_files, export_dataset, export_model
from hub_cards.hub_cache import place_in_hub_cache
from model_kinds import get_kind

torch.set_num_threads(1)

TINY_BERT = {"model_type": "bert", "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
             "intermediate_size": 16, "vocab_size": 30522, "max_position_embeddings": 64}


def save_tiny_model(kind: str, folder: Path) -> Path:
    """A randomly initialised tiny model of `kind`, saved with save_pretrained (as the trainer's best/)."""
    from configuration_vla import MLPPolicyConfig, VLAConfig, WorldModelConfig
    from modeling_vla import MLPPolicy, VLAPolicy, WorldModel

    torch.manual_seed(0)
    if kind == "world":
        model = WorldModel(WorldModelConfig(hidden_dim=8, token_mlp_dim=8, channel_mlp_dim=8, num_layers=1,
                                            num_ensemble=2, multi_step=2, tasks=["lift"]))
    elif kind == "policy":
        model = VLAPolicy(VLAConfig(backbone_config=TINY_BERT, lora_r=2, chunk_size=2, state_hidden_dim=8,
                                    head_hidden_dim=8, tasks=["lift"]))
    else:
        model = MLPPolicy(MLPPolicyConfig(hidden_dim=8, num_layers=1, chunk_size=2, tasks=["lift"]))
    model.save_pretrained(folder)
    return folder


def write_json(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


TRAIN_SUMMARY = {
    "model": "policy", "model_class": "VLAPolicy", "steps": 137, "epochs": 2.75, "best_val_loss": 0.0731942,
    "final_val": {"loss": 0.0812345, "action_l1": 0.0456789}, "train_samples_per_s": 311.25, "params_total": 98765,
    "params_trainable": 4321, "wall_time_s": 42.5, "horizon": 2, "tasks": ["lift"], "train_windows": 640,
    "validation_windows": 80, "processes": 1,
    "config": {"lr": 0.000321, "batch_size": 48, "max_steps": 137, "seed": 7, "model_config": {"lora_r": 2}},
}
# Shaped like vla-rollout's summary.json (evaluation/report.py): rows are SuccessSummary dicts.
EVAL_SUMMARY = {
    "settings": {"env": "both", "episodes": 9, "tasks": ["lift"]},
    "results": [
        SuccessSummary("vla", "lift", "dream", episodes=9, successes=4, errors=0, success_rate=4 / 9, ci_low=0.1887,
                       ci_high=0.7333, mean_return=3.1, mean_length=88.0).as_dict(),
        SuccessSummary("vla", "lift", "real", episodes=8, successes=3, errors=1, success_rate=0.375, ci_low=0.1368,
                       ci_high=0.6943, mean_return=3.0, mean_length=91.0).as_dict(),
    ],
    "agreement": [{"policy": "vla", "task": "lift", "pairs": 8, "agreement_rate": 0.625, "dream_success_rate": 0.5,
                   "real_success_rate": 0.375}],
}


def test_policy_card_shows_the_numbers_of_its_results_files(tmp_path: Path) -> None:
    config = json.loads((save_tiny_model("mlp", tmp_path / "mlp") / "config.json").read_text())
    results = Results.from_files([write_json(tmp_path / "train_summary.json", TRAIN_SUMMARY),
                                  write_json(tmp_path / "summary.json", EVAL_SUMMARY)])
    card = model_card(config, "org/mlp", results, dataset_id="org/data")
    text = card.content
    for value in (137, 2.75, 0.0731942, 0.0812345, 0.0456789, 98765, 4321, 0.000321, 48, 4 / 9, 0.375, 0.1887, 0.6943):
        assert f"| {format_value(value)} |" in text or f"[{format_value(value)}," in text or f", {format_value(value)}]" in text, value
    assert "not evaluated yet" not in text.lower()
    assert 'AutoModel.from_pretrained("org/mlp", trust_remote_code=True)' in text

    meta = yaml.safe_load(text.split("---")[1])
    assert meta["library_name"] == "transformers"
    assert {"robotics", "vla", "robosuite"} <= set(meta["tags"])
    assert meta["datasets"] == ["org/data"]
    metrics = {(r["dataset"]["config"], m["type"]): m["value"] for r in meta["model-index"][0]["results"] for m in r["metrics"]}
    assert metrics == {("lift", "dream_success_rate"): pytest.approx(4 / 9), ("lift", "real_success_rate"): 0.375}
    assert "| vla | lift | 8 | 0.625 |" in text  # dream-vs-real agreement


def test_world_model_card_reports_dream_real_agreement(tmp_path: Path) -> None:
    config = json.loads((save_tiny_model("world", tmp_path / "world") / "config.json").read_text())
    results = Results.from_files([write_json(tmp_path / "summary.json", EVAL_SUMMARY)])
    text = model_card(config, "org/world", results, dataset_id="org/data").content
    meta = yaml.safe_load(text.split("---")[1])
    metrics = [m for r in meta["model-index"][0]["results"] for m in r["metrics"]]
    assert [(m["type"], m["value"]) for m in metrics] == [("dream_real_agreement", 0.625)]
    assert "| vla | lift | 8 | 0.625 | 0.5 | 0.375 |" in text
    assert "Training results: not evaluated yet" in text


def test_pooled_world_model_card_shows_each_training_run(tmp_path: Path) -> None:
    config = json.loads((save_tiny_model("world", tmp_path / "world") / "config.json").read_text())
    second = {**TRAIN_SUMMARY, "best_val_loss": 0.0654321, "config": {**TRAIN_SUMMARY["config"], "seed": 8}}
    results = Results.from_files([write_json(tmp_path / "train_world_s0" / "train_summary.json", TRAIN_SUMMARY),
                                  write_json(tmp_path / "train_world_s1" / "train_summary.json", second)])
    text = model_card(config, "org/world", results).content
    assert "pools the ensembles of 2 training runs" in text
    assert "| metric | `train_world_s0` | `train_world_s1` |" in text
    assert "| best_val_loss | 0.07319 | 0.06543 |" in text and "| seed | 7 | 8 |" in text
    assert "`train_world_s0/train_summary.json`, `train_world_s1/train_summary.json`" in text
    policy = json.loads((save_tiny_model("mlp", tmp_path / "mlp") / "config.json").read_text())
    with pytest.raises(UserError, match="several training summaries"):
        model_card(policy, "org/mlp", results)


def test_card_without_results_says_not_evaluated_and_invents_nothing(tmp_path: Path) -> None:
    config = json.loads((save_tiny_model("world", tmp_path / "world") / "config.json").read_text())
    text = model_card(config, "org/world", Results()).content
    assert text.lower().count("not evaluated yet") == 2
    meta = yaml.safe_load(text.split("---")[1])
    assert "model-index" not in meta and "metrics" not in meta
    assert "world-model" in meta["tags"]
    assert "| success rate |" not in text and "agreement" not in text


def test_vla_card_is_tagged_lora_with_its_backbone(tmp_path: Path) -> None:
    config = json.loads((save_tiny_model("policy", tmp_path / "vla") / "config.json").read_text())
    meta = yaml.safe_load(model_card(config, "org/vla", Results()).content.split("---")[1])
    assert "lora" in meta["tags"]
    assert meta["base_model"] == config["backbone"]


def test_unknown_results_file_is_refused_with_its_name(tmp_path: Path) -> None:
    path = write_json(tmp_path / "other.json", {"accuracy": 1.0})
    with pytest.raises(UserError, match="other.json"):
        Results.from_files([path])
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(UserError, match="broken.json.*not valid JSON"):
        Results.from_files([tmp_path / "broken.json"])


# ---------------------------------------------------------------------------------------------- export

LOAD_MODEL = """
import sys, torch
from safetensors.torch import load_file
from transformers import AutoModel
torch.set_num_threads(1)
repo_id, original = sys.argv[1], sys.argv[2]
model = AutoModel.from_pretrained(repo_id, trust_remote_code=True).eval()
assert type(model).__module__.startswith("transformers_modules."), type(model).__module__  # the repo's own code
saved = load_file(original + "/model.safetensors")
state = model.state_dict()
assert all(torch.equal(state[k], v) for k, v in saved.items()), "weights differ"
with torch.no_grad():
    x = torch.zeros(2, 83)
    if hasattr(model, "predict_actions"):
        out = model.predict_actions(x, ["Lift the red cube"] * 2)
    else:
        out = model.step(x, torch.zeros(2, 7), ["Lift the red cube"] * 2)[0]
print("LOADED", type(model).__name__, tuple(out.shape))
"""


def offline_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_HUB_CACHE=str(tmp_path / "hf" / "hub"), HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", HF_DATASETS_CACHE=str(tmp_path / "hf" / "datasets"), OMP_NUM_THREADS="1")
    return env


def run_fresh_python(code: str, *args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    """`code` in a fresh interpreter where the project is not importable (conftest.python_without_the_project)."""
    return subprocess.run([*python_without_the_project(code), *args], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize(("kind", "class_name", "shape"),
                         [("world", "WorldModel", (2, 83)), ("policy", "VLAPolicy", (2, 2, 7)), ("mlp", "MLPPolicy", (2, 2, 7))])
def test_exported_model_loads_by_repo_id_offline_in_a_fresh_process(
    tmp_path: Path, kind: str, class_name: str, shape: tuple[int, ...]
) -> None:
    best = save_tiny_model(kind, tmp_path / "run" / "best")
    write_json(tmp_path / "run" / "train_summary.json", TRAIN_SUMMARY)
    out = tmp_path / "export" / kind
    result = export_model(best, f"org/tiny-{kind}", out, results_files=None, cache_dir=tmp_path / "hf" / "hub")

    files = {p.name for p in out.iterdir()}
    auto_map = json.loads((out / "config.json").read_text())["auto_map"]
    model_class = get_kind(kind).model_class
    assert auto_map["AutoModel"] == f"{model_class.__module__}.{class_name}"  # the module that defines the class
    code = code_files(auto_map, out)  # derived: auto_map's modules and the siblings they import relatively
    assert {"configuration_vla.py", f"{model_class.__module__}.py"} <= set(code)
    assert {"config.json", *code, "model.safetensors", "README.md"} <= files
    assert {p.name for p in out.glob("*.py")} == set(code)
    assert "0.07319" in (out / "README.md").read_text()  # the train_summary.json next to best/ was found
    assert result.snapshot is not None and result.snapshot.parent.parent.name == f"models--org--tiny-{kind}"
    assert not list(out.parent.glob("*tmp*"))  # no staging folder left behind

    loaded = run_fresh_python(LOAD_MODEL, f"org/tiny-{kind}", str(best), env=offline_env(tmp_path), cwd=tmp_path)
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    assert f"LOADED {class_name} {shape}" in loaded.stdout

    # a copy missing a sibling module that the model's module imports does not load: the code comes from the folder
    sibling = sorted(get_relative_imports(out / f"{model_class.__module__}.py"))[-1] + ".py"
    shutil.copytree(out, tmp_path / "broken")
    (tmp_path / "broken" / sibling).unlink()
    place_in_hub_cache(tmp_path / "broken", f"org/broken-{kind}", "model", tmp_path / "hf" / "hub")
    broken = run_fresh_python(LOAD_MODEL, f"org/broken-{kind}", str(best), env=offline_env(tmp_path), cwd=tmp_path)
    assert broken.returncode != 0 and "LOADED" not in broken.stdout, broken.stdout


def test_cache_layout_matches_huggingface_hub(tmp_path: Path) -> None:
    from huggingface_hub import hf_hub_download

    repo = tmp_path / "repo"
    (repo / "sub").mkdir(parents=True)
    (repo / "config.json").write_text('{"a": 1}\n')
    (repo / "sub" / "weights.safetensors").write_bytes(b"\0" * 100)
    cache = tmp_path / "cache"
    snapshot = place_in_hub_cache(repo, "org/name", cache_dir=cache)
    storage = cache / "models--org--name"
    assert (storage / "refs" / "main").read_text() == snapshot.name
    assert len(snapshot.name) == 40
    pointer = snapshot / "config.json"
    assert pointer.is_symlink() and not os.path.isabs(os.readlink(pointer))
    blob_names = {p.name for p in (storage / "blobs").iterdir()}
    assert hashlib.sha256(b"\0" * 100).hexdigest() in blob_names  # LFS files: sha256
    if shutil.which("git"):
        git_sha = subprocess.run(["git", "hash-object", str(repo / "config.json")], capture_output=True, text=True,
                                 check=True).stdout.strip()
        assert git_sha in blob_names  # small text files: git blob sha1

    found = hf_hub_download("org/name", "sub/weights.safetensors", cache_dir=cache, local_files_only=True)
    assert Path(found).read_bytes() == b"\0" * 100

    assert place_in_hub_cache(repo, "org/name", cache_dir=cache) == snapshot  # same content, same revision
    (repo / "config.json").write_text('{"a": 2}\n')
    newer = place_in_hub_cache(repo, "org/name", cache_dir=cache)
    assert newer != snapshot and (storage / "refs" / "main").read_text() == newer.name
    assert json.loads(Path(hf_hub_download("org/name", "config.json", cache_dir=cache, local_files_only=True)).read_text()) == {"a": 2}


def test_export_refuses_a_folder_without_weights_and_writes_nothing(tmp_path: Path) -> None:
    best = save_tiny_model("mlp", tmp_path / "best")
    (best / "model.safetensors").unlink()
    out = tmp_path / "export"
    with pytest.raises(UserError, match="model.safetensors"):
        export_model(best, "org/x", out, results_files=[], cache_dir=tmp_path / "hub")
    assert not out.exists() and not list(tmp_path.glob("export.tmp*"))
    with pytest.raises(UserError, match="repo-id"):
        export_model(save_tiny_model("mlp", tmp_path / "ok"), "no-namespace", out, results_files=[])


def test_export_replaces_only_its_own_folder(tmp_path: Path) -> None:
    """Issue 40, case 1: vla-export --out replaced any existing folder, its unrelated files deleted."""
    best = save_tiny_model("mlp", tmp_path / "best")
    out = tmp_path / "export"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    for overwrite, message in ((False, "pass --overwrite"), (True, "not written by vla-export")):
        with pytest.raises(UserError, match=message):
            export_model(best, "org/x", out, results_files=[], cache_dir=tmp_path / "hub", overwrite=overwrite)
        assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    (out / "keep.txt").unlink()
    export_model(best, "org/x", out, results_files=[], cache_dir=tmp_path / "hub")
    export_model(best, "org/x", out, results_files=[], cache_dir=tmp_path / "hub", overwrite=True)  # its own: replaced
    assert (out / "model.safetensors").is_file() and not list(tmp_path.glob("export.tmp*"))


LOAD_DATASET = """
import sys
from datasets import load_dataset
ds = load_dataset(sys.argv[1])
print("ROWS", ds["train"].num_rows, ds["validation"].num_rows, ds["train"].features["state"].length)
"""


@pytest.fixture(autouse=True)
def private_datasets_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """datasets keys a local folder's Arrow cache by folder name, not path: keep ours out of the shared cache."""
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets_cache")


def test_exported_dataset_loads_by_repo_id_offline(tmp_path: Path, make_robomimic_file: Callable[..., Path]) -> None:
    from data_prep.preprocess import preprocess

    prep = preprocess([make_robomimic_file("lift", episodes=5)], tmp_path / "dataset")
    hf = tmp_path / "hf"
    result = export_dataset(tmp_path / "dataset", "org/tiny-data", tmp_path / "export", cache_dir=hf / "hub",
                            datasets_cache_dir=hf / "datasets")
    card = (result.folder / "README.md").read_text()
    assert 'load_dataset("org/tiny-data")' in card and "configs:" in card
    loaded = run_fresh_python(LOAD_DATASET, "org/tiny-data", env=offline_env(tmp_path), cwd=tmp_path)
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    stdout = loaded.stdout
    assert f"ROWS {prep.rows['train']} {prep.rows['validation']} {STATE_DIM}" in stdout


def test_push_without_network_fails_before_writing_anything(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    best = save_tiny_model("mlp", tmp_path / "best")
    with pytest.raises(UserError, match="HF_HUB_OFFLINE"):
        export_model(best, "org/x", tmp_path / "export", results_files=[], do_push=True, cache_dir=tmp_path / "hub")
    assert not (tmp_path / "export").exists() and not (tmp_path / "hub").exists()
