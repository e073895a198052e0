"""Shared test fixtures: tiny synthetic robomimic files (our writer, and robomimic's own layout via raw h5py)."""

from __future__ import annotations

import json
import os
import sys
import sysconfig
import tempfile
import textwrap
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path

# Before anything imports `datasets`: its cache keys local folders by name, so tmp folders called
# "dataset" from an earlier run could be served instead of this run's. A cache of the session's own
# (inherited by subprocesses) keeps every run independent of what the machine has seen before.
os.environ["HF_DATASETS_CACHE"] = tempfile.mkdtemp(prefix="vla-tests-datasets-cache-")

import h5py
import numpy as np
import pytest

from data_prep.robomimic_io import Episode, write_robomimic_hdf5
from data_prep.tasks import get_task

os.environ.setdefault("OMP_NUM_THREADS", "1")  # tiny models: one thread each beats two fighting over 2 cores

ENV_NAMES = {"lift": "Lift", "can": "PickPlaceCan", "square": "NutAssemblySquare"}
REPO = Path(__file__).resolve().parent.parent


def project_top_level_names() -> list[str]:
    """The modules and packages the project installs (pyproject.toml), e.g. modeling_vla, data_prep."""
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    return [*setuptools["py-modules"], *(p.rstrip("*") for p in setuptools["packages"]["find"]["include"])]


def python_without_the_project(code: str) -> list[str]:
    """A command running `code` with this environment's interpreter and packages, where the project is NOT importable:
    -I (no script folder or working directory on sys.path, no PYTHON* variables) and -S (no site: neither the editable
    install's finder nor any .pth file), then only the site-packages folders. A saved model folder must then bring all
    of its code: transformers loads it from its modules cache, and a file missing from the folder fails."""
    paths = sysconfig.get_paths()
    prelude = textwrap.dedent(f"""
        import importlib.util, sys
        sys.path.extend({sorted({paths["purelib"], paths["platlib"]})!r})
        found = [m for m in {project_top_level_names()!r} if importlib.util.find_spec(m) is not None]
        assert not found, f"the project is importable here: {{found}}"
    """)
    return [sys.executable, "-I", "-S", "-c", prelude + textwrap.dedent(code)]


@pytest.fixture(autouse=True, scope="session")
def datasets_never_hash_tables() -> Iterator[None]:
    """Every `datasets.Dataset` built in-process (product code and test helpers) must be given a fingerprint.

    Without one, `datasets` dill-hashes the whole Arrow table: it reads every byte, and on the H200 image (Python
    3.12.3, pyarrow 25) it fails with a PicklingError on pyarrow's MonthDayNano (docs/SCALING.md), so a single
    missing fingerprint breaks training there. Subprocesses (the CLI tests) are not covered.
    """
    import datasets.arrow_dataset

    def refuse(*args: object, **kwargs: object) -> str:
        raise AssertionError("datasets was left to dill-hash a whole table: pass Dataset(..., fingerprint=...)")

    patch = pytest.MonkeyPatch()
    patch.setattr(datasets.arrow_dataset, "generate_fingerprint", refuse)
    yield
    patch.undo()


@pytest.fixture
def unwritable_folder(tmp_path: Path) -> Path:
    """A folder that refuses new entries to anyone: mode 0o555, or sysfs for root (who writes through file modes)."""
    if os.geteuid() == 0:
        return Path("/sys")
    folder = tmp_path / "read_only"
    folder.mkdir(mode=0o555)
    return folder


def synthetic_episode(task: str, steps: int, rng: np.random.Generator, success_steps: int = 3) -> Episode:
    """Random-walk observations in robomimic's key layout (plus a key the state ignores), sparse reward at the end."""
    widths = {"robot0_eef_pos": 3, "robot0_eef_quat": 4, "robot0_gripper_qpos": 2,
              "object": get_task(task).object_dim, "robot0_joint_pos": 7}
    trajectory = {k: np.cumsum(rng.normal(0, 0.01, size=(steps + 1, w)), axis=0) + rng.normal(0, 1, w)
                  for k, w in widths.items()}
    rewards = np.zeros(steps)
    rewards[-success_steps:] = 1.0
    dones = np.zeros(steps, dtype=np.int64)
    dones[-1] = 1
    return Episode(
        obs={k: v[:-1] for k, v in trajectory.items()},
        next_obs={k: v[1:] for k, v in trajectory.items()},
        actions=rng.uniform(-1, 1, size=(steps, 7)),
        rewards=rewards,
        dones=dones,
        states=rng.normal(size=(steps, 32)),
        model_file="<mujoco/>",
    )


def episode_lengths(episodes: int, steps: int) -> list[int]:
    return [steps + i % 3 for i in range(episodes)]  # unequal lengths catch off-by-one errors


@pytest.fixture(scope="session")
def make_robomimic_file(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Factory: a tiny robomimic file for `task` written by our writer (`write_robomimic_hdf5`)."""

    def make(task: str = "lift", episodes: int = 6, steps: int = 8, seed: int = 0, valid_fraction: float = 0.2) -> Path:
        rng = np.random.default_rng(seed)
        path = tmp_path_factory.mktemp(f"generated_{task}") / f"{task}_demo.hdf5"
        env_args = {"env_name": ENV_NAMES[task], "type": 1, "env_kwargs": {"control_freq": 20}}
        write_robomimic_hdf5(path, [synthetic_episode(task, n, rng) for n in episode_lengths(episodes, steps)],
                             env_args, valid_fraction=valid_fraction, seed=seed)
        return path

    return make


@pytest.fixture(scope="session")
def make_downloaded_style_file(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Factory: a file laid out exactly like robomimic's published low_dim_v15.hdf5, built with raw h5py.

    Deliberately not via our writer: extra obs keys, robomimic's env_args fields, extra filter keys
    (`20_percent`), int dones, float64 arrays, mask names as fixed-width byte strings.
    """

    def make(task: str = "can", episodes: int = 5, steps: int = 9, seed: int = 1, masks: bool = True) -> Path:
        rng = np.random.default_rng(seed)
        path = tmp_path_factory.mktemp(f"robomimic_{task}") / "low_dim_v15.hdf5"
        with h5py.File(path, "w") as f:
            data = f.create_group("data")
            total = 0
            for i, n in enumerate(episode_lengths(episodes, steps)):
                ep = synthetic_episode(task, n, rng)
                demo = data.create_group(f"demo_{i}")
                for group_name, obs in (("obs", ep.obs), ("next_obs", ep.next_obs)):
                    group = demo.create_group(group_name)
                    for key, value in obs.items():
                        group.create_dataset(key, data=value.astype(np.float64))
                    group.create_dataset("robot0_eef_vel_lin", data=rng.normal(size=(n, 3)))
                demo.create_dataset("actions", data=ep.actions.astype(np.float64))
                demo.create_dataset("rewards", data=ep.rewards.astype(np.float64))
                demo.create_dataset("dones", data=ep.dones.astype(np.int64))
                demo.create_dataset("states", data=ep.states)
                demo.attrs["num_samples"] = n
                demo.attrs["model_file"] = "<mujoco model='base'/>"
                total += n
            data.attrs["total"] = total
            data.attrs["env_args"] = json.dumps({
                "env_name": ENV_NAMES[task], "env_version": "1.5.1", "type": 1,
                "env_kwargs": {"has_renderer": False, "control_freq": 20, "robots": ["Panda"],
                               "controller_configs": {"type": "BASIC"}},
            })
            if masks:
                names = [f"demo_{i}" for i in range(episodes)]
                f.create_dataset("mask/train", data=np.array(names[1:], dtype="S"))
                f.create_dataset("mask/valid", data=np.array(names[:1], dtype="S"))
                f.create_dataset("mask/20_percent", data=np.array(names[:2], dtype="S"))
        return path

    return make
