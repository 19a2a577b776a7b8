"""A stateful property test: hypothesis interleaves steps with what users do to an optimizer between
steps, and checks after every step what a drop-in for torch.optim must guarantee:

- a mistake (a group dict given twice, a parameter of another shape or with its storage freed, an
  integer or view-with-gaps state entry, a hyperparameter out of range or of the wrong type, in the
  constructor, in a group or in a checkpoint, a parameter given twice) is refused with a ValueError
  or TypeError, and every parameter and state tensor is bit for bit as it was;
- anything else steps exactly as a freshly built optimizer, given the same parameters, groups, grads
  and state, steps on its full path (the steady loop's reused plans included), and within the
  float64 reference's tolerance of one step from that state (float32 states).

Every rule is followed by a step and these checks. A mistake comes with the edit that puts it right:
the step must be refused, and is taken again once it is put right. CI runs the "ci" profile (derandomized, a fixed budget);
``pytest tests/test_stateful.py --hypothesis-profile=thorough`` draws many more, with a fresh seed.
"""
import copy
import functools
import math

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis", reason="hypothesis comes with the test extra: pip install -e '.[test]'")
from hypothesis import settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule  # noqa: E402

from harness import rel_error  # noqa: E402
from lamb_float64 import Float64LAMB  # noqa: E402
from lars_float64 import Float64LARS  # noqa: E402
from lamb_kernels import FusedLAMB, FusedLARS, available_backends  # noqa: E402
from tolerances import ELEMENT_ATOL, PARAM_RTOL  # noqa: E402

SHAPES = [(5,), (3, 4), (300,)]  # (300,): a partial 256-element block of 8-bit states
OPTIMIZERS = {
    "lamb": (FusedLAMB, dict(lr=0.01, weight_decay=0.01), "exp_avg"),
    "lars": (FusedLARS, dict(lr=0.1, momentum=0.9, weight_decay=1e-4), "momentum_buffer"),
}
STATE_DTYPES = [torch.float32, torch.bfloat16, "int8"]
REFUSED = (ValueError, TypeError)

# Edits of a group that the step must refuse: (key, value) for either optimizer.
BAD_GROUP_EDITS = [
    ("lr", -1.0), ("lr", "0.1"), ("lr", torch.tensor(1, dtype=torch.uint8)), ("lr", torch.tensor(True)),
    ("lr", torch.ones(2)), ("weight_decay", -0.1), ("eps", math.nan), ("capturable", "False"),
    ("state_dtype", "int4"), ("seed", -1),
]
BAD_LAMB_EDITS = [("betas", (1.0, 0.999)), ("betas", (0.9,)), ("max_grad_norm", "1")]
BAD_LARS_EDITS = [("momentum", -0.9), ("nesterov", "yes"), ("dampening", -0.1)]
GOOD_GROUP_EDITS = [("lr", 0.02), ("lr", torch.tensor(0.05)), ("weight_decay", 0.0), ("weight_decay", 0.05)]
BAD_CONSTRUCTOR_ARGUMENTS = [{"lr": -1.0}, {"capturable": "False"}, {"master_weights": "no"},
                             {"lr": torch.tensor(1, dtype=torch.int32)}, {"state_dtype": torch.float16},
                             {"weight_decay": "0.1"}, {"backend": "nonesuch"}]

# The budget per profile and backend: examples, and rules (each with its step) per example. The
# interpreted Triton kernels cost about thirty times the others' steps: CI draws few of theirs.
BUDGETS = {"ci": {"triton": (1, 4), None: (10, 20)}, "thorough": {"triton": (3, 10), None: (60, 30)}}


def storage_freed(t: torch.Tensor) -> bool:
    return t.numel() > 0 and t.untyped_storage().nbytes() < (t.storage_offset() + t.numel()) * t.element_size()


def copy_of(t):
    """A copy with t's strides (so a layout is kept), or t itself when it is no tensor."""
    if not torch.is_tensor(t):
        return copy.deepcopy(t)
    return torch.empty_strided(t.size(), t.stride(), dtype=t.dtype, device=t.device).copy_(t.detach())


def same_bits(a, b) -> bool:
    if not torch.is_tensor(a):
        return a == b
    return (torch.is_tensor(b) and a.dtype == b.dtype and a.shape == b.shape
            and torch.equal(a.detach().reshape(-1).view(torch.uint8), b.detach().reshape(-1).view(torch.uint8)))


def then_step(rule_function):
    """A rule followed by a step and its checks."""
    @functools.wraps(rule_function)
    def rule_then_step(self, *args, **kwargs):
        rule_function(self, *args, **kwargs)
        self.step_and_check()
    return rule_then_step


class OptimizerMachine(RuleBasedStateMachine):
    """One optimizer on three parameters in two groups, and what a user does to it between steps;
    a subclass per optimizer, backend and state dtype (below) says which."""

    kind, backend, state_dtype = "lamb", "torch", torch.float32

    # -- building -----------------------------------------------------------------------------

    @initialize(seed=st.integers(0, 2**16))
    def build(self, seed):
        kind, backend, state_dtype = self.kind, self.backend, self.state_dtype
        self.cls, self.options, self.key = OPTIMIZERS[kind]
        self.gen = torch.Generator().manual_seed(seed)
        self.params = [torch.nn.Parameter(torch.randn(shape, generator=self.gen)) for shape in SHAPES]
        groups = [{"params": self.params[:2]}, {"params": self.params[2:], "weight_decay": 0.0}]
        self.opt = self.cls(groups, backend=backend, state_dtype=state_dtype, **self.options)
        self.repairs = []  # per mistake made and not yet taken back, the edit that takes it back
        self.steps = self.refusals = 0
        self.draw_grads()

    def draw_grads(self, absent=(), transposed=False):
        for index, p in enumerate(self.params):
            g = torch.randn(p.shape, generator=self.gen)
            if transposed and g.dim() == 2:  # the same values laid out unlike the parameter
                g = g.t().contiguous().t()
            p.grad = None if index in absent else g

    # -- checks -------------------------------------------------------------------------------

    def snapshot(self):
        params = [None if storage_freed(p) else copy_of(p) for p in self.params]
        state = {i: {k: "freed" if torch.is_tensor(v) and storage_freed(v) else copy_of(v)
                     for k, v in self.opt.state[p].items()}
                 for i, p in enumerate(self.params) if p in self.opt.state}
        return params, state

    def assert_unchanged(self, before):
        params, state = self.snapshot()
        assert all(a is None or b is None or same_bits(a, b) for a, b in zip(before[0], params))
        assert before[1].keys() == state.keys()
        for i, entries in before[1].items():
            assert entries.keys() == state[i].keys(), i
            for k, v in entries.items():
                assert v == "freed" or same_bits(v, state[i][k]), (i, k)

    def refused(self, action):
        """`action` must raise a ValueError or TypeError and change nothing."""
        before = self.snapshot()
        with pytest.raises(REFUSED):
            action()
        self.assert_unchanged(before)
        self.refusals += 1

    def fresh_copy(self):
        """A new optimizer with copies of the parameters (their grads), groups and state: its first
        step takes the full path, with every check."""
        copies = {}
        for p in self.params:
            q = torch.nn.Parameter(copy_of(p))
            q.grad = None if p.grad is None else copy_of(p.grad)
            copies[id(p)] = q
        groups = [{**{k: copy_of(v) for k, v in g.items() if k != "params"},
                   "params": [copies[id(p)] for p in g["params"]]} for g in self.opt.param_groups]
        fresh = self.cls(groups, backend=self.backend, master_weights=self.opt.master_weights)
        for p in self.params:
            if p in self.opt.state:
                fresh.state[copies[id(p)]] = {k: copy_of(v) for k, v in self.opt.state[p].items()}
        return fresh, copies

    def float64_reference(self):
        """One float64 step from the optimizer's current parameters and float32 state."""
        groups, grads = [], []
        for g in self.opt.param_groups:
            hyper = {k: float(v) if torch.is_tensor(v) else v for k, v in g.items() if k != "params"}
            groups.append({**hyper, "params": list(g["params"])})
            grads.append([p.grad for p in g["params"]])
        ref = (Float64LAMB if self.kind == "lamb" else Float64LARS)(groups)
        for gi, g in enumerate(self.opt.param_groups):
            for pi, p in enumerate(g["params"]):
                entries = self.opt.state.get(p)
                if not entries:
                    continue
                if self.kind == "lamb":
                    ref.state[(gi, pi)] = {"step": int(entries["step"]), "exp_avg": entries["exp_avg"].double(),
                                           "exp_avg_sq": entries["exp_avg_sq"].double()}
                elif "momentum_buffer" in entries:
                    ref.state[(gi, pi)] = entries["momentum_buffer"].double()
        ref.step(grads)
        return ref

    def assert_near(self, actual, expected):
        close = torch.allclose(actual.double(), expected, rtol=0, atol=ELEMENT_ATOL)
        assert close or rel_error(actual, expected) <= PARAM_RTOL, rel_error(actual, expected)

    # -- the step -----------------------------------------------------------------------------

    def step_and_check(self):
        if self.repairs:  # refused; then each mistake taken back, and the step taken
            self.refused(self.opt.step)
            while self.repairs:
                self.repairs.pop()()
        fresh, copies = self.fresh_copy()
        ref = self.float64_reference() if self.state_dtype == torch.float32 else None
        self.opt.step()
        fresh.step()
        self.steps += 1
        for p in self.params:
            q = copies[id(p)]
            assert same_bits(p, q)
            assert (p in self.opt.state) == (q in fresh.state)
            entries = self.opt.state.get(p, {})
            assert entries.keys() == fresh.state.get(q, {}).keys()
            for k, v in entries.items():
                assert same_bits(v, fresh.state[q][k]), k
        if ref is None:
            return
        for gi, g in enumerate(self.opt.param_groups):
            for pi, p in enumerate(g["params"]):
                if p.grad is None:
                    continue
                self.assert_near(p, ref.groups[gi]["params"][pi])
                if self.kind == "lamb":
                    self.assert_near(self.opt.state[p]["exp_avg"], ref.state[(gi, pi)]["exp_avg"])
                    self.assert_near(self.opt.state[p]["exp_avg_sq"], ref.state[(gi, pi)]["exp_avg_sq"])
                elif "momentum_buffer" in self.opt.state[p]:
                    self.assert_near(self.opt.state[p]["momentum_buffer"], ref.state[(gi, pi)])

    # -- what a user does (each rule is followed by `step_and_check`) --------------------------------

    @rule()
    @then_step
    def step(self):
        """Nothing between two steps: the steady loop, whose plans are reused."""

    # (While a mistake waits to be refused, nothing that could undo it by the way: a new grad would
    # replace a bad one.)
    @rule(absent=st.sets(st.integers(0, len(SHAPES) - 1), max_size=2), transposed=st.booleans())
    @then_step
    def new_grads(self, absent, transposed):
        self.draw_grads(absent, transposed)

    @rule(edit=st.sampled_from(GOOD_GROUP_EDITS), group=st.integers(0, 1))
    @then_step
    def edit_group(self, edit, group):
        key, value = edit
        if group < len(self.opt.param_groups):
            self.opt.param_groups[group][key] = copy_of(value)

    @rule(index=st.integers(0, len(SHAPES) - 1))
    @then_step
    def relayout_parameter(self, index):
        p = self.params[index]
        if p.dim() == 2:  # the same values in another memory layout: the state follows it
            p.data = p.data.t().contiguous().t()

    @rule(index=st.integers(0, len(SHAPES) - 1), dtype=st.sampled_from([torch.float32, torch.bfloat16]))
    @then_step
    def replace_state_entry(self, index, dtype):
        """A state entry set by hand to a float copy of itself: converted to the group's storage."""
        entries = self.opt.state.get(self.params[index])
        if entries and self.key in entries and entries[self.key].is_floating_point():
            entries[self.key] = entries[self.key].to(dtype)

    @rule()
    @then_step
    def load_own_state_dict(self):
        self.opt.load_state_dict(copy.deepcopy(self.opt.state_dict()))

    @rule()
    @then_step
    def add_group(self):
        p = torch.nn.Parameter(torch.randn(6, generator=self.gen))
        p.grad = torch.randn(6, generator=self.gen)
        self.opt.add_param_group({"params": [p]})
        self.params.append(p)

    @rule(set_to_none=st.booleans())
    @then_step
    def zero_grad(self, set_to_none):
        self.opt.zero_grad(set_to_none=set_to_none)

    # -- mistakes refused where they are made ------------------------------------------------------

    @rule(arguments=st.sampled_from(BAD_CONSTRUCTOR_ARGUMENTS))
    @then_step
    def construct_badly(self, arguments):
        with pytest.raises(REFUSED):
            self.cls([torch.nn.Parameter(torch.randn(3))], **{**self.options, **arguments})

    @rule(index=st.integers(0, len(SHAPES) - 1))
    @then_step
    def add_a_parameter_again(self, index):
        groups = len(self.opt.param_groups)
        self.refused(lambda: self.opt.add_param_group({"params": [self.params[index]]}))
        assert len(self.opt.param_groups) == groups

    @rule(index=st.integers(0, len(SHAPES) - 1), how=st.sampled_from(["int32", "shape", "string"]))
    @then_step
    def load_bad_state_dict(self, index, how):
        saved = copy.deepcopy(self.opt.state_dict())
        entries = saved["state"].get(index)
        if not entries or self.key not in entries:
            return
        entry = entries[self.key]
        entries[self.key] = {"int32": entry.to(torch.int32), "shape": entry.reshape(-1)[:1], "string": "m"}[how]
        self.refused(lambda: self.opt.load_state_dict(saved))

    # -- mistakes the next step must refuse (each with the edit that takes it back) -----------------

    @rule(how=st.sampled_from(["append", "insert", "overwrite"]))
    @then_step
    def duplicate_group(self, how):
        groups = self.opt.param_groups
        kept = list(groups)
        {"append": lambda: groups.append(groups[0]), "insert": lambda: groups.insert(0, groups[-1]),
         "overwrite": lambda: groups.__setitem__(-1, groups[0])}[how]()
        self.repairs.append(lambda: groups.__setitem__(slice(None), kept))

    @rule(edit=st.sampled_from(BAD_GROUP_EDITS + BAD_LAMB_EDITS + BAD_LARS_EDITS), group=st.integers(0, 1))
    @then_step
    def edit_group_badly(self, edit, group):
        key, value = edit
        if (key, value) in BAD_LAMB_EDITS and self.kind != "lamb" or (key, value) in BAD_LARS_EDITS and self.kind != "lars":
            return
        g = self.opt.param_groups[group % len(self.opt.param_groups)]
        had, old = key in g, g.get(key)
        g[key] = value
        self.repairs.append(lambda: g.__setitem__(key, old) if had else g.pop(key))

    @rule(index=st.integers(0, len(SHAPES) - 1))
    @then_step
    def parameter_of_another_shape(self, index):
        p = self.params[index]
        entries = self.opt.state.get(p)
        if not entries or not any(torch.is_tensor(v) and v.shape == p.shape for v in entries.values()):
            return  # (no state yet: a parameter of another shape is a new parameter, as in torch.optim)
        old = p.data
        p.data = torch.randn(p.numel() + 1, generator=self.gen)
        p.grad = torch.randn(p.numel(), generator=self.gen)
        self.repairs.append(lambda: (setattr(p, "data", old), setattr(p, "grad", torch.zeros_like(old))))

    @rule(index=st.integers(0, len(SHAPES) - 1), what=st.sampled_from(["param", "state"]))
    @then_step
    def free_storage(self, index, what):
        p = self.params[index]
        t = p if what == "param" else self.opt.state.get(p, {}).get(self.key)
        if t is None or storage_freed(t) or p.grad is None:
            return  # (a parameter without a grad is not stepped, nor looked at, as in torch.optim)
        kept = copy_of(t)
        t.untyped_storage().resize_(0)  # as FSDP-like code frees an unsharded parameter

        def allocate_again():
            t.untyped_storage().resize_(kept.untyped_storage().nbytes())
            t.detach().copy_(kept)
        self.repairs.append(allocate_again)

    @rule(index=st.integers(0, len(SHAPES) - 1), how=st.sampled_from(["int32", "gaps"]))
    @then_step
    def set_state_entry_badly(self, index, how):
        p = self.params[index]
        entries = self.opt.state.get(p)
        if not entries or not torch.is_tensor(entries.get(self.key)) or storage_freed(entries[self.key]) or p.grad is None:
            return
        kept = entries[self.key]
        if how == "int32":
            entries[self.key] = torch.ones(kept.shape, dtype=torch.int32)
        elif kept.dtype in (torch.int8, torch.uint8) and kept.dim() == 1:  # codes read from a view with gaps
            spaced = torch.zeros(2 * kept.numel(), dtype=kept.dtype)
            spaced[::2] = kept
            entries[self.key] = spaced.as_strided(kept.shape, (2,))
        else:
            return
        self.repairs.append(lambda: entries.__setitem__(self.key, kept))

    @invariant()
    def groups_hold_only_known_keys(self):
        """No key of torch's own (``differentiable``) appears in a group after a load or an added group."""
        for g in self.opt.param_groups:
            assert "differentiable" not in g


def _machines():
    """A TestCase per (optimizer, backend, state dtype), each with the current profile's budget."""
    budgets = BUDGETS.get(settings.get_current_profile_name(), BUDGETS["ci"])
    for kind in sorted(OPTIMIZERS):
        for backend in available_backends("cpu"):
            for state_dtype in STATE_DTYPES:
                dtype_name = str(state_dtype).replace("torch.", "")
                machine = type(f"{kind}_{backend}_{dtype_name}", (OptimizerMachine,),
                               dict(kind=kind, backend=backend, state_dtype=state_dtype))
                case = machine.TestCase
                examples, rules = budgets.get(backend, budgets[None])
                case.settings = settings(settings.default, max_examples=examples, stateful_step_count=rules)
                yield machine.__name__, machine
                yield f"Test_{kind}_{backend}_{dtype_name}", case


globals().update(_machines())


def test_found_a_scratch_buffer_of_an_old_layout():
    """What the machine found first: the torch backend kept a parameter's scratch buffer across a
    change of the parameter's memory layout, and the norms of the updates it held rounded otherwise
    than a new optimizer's (a bit of the parameter, after many groups and a load)."""
    machine = lamb_torch_float32()
    machine.build(seed=16)
    for _ in range(12):
        machine.add_group()
    machine.load_own_state_dict()
    machine.relayout_parameter(index=1)
