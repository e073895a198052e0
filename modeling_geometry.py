"""Pose geometry on states of the default layout: rot6 <-> rotation matrices, yaw, the relative-yaw features the
policies may read, and robosuite's object-to-eef formula (differentiable, so a world model can train through it).

Copied into saved model folders (trust_remote_code): imports only torch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

# Where the poses start in the default state layout (relative_yaw_harmonics and derive_relative_pose read them):
# the eef, then object slot 0 (each further slot repeats its 18 numbers, data_prep.tasks).
EEF_POS_OFFSET, EEF_ROT6_OFFSET, OBJECT_POS_OFFSET, OBJECT_ROT6_OFFSET = 0, 3, 11, 14
RELATIVE_POS_OFFSET, RELATIVE_ROT6_OFFSET = 20, 23  # the object-to-eef block
SLOT_DIM, MAX_SLOTS = 18, 4


def yaw_of_rot6(rot6: torch.Tensor) -> torch.Tensor:
    """Heading of a frame's x axis in the world xy-plane, from its rot6 (R00 R10 R20 | R01 R11 R21)."""
    return torch.atan2(rot6[..., 1], rot6[..., 0])


def relative_yaw_features(state: torch.Tensor, harmonics: Sequence[int], sawtooth: bool = False) -> torch.Tensor:
    """[cos k*d..., sin k*d...] for d = object yaw - gripper yaw, read from a raw state of the default layout;
    with sawtooth, then [wrap(k*d) / pi...] in (-1, 1].

    With k = 4 the nearest cube face is the sign of sin(4d): one smooth input where rot6 needed a sawtooth.
    The sawtooth itself is the turn to the nearest face (times k / pi), which the expert follows: a network can
    only blur a jump it must build from smooth inputs, and where the two nearest faces are equally near (the
    jump) a blurred turn goes either way or nowhere.
    """
    eef = yaw_of_rot6(state[..., EEF_ROT6_OFFSET : EEF_ROT6_OFFSET + 6])
    obj = yaw_of_rot6(state[..., OBJECT_ROT6_OFFSET : OBJECT_ROT6_OFFSET + 6])
    angles = (obj - eef).unsqueeze(-1) * torch.tensor(harmonics, dtype=state.dtype, device=state.device)
    cos, sin = angles.cos(), angles.sin()
    parts = [cos, sin, torch.atan2(sin, cos) / torch.pi] if sawtooth else [cos, sin]
    return torch.cat(parts, -1)


def layout_mask(state: torch.Tensor) -> torch.Tensor:
    """The state mask read off states of the default layout [..., 83]: 1 for the robot, for every entry of a filled
    object slot and 0 for an empty slot (all zeros), except a slot's relative rotation when it is all zeros (a cube's
    padding: a real rot6 has unit columns, never all zeros). Exactly `data_prep.tasks.state_mask` of the state's task
    (tests/test_tasks.py), so a policy given only a state masks it as it was trained (the mask depends on the scene,
    never on the goal)."""
    objects = state[..., OBJECT_POS_OFFSET:].unflatten(-1, (MAX_SLOTS, SLOT_DIM))
    rel = RELATIVE_ROT6_OFFSET - OBJECT_POS_OFFSET
    filled = (objects != 0).any(-1, keepdim=True).to(state.dtype)
    rotation = (objects[..., rel : rel + 6] != 0).any(-1, keepdim=True).to(state.dtype)
    slots = torch.cat([filled.expand(*filled.shape[:-1], rel), rotation.expand(*rotation.shape[:-1], 6)], -1)
    return torch.cat([torch.ones_like(state[..., :OBJECT_POS_OFFSET]), slots.flatten(-2)], -1)


def rot6_to_matrix(rot6: torch.Tensor) -> torch.Tensor:
    """6-D rotations [..., 6] -> rotation matrices [..., 3, 3] (Gram-Schmidt, so imagined columns need not be exact)."""
    col0 = rot6[..., 0:3] / rot6[..., 0:3].norm(dim=-1, keepdim=True).clamp(min=1e-12)
    col1 = rot6[..., 3:6] - (col0 * rot6[..., 3:6]).sum(-1, keepdim=True) * col0
    col1 = col1 / col1.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    return torch.stack([col0, col1, torch.linalg.cross(col0, col1, dim=-1)], dim=-1)


def _slot(state: torch.Tensor, offset: int, width: int) -> torch.Tensor:
    return state[..., offset : offset + width]


def relative_pose_from_poses(states: torch.Tensor, prev_states: torch.Tensor, eef_frame: torch.Tensor) -> torch.Tensor:
    """Raw states of the default layout with every object slot's object-to-eef block recomputed from the poses.

    eef_frame (bool, broadcast over the rows) picks robosuite's rule per row (RELATIVE_POSE_FRAMES): True,
    "eef_lagged" (Can, Square, nuts, bins): R_eef^T (p_obj - p_eef) and R_eef^T R_obj, with the object pose of
    `prev_states` (robosuite's sensors read the object from the observation cache before updating it); False, "world"
    (Lift, cubes): p_obj - p_eef in the world frame, same step, the relative-rotation slots left as they are (padding).
    Empty slots come out as garbage: the caller's state mask zeroes them. Differentiable, so a world model can train
    through it.
    """
    robot = OBJECT_POS_OFFSET
    objects = states[..., robot:].unflatten(-1, (MAX_SLOTS, SLOT_DIM))  # [..., slots, 18]
    prev_objects = prev_states[..., robot:].unflatten(-1, (MAX_SLOTS, SLOT_DIM))
    eef_pos = _slot(states, EEF_POS_OFFSET, 3).unsqueeze(-2)  # [..., 1, 3]
    eef_rot = rot6_to_matrix(_slot(states, EEF_ROT6_OFFSET, 6)).unsqueeze(-3)  # [..., 1, 3, 3]
    pos, rot6 = OBJECT_POS_OFFSET - robot, OBJECT_ROT6_OFFSET - robot
    rel_pos, rel_rot6 = RELATIVE_POS_OFFSET - robot, RELATIVE_ROT6_OFFSET - robot
    world = _slot(objects, pos, 3) - eef_pos
    offset = _slot(prev_objects, pos, 3) - eef_pos
    in_eef = (eef_rot.transpose(-1, -2) @ offset.unsqueeze(-1)).squeeze(-1)
    rotation = eef_rot.transpose(-1, -2) @ rot6_to_matrix(_slot(prev_objects, rot6, 6))
    rotation6 = torch.cat([rotation[..., :, 0], rotation[..., :, 1]], dim=-1)
    eef_frame = torch.as_tensor(eef_frame, dtype=torch.bool, device=states.device)[..., None, None]
    block = torch.cat([torch.where(eef_frame, in_eef, world),
                       torch.where(eef_frame, rotation6, _slot(objects, rel_rot6, 6))], dim=-1)
    objects = torch.cat([objects[..., :rel_pos], block, objects[..., rel_rot6 + 6 :]], dim=-1)
    return torch.cat([states[..., :robot], objects.flatten(-2)], dim=-1)
