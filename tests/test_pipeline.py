"""vla-pipeline's skip/resume logic with fake stages (the real stages are exercised by `vla-pipeline --quick`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest

from common.errors import UserError
from data_prep.tasks import get_task, task_names
from pipeline import REPO_ROOT, SIZES, PipelinePaths, Stage, build_stages, run_stages
from train_accelerate import load_config


class FakeRunner:
    """Stands in for subprocess: records commands, makes each stage's outputs unless told to fail."""

    def __init__(self, stages: Sequence[Stage], fail: set[str] | None = None, half_finish: set[str] | None = None):
        self.by_command = {stage.command: stage for stage in stages}
        self.fail = fail or set()
        self.half_finish = half_finish or set()
        self.calls: list[list[str]] = []
        self.envs: list[dict[str, str]] = []
        self.logs: list[Path | None] = []

    def __call__(self, command: Sequence[str], env: Mapping[str, str], log: Path | None = None) -> int:
        self.calls.append(list(command))
        self.envs.append(dict(env))
        self.logs.append(log)
        base = tuple(arg for arg in command if arg != "--resume")
        stage = self.by_command[base]
        if stage.name in self.half_finish:  # a training run killed after its first checkpoint
            assert stage.resume_dir is not None
            (stage.resume_dir / "checkpoint-1").mkdir(parents=True)
            return 1
        if stage.name in self.fail:
            return 3
        for output in stage.outputs:
            output.parent.mkdir(parents=True, exist_ok=True)
            output.write_text("made")
        return 0


def fake_stages(tmp_path: Path) -> list[Stage]:
    return [
        Stage("generate", ("gen",), (tmp_path / "raw" / "a.hdf5",)),
        Stage("train", ("train",), (tmp_path / "train" / "best" / "config.json",), resume_dir=tmp_path / "train"),
        Stage("evaluate", ("eval",), (tmp_path / "eval" / "summary.json",)),
    ]


def names(runner: FakeRunner) -> list[str]:
    return [call[0] for call in runner.calls]


def flag_value(stage: Stage, flag: str) -> str:
    """The argument after `flag` in a stage's command line."""
    command = list(stage.command)
    return command[command.index(flag) + 1]


def flag_values(stage: Stage, flag: str, until: str | None = None) -> list[str]:
    """The arguments after `flag`, up to `until` (or the end)."""
    command = list(stage.command)
    return command[command.index(flag) + 1: command.index(until) if until else None]


def test_all_stages_run_once_then_are_skipped(tmp_path: Path) -> None:
    stages = fake_stages(tmp_path)
    first = FakeRunner(stages)
    reports = run_stages(stages, tmp_path, runner=first, echo=lambda _: None)
    assert names(first) == ["gen", "train", "eval"]
    assert [r.status for r in reports] == ["done"] * 3
    assert all(stage.marker(tmp_path).is_file() for stage in stages)

    second = FakeRunner(stages)
    reports = run_stages(stages, tmp_path, runner=second, echo=lambda _: None)
    assert second.calls == []
    assert [r.status for r in reports] == ["skipped"] * 3


def test_failure_stops_and_rerun_resumes_from_the_failed_stage(tmp_path: Path) -> None:
    stages = fake_stages(tmp_path)
    failing = FakeRunner(stages, fail={"evaluate"})
    with pytest.raises(UserError, match="evaluate"):
        run_stages(stages, tmp_path, runner=failing, echo=lambda _: None)
    assert not stages[2].marker(tmp_path).exists()

    rerun = FakeRunner(stages)
    run_stages(stages, tmp_path, runner=rerun, echo=lambda _: None)
    assert names(rerun) == ["eval"]


def test_interrupted_training_is_resumed_with_flag(tmp_path: Path) -> None:
    stages = fake_stages(tmp_path)
    with pytest.raises(UserError, match="train"):
        run_stages(stages, tmp_path, runner=FakeRunner(stages, half_finish={"train"}), echo=lambda _: None)

    rerun = FakeRunner(stages)
    run_stages(stages, tmp_path, runner=rerun, echo=lambda _: None)
    assert rerun.calls == [["train", "--resume"], ["eval"]]


def test_zero_exit_without_outputs_is_a_failure(tmp_path: Path) -> None:
    stages = [Stage("silent", ("noop",), (tmp_path / "never.json",))]
    with pytest.raises(UserError, match="missing outputs"):
        run_stages(stages, tmp_path, runner=lambda command, env, log: 0, echo=lambda _: None)
    assert not stages[0].marker(tmp_path).exists()


def test_deleted_output_makes_a_done_stage_run_again(tmp_path: Path) -> None:
    stages = fake_stages(tmp_path)
    run_stages(stages, tmp_path, runner=FakeRunner(stages), echo=lambda _: None)
    (tmp_path / "eval" / "summary.json").unlink()
    rerun = FakeRunner(stages)
    run_stages(stages, tmp_path, runner=rerun, echo=lambda _: None)
    assert names(rerun) == ["eval"]


def test_workdir_of_other_settings_is_refused_before_running_anything(tmp_path: Path) -> None:
    stages = fake_stages(tmp_path)
    run_stages(stages, tmp_path, runner=FakeRunner(stages), echo=lambda _: None)
    changed = [stages[0], Stage("train", ("train", "--steps", "9000"), stages[1].outputs, stages[1].resume_dir), stages[2]]
    runner = FakeRunner(changed)
    with pytest.raises(UserError, match="other settings"):
        run_stages(changed, tmp_path, runner=runner, echo=lambda _: None)
    assert runner.calls == []


def test_interrupted_stage_of_other_settings_is_not_resumed(tmp_path: Path) -> None:
    stages = fake_stages(tmp_path)
    with pytest.raises(UserError):
        run_stages(stages, tmp_path, runner=FakeRunner(stages, half_finish={"train"}), echo=lambda _: None)
    changed = [stages[0], Stage("train", ("train", "--full"), stages[1].outputs, stages[1].resume_dir), stages[2]]
    with pytest.raises(UserError, match="other settings"):
        run_stages(changed, tmp_path, runner=FakeRunner(changed), echo=lambda _: None)


def test_stage_environment_reaches_the_runner(tmp_path: Path) -> None:
    seen: list[Mapping[str, str]] = []
    stage = Stage("one", ("cmd",), (), env=(("HF_DATASETS_CACHE", "/x"),))
    run_stages([stage], tmp_path, runner=lambda command, env, log: seen.append(env) or 0, echo=lambda _: None)
    assert seen == [{"HF_DATASETS_CACHE": "/x"}]


def test_real_stage_list_is_ordered_and_exports_every_model(tmp_path: Path) -> None:
    paths = PipelinePaths(tmp_path)
    stages = build_stages(paths, SIZES["quick"], ["lift"])
    order = [stage.name for stage in stages]
    assert order.index("generate") < order.index("preprocess") < order.index("train_world_s0")
    assert order.index("pool_world") < order.index("evaluate_policy") < order.index("export_policy")
    assert {"export_world", "export_policy", "export_mlp", "export_dataset"} <= set(order)
    assert len(set(order)) == len(order)
    training = [stage for stage in stages if stage.name.startswith("train_")]
    assert all(stage.resume_dir is not None for stage in training)


def test_world_model_trains_on_demos_plus_play_data_and_policies_on_demos_plus_dagger(tmp_path: Path) -> None:
    paths = PipelinePaths(tmp_path)
    stages = {stage.name: stage for stage in build_stages(paths, SIZES["quick"], ["lift", "square"], seed=2)}
    order = list(stages)

    def dataset_of(stage: Stage) -> str:
        return flag_value(stage, "--dataset")

    assert order.index("generate_play") < order.index("preprocess_world") < order.index("train_world_s0")
    play = list(stages["generate_play"].command)
    assert play[1] == "play" and play[play.index("--out") + 1] == str(paths.raw_play)
    assert play[play.index("--episodes") + 1] == str(SIZES["quick"].play_episodes_per_task)
    # play seeds never overlap the expert demos' (seed .. seed + max attempts) nor evaluation's (100000+)
    expert = list(stages["generate"].command)
    expert_seeds = range(int(expert[expert.index("--seed") + 1]), 2 + int(expert[expert.index("--max-attempts") + 1]))
    play_seed = int(play[play.index("--seed") + 1])
    assert play_seed not in expert_seeds and play_seed + SIZES["full"].play_episodes_per_task < 100_000
    probs = play[play.index("--perturb-prob") + 1: play.index("--report")]
    assert probs == [f"{task}={get_task(task).play_perturb_prob}" for task in ("lift", "square")]  # the registered levels
    assert all(0 < get_task(task).play_perturb_prob < 1 for task in task_names())
    world_inputs = list(stages["preprocess_world"].command)
    assert world_inputs[world_inputs.index("--inputs") + 1: world_inputs.index("--out")] == [
        str(paths.raw), str(paths.raw_play), str(paths.raw_onpolicy)]
    # the policy roll-outs: whole episodes of a three-task MLP-BC on the demos, failures kept, on seeds of their own
    onpolicy = list(stages["generate_onpolicy"].command)
    assert order.index("train_mlp_demos") < order.index("generate_onpolicy") < order.index("preprocess_world")
    assert dataset_of(stages["train_mlp_demos"]) == str(paths.dataset)
    assert onpolicy[1] == "rollouts" and onpolicy[onpolicy.index("--out") + 1] == str(paths.raw_onpolicy)
    assert onpolicy[onpolicy.index("--policy") + 1] == str(paths.best("mlp_demos"))
    assert onpolicy[onpolicy.index("--tasks") + 1: onpolicy.index("--episodes")] == ["lift", "square"]
    onpolicy_seed = int(onpolicy[onpolicy.index("--seed") + 1])
    dagger = list(stages["generate_dagger1_square"].command)
    dagger_seed = int(dagger[dagger.index("--seed") + 1])
    assert onpolicy_seed > dagger_seed + 6 * SIZES["full"].dagger_episodes_per_task and onpolicy_seed + 100 < 100_000
    assert world_inputs[world_inputs.index("--out") + 1] == str(tmp_path / "hf_dataset_world")
    assert dataset_of(stages["train_world_s0"]) == dataset_of(stages["train_world_s1"]) == str(paths.world_dataset)
    assert dataset_of(stages["train_policy_base"]) == dataset_of(stages["train_mlp"]) == str(tmp_path / "dataset_dagger1")
    assert "local/dreaming-vla-dataset-world" in stages["export_world"].command
    assert {"export_dataset", "export_dataset_world"} <= set(order)
    assert 0 < SIZES["quick"].play_episodes_per_task < SIZES["full"].play_episodes_per_task == 100
    # without DAgger rounds the world model still learns from the demos MLP-BC's roll-outs; the policies from demos
    no_dagger = {stage.name: stage for stage in
                 build_stages(paths, dataclasses.replace(SIZES["quick"], dagger_rounds=0), ["lift"])}
    assert "generate_onpolicy" in no_dagger and not any(name.startswith("train_dagger") for name in no_dagger)
    assert dataset_of(no_dagger["train_policy_base"]) == str(paths.dataset)


def test_dream_model_pools_world_models_trained_with_consecutive_seeds(tmp_path: Path) -> None:
    paths = PipelinePaths(tmp_path)
    size = dataclasses.replace(SIZES["full"], world_seeds=3)
    stages = {stage.name: stage for stage in build_stages(paths, size, ["lift"], seed=4)}
    order = list(stages)

    def arg(name: str, flag: str) -> str:
        return flag_value(stages[name], flag)

    runs = ["world_s0", "world_s1", "world_s2"]
    assert "train_world" not in stages
    assert [arg(f"train_{run}", "--output-dir") for run in runs] == [str(paths.train_dir(run)) for run in runs]
    assert [arg(f"train_{run}", "--set") for run in runs] == ["max_steps=3000"] * 3
    seeds = [next(a for a in stages[f"train_{run}"].command if a.startswith("seed=")) for run in runs]
    assert seeds == ["seed=4", "seed=5", "seed=6"]
    pool = list(stages["pool_world"].command)
    assert pool[pool.index("--inputs") + 1: pool.index("--out")] == [str(paths.best(run)) for run in runs]
    assert pool[pool.index("--out") + 1] == str(paths.best("world")) == arg("evaluate_policy", "--world-model")
    assert max(order.index(f"train_{run}") for run in runs) < order.index("pool_world") < order.index("evaluate_mlp")
    export = list(stages["export_world"].command)
    card = export[export.index("--card-results") + 1: export.index("--dataset-repo-id")]
    assert card == [*(str(paths.train_dir(run) / "train_summary.json") for run in runs),
                    str(paths.eval_dir("policy") / "summary.json"), str(paths.eval_dir("mlp") / "summary.json")]
    # one seed: the plain train_world run is the dream model, nothing to pool
    single = [stage.name for stage in build_stages(paths, dataclasses.replace(size, world_seeds=1), ["lift"])]
    assert "train_world" in single and "pool_world" not in single and "train_world_s0" not in single
    assert SIZES["quick"].world_seeds >= 2  # the quick run exercises pooling too


def test_each_dagger_round_is_driven_per_task_by_a_policy_trained_on_that_tasks_rounds_before(tmp_path: Path) -> None:
    paths = PipelinePaths(tmp_path)
    assert SIZES["quick"].dagger_rounds == SIZES["full"].dagger_rounds == 1  # the measured choice; here two rounds
    two_rounds = dataclasses.replace(SIZES["full"], dagger_rounds=2)
    stages = {stage.name: stage for stage in build_stages(paths, two_rounds, ["lift", "can"], seed=1)}
    order = list(stages)

    def arg(stage: str, flag: str) -> str:
        return flag_value(stages[stage], flag)

    def inputs(stage: str) -> list[str]:
        return flag_values(stages[stage], "--inputs", until="--out")

    for round_ in (1, 2):
        for task in ("lift", "can"):
            driver = f"dagger_driver{round_}_{task}"
            generate = f"generate_dagger{round_}_{task}"
            assert arg(f"train_{driver}", "--model") == "mlp"
            assert arg(f"train_{driver}", "--dataset") == arg(f"preprocess_{driver}", "--out")
            assert order.index(f"preprocess_{driver}") < order.index(f"train_{driver}") < order.index(generate)
            assert order.index(generate) < order.index(f"preprocess_dagger{round_}")
            assert arg(generate, "--policy") == str(tmp_path / f"train_{driver}" / "best")
            assert arg(generate, "--tasks") == task and arg(generate, "--out") == str(tmp_path / f"raw_dagger{round_}")
        assert arg(f"preprocess_dagger{round_}", "--out") == str(tmp_path / f"dataset_dagger{round_}")
    # a driver learns from its own task only: round 1 from the demos, round 2 from the demos + round 1
    assert inputs("preprocess_dagger_driver1_can") == [str(paths.raw / "can")]
    assert inputs("preprocess_dagger_driver2_can") == [str(paths.raw / "can"), str(tmp_path / "raw_dagger1" / "can")]
    assert inputs("preprocess_dagger2") == [str(paths.raw), str(tmp_path / "raw_dagger1"), str(tmp_path / "raw_dagger2")]
    assert arg("train_policy_base", "--dataset") == arg("train_mlp", "--dataset") == str(tmp_path / "dataset_dagger2")
    assert order.index("preprocess_dagger2") < order.index("train_policy_base")
    assert inputs("preprocess_dagger_vla") == [*inputs("preprocess_dagger2"), str(paths.raw_dagger_vla)]
    # DAgger seeds: apart from each other, from the demos' (seed ..) and play (50000+), below evaluation's (100000+)
    seeds = [int(arg(f"generate_dagger{r}_can", "--seed")) for r in (1, 2)]
    attempts = int(arg("generate_dagger1_can", "--max-attempts"))
    assert seeds[0] > int(arg("generate_play", "--seed")) + SIZES["full"].play_episodes_per_task
    assert seeds[0] + attempts <= seeds[1] and seeds[1] + attempts < 100_000
    assert "local/dreaming-vla-dataset" in stages["export_mlp"].command
    # no DAgger data for the world model (its Square dreams turned pessimistic: docs/experiments/011)
    assert inputs("preprocess_world") == [str(paths.raw), str(paths.raw_play), str(paths.raw_onpolicy)]


def test_data_drivers_keep_the_earlier_mlp_budget_and_the_evaluated_mlp_trains_longer(tmp_path: Path) -> None:
    stages = {stage.name: stage for stage in build_stages(PipelinePaths(tmp_path), SIZES["full"], ["lift", "can"])}
    drivers = ["train_dagger_driver1_lift", "train_dagger_driver1_can", "train_mlp_demos"]
    for driver in drivers:  # the data every model learns from stays the measured recipe's
        assert flag_value(stages[driver], "--config").endswith("configs/mlp_driver.yaml"), driver
        assert flag_values(stages[driver], "--set")[0] == "max_steps=3000", driver
    assert flag_value(stages["train_mlp"], "--config").endswith("configs/mlp_bc.yaml")
    assert flag_values(stages["train_mlp"], "--set")[0] == "max_steps=9000"
    driver_config = load_config(REPO_ROOT / "configs" / "mlp_driver.yaml")
    mlp_config = load_config(REPO_ROOT / "configs" / "mlp_bc.yaml")
    assert (driver_config.best_checkpoint, mlp_config.best_checkpoint) == ("val_loss", "last")
    assert driver_config.model_config == mlp_config.model_config  # the same network, trained for longer


def test_the_vla_is_fine_tuned_on_its_own_dagger_round(tmp_path: Path) -> None:
    paths = PipelinePaths(tmp_path)
    assert SIZES["quick"].vla_dagger and SIZES["full"].vla_dagger  # the measured choice
    stages = {stage.name: stage for stage in build_stages(paths, SIZES["full"], ["lift", "square"], seed=3)}
    order = list(stages)

    def arg(stage: str, flag: str) -> str:
        return flag_value(stages[stage], flag)

    def overrides(stage: str) -> list[str]:
        return flag_values(stages[stage], "--set")

    base = str(paths.best("policy_base"))
    assert arg("generate_dagger_vla", "--policy") == base and arg("generate_dagger_vla", "--tasks") == "lift"
    assert arg("generate_dagger_vla", "--out") == str(paths.raw_dagger_vla)
    assert order.index("train_policy_base") < order.index("generate_dagger_vla") < order.index("preprocess_dagger_vla")
    assert order.index("preprocess_dagger_vla") < order.index("train_policy") < order.index("evaluate_policy")
    # the fine-tune: the base VLA's weights, its own YAML, all the data; evaluated and exported as the VLA
    assert arg("train_policy", "--config").endswith("configs/vla_dagger_finetune.yaml")
    assert arg("train_policy", "--dataset") == arg("preprocess_dagger_vla", "--out") == str(paths.vla_dagger_dataset)
    assert overrides("train_policy") == ["max_steps=1500", "seed=3", f"init_from={base}"]
    assert overrides("train_policy_base") == ["max_steps=9000", "seed=3"]
    assert arg("evaluate_policy", "--policy") == str(paths.best("policy"))
    assert arg("export_dataset_vla", "--dataset-dir") == str(paths.vla_dagger_dataset)
    assert "local/dreaming-vla-dataset-vla" in stages["export_policy"].command
    # its seeds: apart from the MLP DAgger rounds' and the world model's roll-outs, below evaluation's (100000+)
    seed = int(arg("generate_dagger_vla", "--seed"))
    attempts = int(arg("generate_dagger_vla", "--max-attempts"))
    assert seed > int(arg("generate_onpolicy", "--seed")) + SIZES["full"].play_episodes_per_task
    assert seed + attempts < 100_000
    # switched off: one VLA trained on the MLP DAgger rounds, as before
    plain = {stage.name: stage for stage in
             build_stages(paths, dataclasses.replace(SIZES["full"], vla_dagger=False), ["lift"])}
    assert "train_policy_base" not in plain and "generate_dagger_vla" not in plain
    assert flag_value(plain["train_policy"], "--dataset") == str(tmp_path / "dataset_dagger1")
    assert not any(a.startswith("init_from=") for a in plain["train_policy"].command)


def test_one_core_stages_run_side_by_side_with_one_thread_each_and_their_own_logs(tmp_path: Path) -> None:
    """Two one-core stages that need only the first run at the same time on 2 cores: each waits at a barrier that
    only the other can open (a sequential runner would time out there)."""
    import threading

    barrier = threading.Barrier(2, timeout=10)
    stages = [
        Stage("data", ("data",), (tmp_path / "data",)),
        Stage("train_a", ("a",), (tmp_path / "a",), needs=("data",), cores=1),
        Stage("train_b", ("b",), (tmp_path / "b",), needs=("data",), cores=1),
        Stage("evaluate", ("eval",), (tmp_path / "eval",), needs=("train_a", "train_b")),
    ]
    fake = FakeRunner(stages)

    def runner(command: Sequence[str], env: Mapping[str, str], log: Path | None) -> int:
        if command[0] in ("a", "b"):
            barrier.wait()
        return fake(command, env, log)

    reports = run_stages(stages, tmp_path, runner=runner, echo=lambda _: None, cores=2)
    assert [r.status for r in reports] == ["done"] * 4
    assert names(fake)[0] == "data" and names(fake)[-1] == "eval" and set(names(fake)[1:3]) == {"a", "b"}
    by_name = {call[0]: (env, log) for call, env, log in zip(fake.calls, fake.envs, fake.logs, strict=True)}
    assert by_name["a"] == ({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}, tmp_path / "logs" / "train_a.log")
    assert by_name["eval"] == ({}, None)  # the whole machine, output streamed


def test_a_failed_stage_stops_its_dependants_but_lets_running_siblings_finish(tmp_path: Path) -> None:
    stages = [
        Stage("data", ("data",), (tmp_path / "data",)),
        Stage("train_a", ("a",), (tmp_path / "a",), needs=("data",), cores=1),
        Stage("train_b", ("b",), (tmp_path / "b",), needs=("data",), cores=1),
        Stage("evaluate", ("eval",), (tmp_path / "eval",), needs=("train_a", "train_b")),
    ]
    fake = FakeRunner(stages, fail={"train_a"})
    with pytest.raises(UserError, match="train_a"):
        run_stages(stages, tmp_path, runner=fake, echo=lambda _: None, cores=2)
    assert "eval" not in names(fake) and "b" in names(fake)
    assert stages[2].marker(tmp_path).is_file() and not stages[1].marker(tmp_path).exists()
    rerun = FakeRunner(stages)
    run_stages(stages, tmp_path, runner=rerun, echo=lambda _: None, cores=2)
    assert names(rerun) == ["a", "eval"]


def test_a_stage_that_needs_the_whole_machine_is_not_overtaken(tmp_path: Path) -> None:
    stages = [
        Stage("first", ("first",), (tmp_path / "first",), cores=1),
        Stage("whole", ("whole",), (tmp_path / "whole",), needs=()),
        Stage("small", ("small",), (tmp_path / "small",), needs=(), cores=1),
    ]
    fake = FakeRunner(stages)
    run_stages(stages, tmp_path, runner=fake, echo=lambda _: None, cores=2)
    assert names(fake) == ["first", "whole", "small"]


def test_a_stage_may_only_need_stages_before_it(tmp_path: Path) -> None:
    stages = [Stage("a", ("a",), (), needs=("b",)), Stage("b", ("b",), ())]
    with pytest.raises(ValueError, match="needs"):
        run_stages(stages, tmp_path, runner=FakeRunner(stages), echo=lambda _: None)


def test_the_standard_size_trains_beside_the_world_models_data_and_one_mlp_drives_dagger_and_rollouts(tmp_path: Path) -> None:
    paths = PipelinePaths(tmp_path)
    stages = {stage.name: stage for stage in build_stages(paths, SIZES["standard"], ["lift", "square"])}
    # one DAgger round for all tasks, driven by the three-task MLP-BC on the demos, which also drives the roll-outs
    assert [name for name in stages if name.startswith(("generate_dagger", "train_dagger"))] == ["generate_dagger1"]
    driver = str(paths.best("mlp_demos"))
    assert flag_value(stages["generate_dagger1"], "--policy") == flag_value(stages["generate_onpolicy"], "--policy") == driver
    assert flag_values(stages["generate_dagger1"], "--tasks", "--episodes") == ["lift", "square"]  # one command
    assert stages["train_mlp_demos"].needs == ("preprocess",) and stages["generate_dagger1"].needs == ("train_mlp_demos",)
    # the order of work comes from the data: the policies need demos + DAgger, the evaluations the pooled world model
    assert stages["train_policy"].needs == ("preprocess_dagger1",) == stages["train_mlp"].needs
    assert set(stages["evaluate_policy"].needs) == {"train_policy", "pool_world"}
    assert set(stages["preprocess_world"].needs) == {"generate", "generate_play", "generate_onpolicy"}
    names = list(stages)
    assert names.index("train_mlp_demos") < names.index("generate_play")  # the driver before the play data
    one_core = {name for name, stage in stages.items() if stage.cores == 1}
    assert {"train_policy", "train_mlp", "train_mlp_demos", "generate_play", "generate_onpolicy", "train_world_s0"} <= one_core
    assert not one_core & {"generate", "preprocess", "generate_dagger1", "evaluate_policy", "evaluate_mlp"}
    assert flag_value(stages["generate_play"], "--workers") == flag_value(stages["generate_onpolicy"], "--workers") == "1"
    from pipeline import build_parser
    assert build_parser().parse_args([]).size == "standard"  # the README's main command runs this size


def test_a_shared_dagger_driver_drives_one_round_only(tmp_path: Path) -> None:
    size = dataclasses.replace(SIZES["standard"], dagger_rounds=2)
    with pytest.raises(UserError, match="one DAgger round"):
        build_stages(PipelinePaths(tmp_path), size, ["lift"])
    with pytest.raises(UserError, match="dagger_driver 'both'"):
        build_stages(PipelinePaths(tmp_path), dataclasses.replace(SIZES["standard"], dagger_driver="both"), ["lift"])


def test_every_size_evaluates_on_the_evaluation_starts_whatever_the_training_seed(tmp_path: Path) -> None:
    for size in SIZES.values():
        for seed in (0, 1):
            stages = {s.name: s for s in build_stages(PipelinePaths(tmp_path), size, ["lift"], seed=seed)}
            assert flag_value(stages["evaluate_policy"], "--seed") == flag_value(stages["evaluate_mlp"], "--seed") == "100000"
    tuning = {s.name: s for s in build_stages(PipelinePaths(tmp_path), SIZES["standard"], ["lift"], eval_seed=200_000)}
    assert flag_value(tuning["evaluate_policy"], "--seed") == "200000"


def test_the_vla_evaluation_is_filmed_except_in_the_smoke_run(tmp_path: Path) -> None:
    """The main job ends with a video of the VLA (real, dream and side by side); --quick films nothing (CI time)."""
    for size, filmed in (("standard", True), ("full", True), ("quick", False)):
        stages = {stage.name: stage for stage in build_stages(PipelinePaths(tmp_path), SIZES[size], ["lift"])}
        policy, mlp = (list(map(str, stages[f"evaluate_{kind}"].command)) for kind in ("policy", "mlp"))
        assert ("--video" in policy) is filmed and "--video" not in mlp, size
        if filmed:
            assert policy[policy.index("--video-episodes") + 1] == "1"
