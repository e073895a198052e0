"""Model and dataset cards written from the files a run actually produced.

A card only formats numbers read from results files (the saved `config.json`, the trainer's
`train_summary.json`, `vla-rollout`'s `summary.json`); a result that is missing makes the card say
"not evaluated yet" instead of inventing one. The cards are `huggingface_hub` `ModelCard` /
`DatasetCard` objects: YAML metadata (library, tags, datasets, `model-index` with the measured success
rates) on top of the markdown body rendered from `templates/model_card.md`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from huggingface_hub import DatasetCard, EvalResult, ModelCard, ModelCardData

from common.errors import UserError
from model_kinds import ModelKind, kind_of_type

TEMPLATE = Path(__file__).with_name("templates") / "model_card.md"
COMMON_TAGS = ["robotics", "vla", "robosuite", "robomimic", "dreaming-vla"]
# Keys of train_summary.json shown as training metrics / configuration (everything else is bookkeeping).
TRAIN_METRIC_KEYS = ("steps", "epochs", "best_val_loss", "final_val", "train_samples_per_s", "wall_time_s",
                     "params_total", "params_trainable", "train_windows", "validation_windows", "processes", "horizon")
TRAIN_CONFIG_KEYS = ("dataset", "batch_size", "grad_accum_steps", "lr", "weight_decay", "warmup_steps", "max_steps",
                     "max_grad_norm", "mixed_precision", "seed", "early_stopping_patience")
SUCCESS_COLUMNS = ("policy", "task", "env", "episodes", "successes", "success_rate", "ci_low", "ci_high", "errors")


# ---------------------------------------------------------------------------------------------- reading


def read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: {what} not found") from None
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: {what} is not valid JSON ({err.msg}, line {err.lineno})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object as {what}, got {type(data).__name__}")
    return data


def is_train_summary(data: Mapping[str, Any]) -> bool:
    return "best_val_loss" in data and "steps" in data


def iter_dicts(node: Any) -> Iterator[Mapping[str, Any]]:
    """Every JSON object inside `node`, depth first (the evaluation summary nests its rows)."""
    if isinstance(node, Mapping):
        yield node
        for value in node.values():
            yield from iter_dicts(value)
    elif isinstance(node, list):
        for item in node:
            yield from iter_dicts(item)


def success_rows(summary: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The (policy, task, env) success-rate rows of a `vla-rollout` summary.json."""
    return [d for d in iter_dicts(summary) if {"task", "env", "success_rate"} <= d.keys()]


def agreement_rows(summary: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    return [d for d in iter_dicts(summary) if {"task", "agreement_rate", "pairs"} <= d.keys()]


@dataclass
class Results:
    """The results files a card is written from; any of them may be missing."""

    # One training run, or several for a world model pooled from runs with different seeds (vla-pool-world-models).
    train_summaries: list[tuple[Path, dict[str, Any]]] = field(default_factory=list)
    eval_summaries: list[tuple[Path, dict[str, Any]]] = field(default_factory=list)

    @classmethod
    def from_files(cls, paths: Sequence[Path]) -> Results:
        """Sort the given JSON files into a training summary and evaluation summaries by their content."""
        results = cls()
        for path in paths:
            data = read_json(path, "results file")
            if is_train_summary(data):
                results.train_summaries.append((Path(path), data))
            elif success_rows(data):
                results.eval_summaries.append((Path(path), data))
            else:
                raise UserError(
                    f"{path}: neither a train_summary.json (keys 'steps', 'best_val_loss') nor a vla-rollout "
                    "summary.json (rows with 'task', 'env', 'success_rate')"
                )
        return results


# ---------------------------------------------------------------------------------------------- formatting


def format_value(value: Any) -> str:
    """One table cell; floats keep 4 significant digits, NaN (no valid episode) reads 'n/a'."""
    if isinstance(value, bool) or value is None:
        return str(value).lower() if isinstance(value, bool) else "-"
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.4g}"
    if isinstance(value, list):
        return ", ".join(format_value(v) for v in value)
    return str(value)


def flatten(data: Mapping[str, Any], keys: Sequence[str]) -> list[tuple[str, str]]:
    """(name, cell) rows for the present `keys`; a nested object becomes `key.sub` rows."""
    rows: list[tuple[str, str]] = []
    for key in keys:
        if key not in data:
            continue
        value = data[key]
        if isinstance(value, Mapping):
            rows += [(f"{key}.{sub}", format_value(v)) for sub, v in value.items() if not isinstance(v, Mapping | list)]
        else:
            rows.append((key, format_value(value)))
    return rows


def run_label(path: Path) -> str:
    """A training run's name in the card: its output folder (where vla-train wrote train_summary.json)."""
    return path.parent.name or path.name


def training_table(results: Results, section: str | None, keys: Sequence[str]) -> list[list[str]]:
    """Rows [name, value per run] of the runs' train_summary.json (`section`: a nested object such as "config")."""
    per_run = [dict(flatten(data.get(section, {}) if section else data, keys)) for _, data in results.train_summaries]
    names = list(dict.fromkeys(name for cells in per_run for name in cells))
    return [[name, *(cells.get(name, "-") for cells in per_run)] for name in names]


def evaluation_table(results: Results) -> tuple[list[str], list[list[str]]]:
    header = ["policy", "task", "env", "episodes", "successes", "success rate", "95% CI", "errors"]
    rows = []
    for _, summary in results.eval_summaries:
        for row in success_rows(summary):
            ci = (f"[{format_value(row['ci_low'])}, {format_value(row['ci_high'])}]"
                  if "ci_low" in row and "ci_high" in row else "-")
            rows.append([format_value(row.get("policy")), str(row["task"]), str(row["env"]),
                         format_value(row.get("episodes")), format_value(row.get("successes")),
                         format_value(row["success_rate"]), ci, format_value(row.get("errors"))])
    return header, rows


def agreement_table(results: Results) -> list[list[str]]:
    return [
        [format_value(row.get("policy")), str(row["task"]), format_value(row["pairs"]), format_value(row["agreement_rate"]),
         format_value(row.get("dream_success_rate")), format_value(row.get("real_success_rate"))]
        for _, summary in results.eval_summaries
        for row in agreement_rows(summary)
    ]


def _number(value: Any) -> float | None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and not math.isnan(value)
    return float(value) if ok else None


def eval_results(results: Results, dataset_id: str | None, world_model: bool) -> list[EvalResult]:
    """model-index entries for the numbers that exist: a policy's success rate per (task, env); for the
    world model, how often its dreams agreed with the real outcome per (policy, task)."""
    entries = []

    def entry(task: str, metric_type: str, metric_name: str, value: float) -> EvalResult:
        return EvalResult(task_type="robotics", task_name=f"robosuite {task}",
                          dataset_type=dataset_id or "local/dreaming-vla-dataset",
                          dataset_name=f"dreaming-vla {task} initial states", dataset_config=task,
                          metric_type=metric_type, metric_name=metric_name, metric_value=value)

    for _, summary in results.eval_summaries:
        if world_model:
            for row in agreement_rows(summary):
                if (rate := _number(row["agreement_rate"])) is not None:
                    entries.append(entry(str(row["task"]), "dream_real_agreement",
                                         f"dream-vs-real outcome agreement ({row.get('policy')}, {row['pairs']} pairs)", rate))
            continue
        for row in success_rows(summary):
            if (rate := _number(row["success_rate"])) is not None:
                env = str(row["env"])
                where = "world-model dream" if env == "dream" else "robosuite"
                entries.append(entry(str(row["task"]), f"{env}_success_rate",
                                     f"success rate ({where}, {format_value(row.get('episodes'))} episodes)", rate))
    return entries


# ---------------------------------------------------------------------------------------------- cards


def model_kind(config: Mapping[str, Any], source: Path) -> ModelKind:
    """The registered kind (model_kinds.py) of a saved model's config.json content."""
    return kind_of_type(config.get("model_type"), str(source))


def model_card(config: Mapping[str, Any], repo_id: str, results: Results, dataset_id: str | None = None,
               source: Path = Path("config.json")) -> ModelCard:
    """The card of one saved model (its config.json content) from whatever results exist."""
    kind = model_kind(config, source)
    text = kind.card_text
    tags = [*COMMON_TAGS, *text.tags]
    if "lora" in tags and not config.get("use_lora", True):
        tags.remove("lora")
    runs = results.train_summaries
    world_model = kind.role == "world"
    if len(runs) > 1 and not world_model:
        raise UserError(f"{', '.join(str(path) for path, _ in runs)}: several training summaries for one "
                        f"{config.get('model_type')} model; only a pooled world model comes from several runs")
    evals = eval_results(results, dataset_id, world_model)
    header, rows = evaluation_table(results)
    backbone = config.get("backbone")
    card_data = ModelCardData(
        library_name="transformers",
        license="mit",
        language="en",
        pipeline_tag="robotics",
        tags=tags,
        datasets=[dataset_id] if dataset_id else None,
        base_model=backbone if backbone and not Path(backbone).is_absolute() else None,
        metrics=sorted({e.metric_type for e in evals}) or None,
        model_name=repo_id.split("/")[-1] if evals else None,
        eval_results=evals or None,
    )
    architectures = config.get("architectures") or ["?"]
    return ModelCard.from_template(
        card_data,
        template_path=str(TEMPLATE),
        title=text.title,
        summary=text.summary,
        repo_id=repo_id,
        model_class=architectures[0],
        model_type=config["model_type"],
        state_dim=config.get("state_dim", "?"),
        action_dim=config.get("action_dim", "?"),
        state_layout=config.get("state_layout", "?"),
        tasks=", ".join(config.get("tasks") or []) or "not recorded",
        architecture=flatten(config, text.architecture_keys),
        train_metrics=training_table(results, None, TRAIN_METRIC_KEYS),
        train_config=training_table(results, "config", TRAIN_CONFIG_KEYS),
        train_header=["value"] if len(runs) == 1 else [f"`{run_label(path)}`" for path, _ in runs],
        train_runs=len(runs),
        train_config_source=", ".join(f"`{path.name}`" if len(runs) == 1 else f"`{run_label(path)}/{path.name}`" for path, _ in runs),
        eval_rows=rows,
        agreement_rows=agreement_table(results),
        eval_header=header,
        eval_align=" | ".join(["---"] * 3 + ["---:"] * (len(header) - 3)),
        eval_source=", ".join(str(path.name) for path, _ in results.eval_summaries),
        eval_intro="The world model is evaluated through the policies that dream in it: the same starts played in "
        "its dreams and in robosuite." if world_model else "",
        eval_note="the world model is evaluated through the policies' dream rollouts: pass their summary.json files"
        if world_model else "",
        usage=text.usage,
        intended_use=text.intended_use,
        limitations=text.limitations,
    )


def dataset_card(dataset_dir: Path, repo_id: str) -> DatasetCard:
    """The card `vla-preprocess` wrote from the data (counts, features, splits), pointed at `repo_id`.

    The counts come from the preprocessing run, so this only adds how to load the repo by its id
    and checks the card still has the `configs:` that `datasets` needs to find the splits.
    """
    readme = Path(dataset_dir) / "README.md"
    if not readme.is_file():
        raise UserError(f"{readme}: missing; expected the dataset card written by vla-preprocess")
    card = DatasetCard.load(readme)
    if not card.data.to_dict().get("configs"):
        raise UserError(f"{readme}: YAML header has no 'configs:' entry (expected the one vla-preprocess writes)")
    how_to_load = (
        "\n## How to load\n\n"
        "After `vla-export` (or a download) the repo is in the local Hugging Face cache and loads offline by id:\n\n"
        "```python\n"
        "from datasets import load_dataset\n\n"
        f"ds = load_dataset(\"{repo_id}\")  # DatasetDict with 'train' and 'validation'\n"
        "```\n"
    )
    if "## How to load" not in card.text:
        card.text = card.text.rstrip("\n") + "\n" + how_to_load
    return card
