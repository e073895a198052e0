"""Reading and writing robomimic-format HDF5 files.

One reader serves robomimic's published datasets and the files `vla-generate` writes, so the
rest of the pipeline never knows where a demo came from. The layout (robomimic v0.3 / v1.5 data):

    data/                      attrs: total (int), env_args (json: env_name, type, env_kwargs); task (str) when the
                               env is one that a task registered earlier also uses (our writer)
      demo_<i>/                attrs: num_samples (int), model_file (MJCF xml string)
        obs/<key>              [T, D] per observation key (robot0_eef_pos, object, ...)
        next_obs/<key>         [T, D]
        actions                [T, 7]  the executed actions
        expert_actions         [T, 7]  optional (our writer): the scripted expert's noise-free action at each state,
                                       the label a policy learns; differs from `actions` where noise, a random
                                       burst (play data) or a learner (DAgger data) drove instead
        rewards                [T]
        dones                  [T]
        states                 [T, S] flattened MuJoCo sim state
    mask/
      train                    [N] byte strings b"demo_<i>"
      valid                    [N] byte strings
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from common.errors import UserError, first_line
from data_prep.tasks import ACTION_DIM, STATE_KEYS, get_task, state_from_obs, task_names, task_of_env

EPISODE_ARRAYS = ("actions", "rewards", "dones", "states")
EXPERT_ACTIONS = "expert_actions"  # optional per-episode array written by vla-generate (see the layout above)
# Stamped into data.attrs by our writer; robomimic's own files lack it, which is how `origin` tells them apart.
WRITER_ATTR = "writer"
WRITER_NAME = "dreaming-vla"
TASK_ATTR = "task"  # data attribute naming the task, in files of a task whose env another task came first with


@dataclass
class Episode:
    obs: dict[str, np.ndarray]
    next_obs: dict[str, np.ndarray]
    actions: np.ndarray  # [T, 7]
    rewards: np.ndarray  # [T]
    dones: np.ndarray  # [T]
    states: np.ndarray  # [T, S]
    model_file: str = ""
    name: str = field(default="", compare=False)  # demo_<i> when read from a file
    expert_actions: np.ndarray | None = None  # [T, 7] policy labels; None: the executed actions are the labels

    @property
    def labels(self) -> np.ndarray:
        """What a policy should output at each state: the expert's actions where recorded, else the executed ones."""
        return self.actions if self.expert_actions is None else self.expert_actions

    def __len__(self) -> int:
        return len(self.actions)


def demo_index(name: str) -> int:
    """`demo_12` -> 12; used to sort demos numerically (demo_2 before demo_10)."""
    match = re.fullmatch(r"demo_(\d+)", name)
    return int(match.group(1)) if match else -1


def split_demo_names(names: list[str], valid_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Seeded episode-level train/validation split; at least one validation demo when there are two or more."""
    order = np.random.default_rng(seed).permutation(len(names))
    n_valid = int(round(len(names) * valid_fraction))
    if len(names) >= 2 and valid_fraction > 0:
        n_valid = min(max(n_valid, 1), len(names) - 1)
    valid = {names[i] for i in order[:n_valid]}
    return [n for n in names if n not in valid], [n for n in names if n in valid]


# --------------------------------------------------------------------------------------------- writing


def write_robomimic_hdf5(
    path: str | os.PathLike,
    episodes: list[Episode],
    env_args: dict,
    valid_fraction: float = 0.1,
    seed: int = 0,
    attrs: dict | None = None,
) -> None:
    """Write `episodes` as a robomimic HDF5 file (with train/valid masks), atomically.

    `attrs` are extra `data` group attributes (e.g. how the demos were made); dicts/lists are stored as JSON.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        with h5py.File(tmp_name, "w") as f:
            data = f.create_group("data")
            total = 0
            names = []
            for i, episode in enumerate(episodes):
                name = f"demo_{i}"
                _write_episode(data.create_group(name), episode, source=f"{path}: episode {i}")
                total += len(episode)
                names.append(name)
            data.attrs["total"] = total
            data.attrs["env_args"] = json.dumps(env_args)
            data.attrs[WRITER_ATTR] = WRITER_NAME
            for key, value in (attrs or {}).items():
                data.attrs[key] = json.dumps(value) if isinstance(value, dict | list) else value
            train, valid = split_demo_names(names, valid_fraction, seed)
            mask = f.create_group("mask")
            mask.create_dataset("train", data=np.array(train, dtype="S"))
            mask.create_dataset("valid", data=np.array(valid, dtype="S"))
        os.chmod(tmp_name, 0o644)  # mkstemp makes owner-only files; a dataset is meant to be shared
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def _write_episode(group: h5py.Group, episode: Episode, source: str) -> None:
    actions = np.asarray(episode.actions)
    if actions.ndim != 2 or actions.shape[1] != ACTION_DIM:
        raise UserError(f"{source}: actions have shape {actions.shape}, expected [T, {ACTION_DIM}]")
    steps = len(actions)
    for observations, group_name in ((episode.obs, "obs"), (episode.next_obs, "next_obs")):
        sub = group.create_group(group_name)
        for obs_key, value in observations.items():
            value = np.asarray(value)
            if len(value) != steps:
                raise UserError(f"{source}: {group_name}/{obs_key} has {len(value)} steps, expected {steps}")
            sub.create_dataset(obs_key, data=value)
    for name in EPISODE_ARRAYS:
        value = np.asarray(getattr(episode, name))
        if len(value) != steps:
            raise UserError(f"{source}: {name} has {len(value)} steps, expected {steps}")
        group.create_dataset(name, data=value)
    if episode.expert_actions is not None:
        labels = np.asarray(episode.expert_actions)
        if labels.shape != actions.shape:
            raise UserError(f"{source}: expert_actions have shape {labels.shape}, expected {actions.shape} like actions")
        group.create_dataset(EXPERT_ACTIONS, data=labels)
    group.attrs["num_samples"] = steps
    group.attrs["model_file"] = episode.model_file


# --------------------------------------------------------------------------------------------- reading


class RobomimicFile:
    """A validated, open-on-demand view of one robomimic HDF5 file.

    Construction checks the file opens, has a `data` group with a known `env_args["env_name"]`;
    `episode(name)` checks that episode's actions width and the observation keys the state needs.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise UserError(f"{self.path}: file not found (expected a robomimic HDF5 file)")
        with self._open() as f:
            if "data" not in f or not isinstance(f["data"], h5py.Group):
                raise UserError(f"{self.path}: missing 'data' group (not a robomimic HDF5 file)")
            data = f["data"]
            self.env_args: dict = self._parse_env_args(data.attrs.get("env_args"))
            self.attrs: dict = {k: _plain(v) for k, v in data.attrs.items() if k != "env_args"}
            self.demo_names: list[str] = sorted((k for k in data.keys() if demo_index(k) >= 0), key=demo_index)
            self.masks: dict[str, list[str]] = self._read_masks(f)
        if not self.demo_names:
            raise UserError(f"{self.path}: 'data' group holds no demo_<i> episodes")
        env_name = self.env_args.get("env_name")
        task = self.attrs.get(TASK_ATTR) or task_of_env(env_name)  # files of a task that shares its env name it
        if task is None:
            envs = sorted({get_task(name).env_name for name in task_names()})
            raise UserError(f"{self.path}: unknown env_name {env_name!r} in data.attrs['env_args']; expected one of {envs}")
        get_task(task)
        self.task: str = task

    @property
    def origin(self) -> str:
        """'generated' for files our writer made, 'robomimic' for robomimic's published (or any other) files;
        generated files say how: 'generated (play)' for play data, 'generated (DAgger)' for DAgger data,
        'generated (policy)' for a policy's own roll-outs."""
        if self.attrs.get(WRITER_ATTR) != WRITER_NAME:
            return "robomimic"
        if "rollout_policy" in self.attrs:
            return "generated (policy)"
        if "driver_policy" in self.attrs:
            return "generated (DAgger)"
        return "generated (play)" if self.attrs.get("keep_failures") or self.attrs.get("perturb_prob") else "generated"

    def _open(self) -> h5py.File:
        try:
            return h5py.File(self.path, "r")
        except OSError as err:
            raise UserError(f"{self.path}: cannot read as HDF5 (truncated or corrupt?): {first_line(err)}") from None

    def _parse_env_args(self, raw) -> dict:
        if raw is None:
            raise UserError(f"{self.path}: data.attrs['env_args'] is missing (expected a JSON dict with env_name)")
        if isinstance(raw, bytes):
            raw = raw.decode()
        try:
            env_args = json.loads(raw)
        except (TypeError, json.JSONDecodeError):
            raise UserError(f"{self.path}: data.attrs['env_args'] is not valid JSON") from None
        if not isinstance(env_args, dict):
            raise UserError(f"{self.path}: data.attrs['env_args'] is not a JSON object")
        return env_args

    def _read_masks(self, f: h5py.File) -> dict[str, list[str]]:
        if "mask" not in f:
            return {}
        masks = {}
        for name, dataset in f["mask"].items():
            masks[name] = [v.decode() if isinstance(v, bytes) else str(v) for v in np.asarray(dataset[()]).ravel()]
        return masks

    def __len__(self) -> int:
        return len(self.demo_names)

    def __iter__(self) -> Iterator[Episode]:
        with self._open() as f:
            for name in self.demo_names:
                yield self._read_episode(f["data"], name)

    def episode(self, name: str) -> Episode:
        if name not in self.demo_names:
            raise UserError(f"{self.path}: no episode {name!r} in 'data'")
        with self._open() as f:
            return self._read_episode(f["data"], name)

    def state(self, episode: Episode, which: str = "obs") -> tuple[np.ndarray, np.ndarray]:
        """(state [T,23], mask [T,23]) in the shared layout from the episode's `obs` or `next_obs`."""
        return state_from_obs(getattr(episode, which), self.task, source=f"{self.path}: data/{episode.name}/{which}")

    def _read_episode(self, data: h5py.Group, name: str) -> Episode:
        where = f"{self.path}: data/{name}"
        group = data[name]
        for key in ("obs", "next_obs", "actions"):
            if key not in group:
                raise UserError(f"{where}: missing {key!r}")
        try:
            actions = _numbers(group["actions"], f"{where}/actions").astype(np.float32)
            obs = {k: _numbers(v, f"{where}/obs/{k}") for k, v in group["obs"].items()}
            next_obs = {k: _numbers(v, f"{where}/next_obs/{k}") for k, v in group["next_obs"].items()}
            arrays = {
                k: _numbers(group[k], f"{where}/{k}") if k in group else None
                for k in ("rewards", "dones", "states", EXPERT_ACTIONS)
            }
        except OSError as err:
            raise UserError(f"{where}: cannot read data (truncated or corrupt?): {first_line(err)}") from None
        if len(actions) == 0:
            raise UserError(f"{where} has no steps (actions of length 0); expected at least one step per episode")
        if actions.ndim != 2 or actions.shape[1] != ACTION_DIM:
            width = actions.shape[1] if actions.ndim == 2 else actions.shape
            raise UserError(f"{where}/actions has width {width}, expected {ACTION_DIM}")
        steps = len(actions)
        for group_name, values in (("obs", obs), ("next_obs", next_obs)):
            state_from_obs(values, self.task, source=f"{where}/{group_name}")  # raises on missing/wrong-width keys
            for key in STATE_KEYS:
                if key in values and len(values[key]) != steps:
                    raise UserError(f"{where}/{group_name}/{key} has {len(values[key])} steps, expected {steps}")
        rewards = arrays["rewards"] if arrays["rewards"] is not None else np.zeros(steps, dtype=np.float32)
        dones = arrays["dones"] if arrays["dones"] is not None else np.zeros(steps, dtype=bool)
        states = arrays["states"] if arrays["states"] is not None else np.zeros((steps, 0), dtype=np.float64)
        for key, value in (("rewards", rewards), ("dones", dones), ("states", states)):
            if len(value) != steps:
                raise UserError(f"{where}/{key} has {len(value)} steps, expected {steps}")
        labels = arrays[EXPERT_ACTIONS]
        if labels is not None:
            labels = labels.astype(np.float32)
            if labels.shape != actions.shape:
                raise UserError(f"{where}/{EXPERT_ACTIONS} has shape {labels.shape}, expected {actions.shape} like actions")
        # What becomes dataset rows must be finite: a NaN would reach the Parquet rows and normalization.json.
        finite = {"actions": actions, EXPERT_ACTIONS: labels, "rewards": rewards,
                  **{f"{group_name}/{key}": values[key] for group_name, values in (("obs", obs), ("next_obs", next_obs))
                     for key in STATE_KEYS if key in values}}
        for key, value in finite.items():
            _check_finite(value, f"{where}/{key}")
        model_file = group.attrs.get("model_file", "")
        if isinstance(model_file, bytes):
            model_file = model_file.decode()
        return Episode(
            obs=obs,
            next_obs=next_obs,
            actions=actions,
            rewards=np.asarray(rewards, dtype=np.float32).reshape(steps),
            dones=np.asarray(dones).astype(bool).reshape(steps),
            states=np.asarray(states),
            model_file=str(model_file),
            name=name,
            expert_actions=labels,
        )


def _numbers(dataset: h5py.Dataset, where: str) -> np.ndarray:
    """An HDF5 dataset's values, refused unless stored as numbers (strings would be parsed silently, or not at all)."""
    if not isinstance(dataset, h5py.Dataset):
        raise UserError(f"{where} is a group, expected an array")
    if dataset.dtype.kind not in "biuf":
        raise UserError(f"{where} is stored as {dataset.dtype} ({dataset.dtype.kind!r} kind), expected numbers")
    return np.asarray(dataset[()])


def _check_finite(values: np.ndarray | None, where: str) -> None:
    if values is None or values.dtype.kind != "f":
        return
    bad = ~np.isfinite(values)
    if bad.any():
        step = int(np.argwhere(bad)[0][0])
        raise UserError(f"{where} holds NaN or inf (first at step {step}); expected finite numbers")


def _plain(value):
    """HDF5 attribute -> plain Python value (bytes decoded, numpy scalars/arrays unwrapped)."""
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()]
    return value


def read_robomimic_hdf5(path: str | os.PathLike) -> RobomimicFile:
    """Open and validate a robomimic HDF5 file (downloaded or generated); see `RobomimicFile`."""
    return RobomimicFile(path)
