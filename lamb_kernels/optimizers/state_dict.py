"""Loading a state dict: everything checked before anything is loaded, then every value placed as
the optimizer keeps it (state.py) before any of it replaces the optimizer's state."""
from __future__ import annotations

from .checks import check_number, param_label
from .declaration import check_group
from .plan_cache import tracked
from .state import check_entry, placed


def load_state_dict(opt, state_dict: dict, load_groups) -> None:
    """`state_dict` into `opt`: the saved groups' hyperparameters (as the constructor checks them)
    and the state entries the optimizer uses (tensors of their parameters' shapes, a numeric step
    count) checked first; other entries kept as torch.optim keeps them. `load_groups` is torch's
    loader, given the groups only: it would cast every state tensor to its parameter's dtype (bf16
    moments and masters for a bf16 model)."""
    declaration = opt.DECLARATION
    for group_index, saved in enumerate(state_dict["param_groups"]):
        hyper = {key: value for key, value in saved.items() if key not in ("params", "param_names")}
        check_group(declaration, {**opt.defaults, **hyper}, f"state_dict['param_groups'][{group_index}]: ")
    _check_saved_state(opt, state_dict)
    saved_groups = state_dict["param_groups"]
    if [len(g["params"]) for g in saved_groups] != [len(g["params"]) for g in opt.param_groups]:
        load_groups(state_dict)  # raises, explaining the mismatch, before any change
    # Every value is placed before anything changes: one that cannot be (a tensor with no data)
    # raises with the optimizer as it was.
    targets = {param_id: (p, group_index) for group_index, (saved_group, group) in
               enumerate(zip(saved_groups, opt.param_groups))
               for param_id, p in zip(saved_group["params"], group["params"])}
    states = {}
    configured = [group.get("state_dtype") for group in opt.param_groups]
    for param_id, saved in state_dict["state"].items():
        if param_id not in targets:
            states[param_id] = saved
            continue
        p, group_index = targets[param_id]
        capturable = saved_groups[group_index].get("capturable", opt.defaults.get("capturable"))
        states[p] = placed(declaration, p, saved, capturable, opt.param_groups[group_index])
    load_groups({**state_dict, "state": {}})
    # The states' dtypes are this optimizer's, whatever the checkpoint's (its states are converted).
    for group, state_dtype in zip(opt.param_groups, configured):
        if state_dtype is not None:
            group["state_dtype"] = state_dtype
    fill_defaults(opt)
    opt.state = tracked(opt.state)
    opt.state.update(states)
    opt._forget_checks()


def fill_defaults(opt) -> None:
    # Groups saved by an older version, by apex or by timm may lack hyperparameters added since.
    for group in opt.param_groups:
        for key, value in opt.defaults.items():
            group.setdefault(key, value)


def _check_saved_state(opt, state_dict: dict) -> None:
    declaration = opt.DECLARATION
    saved_groups = state_dict["param_groups"]
    if len(saved_groups) != len(opt.param_groups):
        return  # torch's load_state_dict explains this mismatch itself
    for group_index, (group, saved) in enumerate(zip(opt.param_groups, saved_groups)):
        if len(group["params"]) != len(saved["params"]):
            return
        for param_index, (p, param_id) in enumerate(zip(group["params"], saved["params"])):
            entry = state_dict["state"].get(param_id, {})
            where = f"state_dict['state'][{param_id}]"
            label = param_label(group_index, param_index, group)
            if not isinstance(entry, dict):
                raise TypeError(
                    f"{where} (for {label}) must be a dict of state entries, got {type(entry).__name__}")
            missing = [key for key in declaration.required if entry.get(key) is None]
            if entry and missing:
                raise ValueError(f"{where} (for {label}) has no {', '.join(map(repr, missing))}: a "
                                 f"{type(opt).__name__} state needs {', '.join(map(repr, declaration.required))}")
            for key in declaration.tensors:
                value = entry.get(key)
                if value is None:
                    continue
                check_entry(declaration, key, value, entry, f"{where}[{key!r}] (for {label})", placed=False)
                if value.shape != p.shape:
                    raise ValueError(
                        f"{where}[{key!r}] has shape {tuple(value.shape)}, but {label} has shape {tuple(p.shape)}"
                    )
            if "step" in entry:
                check_number("['step']", entry["step"], where, integral_tensor=True)

