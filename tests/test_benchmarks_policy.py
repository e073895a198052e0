"""benchmarks/policy.py end to end on a tiny synthetic dataset with tiny trained policies, plus its loss and report."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from test_train import TASKS, tiny_config, tiny_llama, write_dataset  # noqa: F401 (tiny_llama is a fixture)

import train_accelerate as ta
from data_prep.tasks import instructions_for, instructions_json
from evaluation.report import replace_markdown_section
from modeling_vla import MLPPolicy

torch.set_num_threads(1)  # the machine's 2 cores are shared

REPO = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("benchmarks_policy", REPO / "benchmarks" / "policy.py")
bp = sys.modules.setdefault(_spec.name, importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(bp)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """test_train's synthetic repo, with held-out paraphrases on the validation rows (as vla-preprocess writes)."""
    root = write_dataset(tmp_path_factory.mktemp("ds") / "repo")
    (root / "instructions.json").write_text(instructions_json())
    path = next((root / "data").glob("validation-*.parquet"))
    table = pq.read_table(path)
    episodes, tasks = table["episode"].to_pylist(), table["task"].to_pylist()
    paraphrases = [instructions_for(t, "validation")[e % 2] for t, e in zip(tasks, episodes, strict=True)]
    index = table.schema.get_field_index("instruction")
    pq.write_table(table.set_column(index, "instruction", pa.array(paraphrases, pa.string())), path)
    return root


@pytest.fixture(scope="module")
def policies(dataset: Path, tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:  # noqa: F811
    """A tiny MLP and a tiny-Llama VLA, trained a few steps by the real trainer (train_summary.json included)."""
    runs = tmp_path_factory.mktemp("runs")
    folders = {}
    for key, kind in (("mlp", "mlp"), ("vla", "policy")):
        cfg = tiny_config(dataset, runs / key, model=kind, max_steps=6, eval_every=3, save_every=100, lr=1e-2)
        if kind == "policy":
            cfg.model_config["backbone"] = str(tiny_llama)
        ta.train(cfg)
        folders[key] = runs / key / "best"
    return folders


class RecordedActionsPolicy(MLPPolicy):
    """Looks the state up in the validation table and answers the recorded future expert labels of its episode.

    Steps past the episode's end get absurd values: a zero loss then also proves those steps are masked.
    """

    def attach(self, table: ta.EpisodeTable, offset: int = 0) -> RecordedActionsPolicy:
        self.table, self.offset = table, offset
        return self

    def predict_normalized(self, state: torch.Tensor, instruction: list[str]) -> torch.Tensor:
        raw = self.denormalize_state(state, torch.ones_like(state)).numpy()
        rows = np.argmin(((raw[:, None, :] - self.table.state[None]) ** 2).sum(-1), axis=1)
        chunk = self.config.chunk_size
        actions = np.full((len(rows), chunk, self.config.action_dim), 50.0, np.float32)
        for i, row in enumerate(rows):
            steps = self.table.expert_action[row + self.offset : self.table.episode_end[row]][:chunk]
            actions[i, : len(steps)] = steps
        return self.normalize_action(torch.as_tensor(actions))


def fake_policy(folder: Path, table: ta.EpisodeTable, offset: int = 0) -> RecordedActionsPolicy:
    from configuration_vla import MLPPolicyConfig

    return RecordedActionsPolicy(MLPPolicyConfig.from_pretrained(folder)).attach(table, offset).eval()


def test_recorded_actions_score_zero_and_shifted_ones_do_not(dataset: Path, policies: dict[str, Path]) -> None:
    data = ta.load_training_data(dataset)
    stats = data.normalization.action
    exact = fake_policy(policies["mlp"], data.validation)
    losses = bp.action_losses(exact, data.validation, 6, stats.mean, stats.std, batch_size=16)
    assert set(losses) == {"can", "lift", "overall"}
    assert losses["overall"]["windows"] == len(data.validation)
    assert sum(losses[t]["windows"] for t in ("can", "lift")) == len(data.validation)
    for values in losses.values():
        assert values["l1"] < 1e-5 and values["mse"] < 1e-9, losses
    shifted = fake_policy(policies["mlp"], data.validation, offset=1)  # the next step's actions: wrong
    assert bp.action_losses(shifted, data.validation, 6, stats.mean, stats.std, batch_size=16)["overall"]["l1"] > 0.05


def test_benchmark_end_to_end(dataset: Path, policies: dict[str, Path], tmp_path: Path) -> None:
    results_md = tmp_path / "RESULTS.md"
    results_md.write_text("# Results\n\n## Expert demonstrations\n\nkeep me\n\n## Policies\n\nold numbers\n\n"
                          "## Evaluation\n\nkeep me too\n")
    out = tmp_path / "bench"
    argv = ["--dataset", str(dataset), "--vla", str(policies["vla"]), "--mlp", str(policies["mlp"]), "--out", str(out),
            "--results-md", str(results_md), "--threads", "1", "--latency-calls", "5", "--warmup", "1",
            "--batch-size", "32"]
    results = bp.main(argv)

    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(results))
    assert (out / "val_loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert results["dataset"]["validation_instructions_seen_in_training"] == 0
    assert results["dataset"]["validation_episodes"] == 4
    for key, policy in results["policies"].items():
        for variant in ("paraphrase", "canonical"):
            for group in ("can", "lift", "overall"):
                values = policy["val_loss"][variant][group]
                assert math.isfinite(values["l1"]) and math.isfinite(values["mse"]) and values["l1"] > 0, (key, values)
        (latency,) = policy["latency"]
        assert latency["threads"] == 1 and latency["calls"] == 5 and 0 < latency["median_ms"] <= latency["p90_ms"]
        summary = json.loads((policies[key].parent / "train_summary.json").read_text())
        assert policy["training"]["train_samples_per_s"] == summary["train_samples_per_s"] > 0
        assert 0 < policy["params_trainable"] <= policy["params_total"] == summary["params_total"]
        # the recorded command reproduces the run: the YAML plus --set for every setting the test changed
        assert f"--output-dir {policies[key].parent}" in policy["training_command"]
        assert "max_steps=6" in policy["training_command"] and "lr=0.01" in policy["training_command"]
    assert results["policies"]["vla"]["params_trainable"] < results["policies"]["vla"]["params_total"]  # LoRA
    # the MLP reads the instruction embedding: another wording changes its predictions, hence its loss
    mlp = results["policies"]["mlp"]["val_loss"]
    assert mlp["paraphrase"]["overall"]["l1"] != mlp["canonical"]["overall"]["l1"]
    assert set(results["latency_goal_met"]) == {"1"}

    text = results_md.read_text()
    assert "keep me\n" in text and "## Evaluation\n\nkeep me too\n" in text and "old numbers" not in text
    assert text.count("## Policies") == 1 and text.index("## Expert") < text.index("## Policies") < text.index("## Eval")
    section = (out / "policy.md").read_text()
    assert section in text and "vla-train --model policy --config configs/vla_minilm_cpu.yaml" in section
    assert "vla-train --model mlp --config configs/mlp_bc.yaml" in section
    assert "python benchmarks/policy.py --dataset" in section and "Latency goal" in section


def test_section_is_appended_when_missing(tmp_path: Path) -> None:
    path = tmp_path / "RESULTS.md"
    path.write_text("# Results\n\n## Evaluation\n\nother\n")
    replace_markdown_section(path, "## Policies", "## Policies\n\nnew\n\n")
    replace_markdown_section(path, "## Policies", "## Policies\n\nnewer\n\n")
    assert path.read_text() == "# Results\n\n## Evaluation\n\nother\n\n## Policies\n\nnewer\n\n"


def test_bad_policy_folder_is_a_one_line_error(dataset: Path, tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        bp.main(["--dataset", str(dataset), "--vla", str(tmp_path / "missing"), "--out", str(tmp_path / "o")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--vla" in err and "missing" in err, err
    assert not (tmp_path / "o").exists()
