"""The model-kind registry (model_kinds.py): one entry per kind, and the tables the rest of the project derives."""

from __future__ import annotations

import dataclasses
import importlib.util
import sys

import pytest

import train_accelerate as ta
from model_kinds import get_kind, kind_names, kind_of_type, kinds, model_types, register_kind
from pipeline import REPO_ROOT as REPO
from pipeline import SIZES, pipeline_policies


def test_the_project_registers_a_world_model_and_two_policies() -> None:
    assert kind_names() == ["world", "policy", "mlp"]
    assert [(k.name, k.role, k.action_column, k.horizon_field) for k in kinds()] == [
        ("world", "world", "action", "multi_step"),
        ("policy", "policy", "expert_action", "chunk_size"),
        ("mlp", "policy", "expert_action", "chunk_size"),
    ]
    assert model_types("policy") == ("vla_policy", "vla_mlp_policy") and model_types("world") == ("vla_world_model",)
    assert kind_of_type("vla_mlp_policy").model_class.__name__ == "MLPPolicy"


@pytest.mark.parametrize(("change", "message"), [
    ({}, "name 'mlp' is taken by kind 'mlp'"),
    ({"name": "mlp2"}, "model_type 'vla_mlp_policy' is taken by kind 'mlp'"),
    ({"name": "mlp2", "label": "vla"}, "label 'vla' is taken by kind 'policy'"),
    ({"name": "mlp2", "role": "critic"}, "role 'critic', expected one of"),
    ({"name": "mlp2", "label": ""}, "a policy needs a label"),
])
def test_a_kind_is_registered_once(change: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        register_kind(dataclasses.replace(get_kind("mlp"), **change))
    assert kind_names() == ["world", "policy", "mlp"]


def test_the_command_lines_read_their_choices_from_the_registry() -> None:
    assert ta.build_parser()._option_string_actions["--model"].choices == kind_names()
    spec = importlib.util.spec_from_file_location("benchmarks_policy_flags", REPO / "benchmarks" / "policy.py")
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # its dataclasses look the module up
    spec.loader.exec_module(module)
    args = module.build_parser().parse_args(["--dataset", "d", "--vla", "v", "--mlp", "m"])
    assert (str(args.vla), str(args.mlp), str(args.mlp_config)) == ("v", "m", get_kind("mlp").config)
    assert pipeline_policies(SIZES["quick"]) == ["policy", "mlp"]
