"""Where a policy's failed real episodes stall, and what holds the gripper there.

    .venv/bin/python benchmarks/stalls.py results/eval_vla12k_pertask --task square --replay 20

Reads a `vla-rollout --env real` results folder. A failed episode *stalls* at the first step from which the end
effector moves less than `STALL_MOVE` in every `STALL_WINDOW` steps until the episode ends, at least `STALL_STEPS`
steps later: the policy keeps commanding moves that do not happen, or commands none.

`--replay N` rebuilds the first N stalled episodes in robosuite from their seeds and recorded actions (robosuite is
deterministic: the replayed state must match the recorded one, or the episode is reported as diverged), and from the
stall step asks the simulator:
* what the fingers touch (the table, the task object) after `PROBE_STEPS` of the recorded steps;
* how far the gripper moves in `PROBE_STEPS` steps when the recorded actions go on with their downward component
  removed ("no push down") or replaced by a lift of `LIFT_ACTION` ("lift"), against the recorded steps themselves;
* whether the scripted expert, taking over there as in DAgger (`ScriptedExpert.resume`), still solves the task.

When the folder also holds dreams (`--env both`), it reports how the dreams from the stalled episodes' initial states
ended: a world model that never learned the contact that holds the gripper dreams them as successes.

`--world-model DIR --policy-dir DIR` asks the world model about the stall itself, for every stalled episode:
* one step at a time, on the recorded (state, action) pairs from the stall on, how far the dream moves the end
  effector per step against how far reality moved it;
* whether a dream started `DREAM_OFFSET` steps into the stall, from the real state, with the same policy, stays
  stalled or gets out (and succeeds).

`--training-data DIR` (with `--world-model`) asks the same of the stalled episodes in a dataset, e.g. the world
model's own training data: a model that moves the gripper on the stalls it was trained on has not learned them.

    .venv/bin/python benchmarks/stalls.py results/benchmark --task square --policy mlp \
        --world-model runs/wm_pool10/best --policy-dir runs/x_e5_pertask_s0/best \
        --training-data data/hf_dataset_world_onpolicy
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.errors import UserError, run_cli
from data_prep.stalls import STALL_MOVE, STALL_STEPS, STALL_WINDOW, stall_step
from data_prep.tasks import STATE_SLICES, get_task, state_from_obs, task_names
from evaluation.envs import DREAM_RELATIVE
from evaluation.records import EpisodeRecord, read_episodes, select

PROBE_STEPS = 20  # steps each branch runs from the stall (1 s): long enough for the arm to cover centimetres
LIFT_ACTION = 0.2  # dz action of the "lift" branch: a 1 cm goal offset, what the expert commands near a target
REPLAY_TOLERANCE = 1e-4  # max |replayed - recorded| state entry; the records are float32
TABLE_GEOM = "table_collision"  # robosuite's TableArena, every task here
DREAM_OFFSET = 10  # steps into the stall a dream starts from: the stall has set in (a policy's chunk history is lost)


@dataclass
class Probe:
    """What robosuite says about one stalled episode, replayed to its stall step."""

    replay_error: float
    fingers_on_table: bool = False
    fingers_on_object: bool = False
    moved: dict[str, float] | None = None  # branch -> eef displacement (m) over PROBE_STEPS
    expert_success: bool = False
    expert_steps: int = 0


def _replayed(record: EpisodeRecord, steps: int):
    """A fresh simulator driven by the episode's first `steps` recorded actions, and its last observation."""
    from data_prep.sim import make_env

    sim = make_env(record.task, record.seed)
    obs = sim.reset(record.seed)
    for action in record.actions[:steps]:
        obs, *_ = sim.env.step(np.asarray(action, dtype=np.float64))
    return sim, obs


def _eef(obs: dict) -> np.ndarray:
    return np.asarray(obs["robot0_eef_pos"], dtype=np.float64)


BRANCHES: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "recorded": lambda a: a,
    "no push down": lambda a: np.r_[a[:2], max(a[2], 0.0), a[3:]],
    "lift": lambda a: np.r_[a[:2], LIFT_ACTION, a[3:]],
}


def probe(record: EpisodeRecord, t: int) -> Probe:
    from data_prep.tasks import make_expert

    sim, obs = _replayed(record, t)
    error = float(np.abs(state_from_obs(obs, record.task)[0] - record.states[t]).max())
    result = Probe(replay_error=error)
    if error > REPLAY_TOLERANCE:
        return result
    expert = make_expert(record.task, seed=record.seed)
    expert.reset(sim.env)
    result.moved = {}
    for name, change in BRANCHES.items():
        if name != "recorded":
            sim, obs = _replayed(record, t)
        start = _eef(obs)
        for action in record.actions[t:t + PROBE_STEPS]:
            obs, *_ = sim.env.step(change(np.asarray(action, dtype=np.float64)))
        result.moved[name] = float(np.linalg.norm(_eef(obs) - start))
        if name == "recorded":  # contacts once the stall has set in (the last millimetres of a descent are slow)
            gripper = sim.env.robots[0].gripper["right"]
            result.fingers_on_table = bool(sim.env.check_contact(gripper, TABLE_GEOM))
            result.fingers_on_object = bool(sim.env.check_contact(gripper, expert.grasp_object()))
    sim, obs = _replayed(record, t)
    expert.reset(sim.env)
    expert.resume(obs)
    for step in range(t, get_task(record.task).horizon):
        obs, *_ = sim.env.step(expert.act(obs))
        if sim.success():
            result.expert_success, result.expert_steps = True, step + 1 - t
            break
    return result


def failed_episodes(folder: Path, task: str, policy: str | None,
                    episodes: list[EpisodeRecord] | None = None) -> list[EpisodeRecord]:
    """The real episodes of `task` (and `policy`) in `folder` that failed without an error.

    episodes: the folder's episodes when the caller has read them already (read_episodes(folder)).
    """
    records = select(read_episodes(folder) if episodes is None else episodes, task=task, env="real")
    policies = sorted({r.policy for r in records})
    if not records:
        raise UserError(f"{folder}: no real {task} episodes (expected a vla-rollout --env real results folder)")
    if policy is None and len(policies) > 1:
        raise UserError(f"{folder}: episodes of several policies ({', '.join(policies)}); choose one with --policy")
    if policy is not None and policy not in policies:
        raise UserError(f"{folder}: no episodes of policy {policy!r} (found {', '.join(policies)})")
    return [r for r in records if (policy is None or r.policy == policy) and not r.success and r.error is None]


def dream_twins(records: list[EpisodeRecord], stalled: list[EpisodeRecord]) -> dict[str, list[EpisodeRecord]]:
    """Per dream source, the dreams played from the stalled episodes' initial states (same policy, task and seed)."""
    wanted = {(r.policy, r.task, r.seed) for r in stalled}
    twins: dict[str, list[EpisodeRecord]] = {}
    for r in records:
        if r.env == "dream" and r.error is None and (r.policy, r.task, r.seed) in wanted:
            twins.setdefault(r.source, []).append(r)
    return twins


@dataclass
class StallDream:
    """What the world model makes of one real stall."""

    real_cm_per_step: float  # mean |eef change| per recorded step from the stall on
    dreamed_cm_per_step: float  # the same, one world-model step from each recorded (state, action)
    start_step: int  # the dream below starts from the real state at this step
    dream: EpisodeRecord  # that dream, played with the same policy


def eef_motion(world_model, states: np.ndarray, actions: np.ndarray, next_states: np.ndarray,
               prev_states: np.ndarray, instruction: str, task: str) -> tuple[np.ndarray, np.ndarray]:
    """End-effector motion per step (m) of each recorded (state, action) pair: recorded, and one world-model step."""
    import torch

    from data_prep.tasks import state_mask

    n, eef = len(actions), STATE_SLICES["eef pos"]
    with torch.no_grad():
        mean, *_ = world_model.step(torch.as_tensor(states), torch.as_tensor(actions), [instruction] * n,
                                    state_mask=torch.as_tensor(state_mask(task)).expand(n, -1),
                                    prev_state=torch.as_tensor(prev_states))
    real = np.linalg.norm(next_states[:, eef] - states[:, eef], axis=1)
    return real, np.linalg.norm(np.asarray(mean)[:, eef] - states[:, eef], axis=1)


def one_step_motion(world_model, record: EpisodeRecord, t: int) -> tuple[float, float]:
    """Mean end-effector motion per step (cm) from step t on: recorded, and predicted one step at a time."""
    n = len(record.actions[t:])
    real, dreamed = eef_motion(world_model, record.states[t:t + n], record.actions[t:], record.states[t + 1:t + n + 1],
                               record.states[max(t - 1, 0):][:n], record.instruction, record.task)
    return float(real.mean() * 100), float(dreamed.mean() * 100)


def training_stalls(world_model, dataset: Path, task: str) -> None:
    """Does the world model fit the stalls of a dataset it may have been trained on? Per split, the median eef motion
    per step, recorded and one world-model step, over the steps of stalled episodes from the stall on (and before)."""
    from data_prep.preprocess import load_vla_dataset

    header = ["split", "stalled episodes", "stall steps", "real cm/step in stalls", "dreamed cm/step in stalls",
              "real cm/step before", "dreamed cm/step before"]
    print("| " + " | ".join(header) + " |\n|" + " --- |" * len(header))
    for split, rows in load_vla_dataset(dataset).items():
        table = rows.select_columns(["task", "instruction", "episode", "step", "state", "action", "next_state",
                                     "source"]).to_pandas()
        motion = {"stall": ([], []), "before": ([], [])}
        for _, episode in table[table.task == task].groupby(["source", "episode"]):
            episode = episode.sort_values("step")
            states, next_states = np.stack(episode.state).astype(np.float32), np.stack(episode.next_state).astype(np.float32)
            t = stall_step(np.concatenate([states[:, STATE_SLICES["eef pos"]], next_states[-1:, STATE_SLICES["eef pos"]]]))
            if t is None:
                continue
            real, dreamed = eef_motion(world_model, states, np.stack(episode.action).astype(np.float32), next_states,
                                       np.concatenate([states[:1], states[:-1]]), episode.instruction.iloc[0], task)
            for part, steps in (("stall", slice(t, None)), ("before", slice(None, t))):
                motion[part][0].append(real[steps])
                motion[part][1].append(dreamed[steps])
        if not motion["stall"][0]:
            print(f"| {split} | 0 | 0 |" + " n/a |" * 4)
            continue
        cm = {part: [100 * np.median(np.concatenate(values)) for values in pair] for part, pair in motion.items()}
        print(f"| {split} | {len(motion['stall'][0])} | {sum(map(len, motion['stall'][0]))} | {cm['stall'][0]:.3f} | "
              f"{cm['stall'][1]:.3f} | {cm['before'][0]:.3f} | {cm['before'][1]:.3f} |")


def dream_from_stalls(world_model, policy, stalled: list[EpisodeRecord], stalls: dict[int, int],
                      relative_from: str = DREAM_RELATIVE[0]) -> list[StallDream]:
    """Per stalled episode: the one-step motion, and a dream from DREAM_OFFSET steps into the stall to the horizon."""
    from evaluation.envs import DreamEnv, Start
    from evaluation.rollout import rollout

    results = []
    for record in stalled:
        t = stalls[record.seed]
        start = min(t + DREAM_OFFSET, record.length)
        real, dreamed = one_step_motion(world_model, record, t)
        horizon = get_task(record.task).horizon - start
        dream = rollout(DreamEnv(world_model, record.task, relative_from=relative_from), policy, [Start(record.seed, record.states[start])],
                        [record.instruction], horizon, progress=False)[0]
        results.append(StallDream(real, dreamed, start, dream))
    return results


def print_stall_dreams(stalled: list[EpisodeRecord], stalls: dict[int, int], results: list[StallDream]) -> None:
    header = ["seed", "stall step", "real eef cm/step", "dreamed eef cm/step (one step)", "dream from step",
              "dream stays stalled", "dream succeeds"]
    print("| " + " | ".join(header) + " |\n|" + " --- |" * len(header))
    for record, result in zip(stalled, results, strict=True):
        stays = stall_step(result.dream.states[:, STATE_SLICES["eef pos"]]) == 0
        outcome = f"yes, after {result.dream.length} steps" if result.dream.success else "no"
        print(f"| {record.seed} | {stalls[record.seed]} | {result.real_cm_per_step:.3f} | "
              f"{result.dreamed_cm_per_step:.3f} | {result.start_step} | {'yes' if stays else 'no'} | {outcome} |")
    if results:
        print(f"\nfrom inside {len(results)} stalls the dream stays stalled in "
              f"{sum(stall_step(r.dream.states[:, STATE_SLICES['eef pos']]) == 0 for r in results)} and succeeds in "
              f"{sum(r.dream.success for r in results)}; median one-step eef motion: real "
              f"{np.median([r.real_cm_per_step for r in results]):.3f} cm, dreamed "
              f"{np.median([r.dreamed_cm_per_step for r in results]):.3f} cm")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", type=Path, help="a vla-rollout results folder with real episodes")
    p.add_argument("--task", required=True, choices=sorted(task_names()))
    p.add_argument("--policy", help="policy name in the folder (needed when it holds several)")
    p.add_argument("--replay", type=int, default=0, help="replay this many stalled episodes in robosuite")
    p.add_argument("--world-model", type=Path, help="a saved world model: dream the stalls (needs --policy-dir)")
    p.add_argument("--policy-dir", type=Path, help="the saved policy of the episodes, for --world-model's dreams")
    p.add_argument("--training-data", type=Path,
                   help="a vla-preprocess dataset (the world model's own): one-step motion in its stalled episodes")
    p.add_argument("--dream-relative", choices=DREAM_RELATIVE, default=DREAM_RELATIVE[0],
                   help="the dreams' object-to-eef pose: derived from the dreamed poses (default) or the world model's own")
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if (args.world_model is None) != (args.policy_dir is None):
        raise UserError("--world-model and --policy-dir go together (the dreams need both)")
    if args.training_data is not None and args.world_model is None:
        raise UserError("--training-data needs --world-model (whose one-step motion it measures)")
    episodes = read_episodes(args.results)
    failed = failed_episodes(args.results, args.task, args.policy, episodes)
    stalls = {r.seed: stall_step(r.states[:, STATE_SLICES["eef pos"]]) for r in failed}
    stalled = [r for r in failed if stalls[r.seed] is not None]
    print(f"{args.task}: {len(failed)} failed episodes, {len(stalled)} stall "
          f"(eef moving < {STALL_MOVE * 100:.0f} cm per {STALL_WINDOW} steps for the last >= {STALL_STEPS} steps)")
    for source, twins in dream_twins(episodes, stalled).items():
        dream_stalls = sum(stall_step(r.states[:, STATE_SLICES["eef pos"]]) is not None for r in twins)
        print(f"{source} from the same {len(twins)} starts: {sum(r.success for r in twins)} succeed, "
              f"{dream_stalls} stall")
    if args.world_model is not None:
        from common.policies import ChunkPolicy
        from common.saved_models import load_model

        world_model = load_model(args.world_model, "--world-model", "cpu")
        policy = ChunkPolicy(load_model(args.policy_dir, "--policy-dir", "cpu"), name=stalled[0].policy if stalled else "")
        print_stall_dreams(stalled, stalls, dream_from_stalls(world_model, policy, stalled, stalls, args.dream_relative))
        if args.training_data is not None:
            print(f"\n{args.task} episodes of {args.training_data} that stall:")
            training_stalls(world_model, args.training_data, args.task)
    if not args.replay:
        return
    header = ["seed", "stall step", "replay error", "fingers on table", "fingers on object",
              *(f"moved in {PROBE_STEPS} steps: {b} (cm)" for b in BRANCHES), "expert takes over"]
    print("| " + " | ".join(header) + " |\n|" + " --- |" * len(header))
    probes = []
    for record in stalled[:args.replay]:
        t = stalls[record.seed]
        result = probe(record, t)
        probes.append(result)
        if result.moved is None:
            print(f"| {record.seed} | {t} | {result.replay_error:.1e} (diverged) |" + " |" * (len(header) - 3))
            continue
        moved = " | ".join(f"{result.moved[b] * 100:.1f}" for b in BRANCHES)
        expert = f"solved in {result.expert_steps} steps" if result.expert_success else "fails"
        print(f"| {record.seed} | {t} | {result.replay_error:.0e} | {'yes' if result.fingers_on_table else 'no'} | "
              f"{'yes' if result.fingers_on_object else 'no'} | {moved} | {expert} |")
    replayed = [r for r in probes if r.moved is not None]
    if replayed:
        medians = ", ".join(f"{b} {np.median([r.moved[b] for r in replayed]) * 100:.1f}" for b in BRANCHES)
        print(f"\nreplayed {len(replayed)} of {len(probes)}: fingers on the table in "
              f"{sum(r.fingers_on_table for r in replayed)}, on the object in {sum(r.fingers_on_object for r in replayed)}; "
              f"median cm moved: {medians}; the expert solves {sum(r.expert_success for r in replayed)}")


if __name__ == "__main__":
    run_cli(main)
