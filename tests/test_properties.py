"""Property-based tests: hypothesis draws whole training scenarios (shapes with zero sizes, odd sizes
and chunk edges; memory layouts; dtypes with master weights; param groups; hyperparameters; grads
that come and go) and what a user does between steps (a new lr, a state-dict round trip, a parameter
moved to another layout; and the mistakes: a bad hyperparameter, a bad grad, a parameter of another
shape, a parameter given twice). Every backend runs each scenario, and must

- match the float64 reference (params or their fp32 masters, every state tensor, step counts),
- agree with the other backends,
- refuse each mistake with an error before anything changes, and carry on once it is put right.

CI runs a fixed set of examples (the "ci" profile in conftest.py: derandomized, a fixed budget);
``pytest tests/test_properties.py --hypothesis-profile=thorough`` draws many more.
"""
import copy
import math

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis", reason="hypothesis comes with the test extra: pip install -e '.[test]'")
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from lamb_float64 import APEX_DEFAULTS, Float64LAMB  # noqa: E402
from lars_float64 import TIMM_DEFAULTS, Float64LARS  # noqa: E402
from lamb_kernels import FusedLAMB, FusedLARS, available_backends  # noqa: E402
from tolerances import ELEMENT_ATOL, PARAM_RTOL  # noqa: E402

# Chunk edges: 8192 elements per program in the interpreted Triton kernels, 16384 per C++ chunk and
# per row of the torch backend's long sums of squares.
SHAPES = [(), (0,), (1,), (3,), (7, 5), (3, 0, 2), (2, 3, 4), (2, 3, 2, 2), (8191,), (8193,), (16385,), (3, 5, 7, 2)]
LAYOUTS = ["contiguous", "channels_last", "transposed", "strided"]
STEPS = 3


def lamb_hyper():
    return st.fixed_dictionaries({
        "lr": st.sampled_from([1e-3, 0.05]),
        "weight_decay": st.sampled_from([0.0, 0.01, 0.1]),
        "betas": st.sampled_from([(0.9, 0.999), (0.5, 0.9)]),
        "eps": st.sampled_from([1e-6, 1e-8]),
        "max_grad_norm": st.sampled_from([None, 1.0, 0.05, float("inf")]),
        "adam_w_mode": st.booleans(),
        "grad_averaging": st.booleans(),
        "bias_correction": st.booleans(),
        "use_nvlamb": st.booleans(),
        "trust_ratio_bounds": st.sampled_from([None, (0.5, 2.0)]),
        "layer_adaptation": st.sampled_from([None, True, False]),
    })


@st.composite
def lars_hyper(draw):
    momentum = draw(st.sampled_from([0.0, 0.9]))
    nesterov = momentum > 0 and draw(st.booleans())
    return {
        "lr": draw(st.sampled_from([0.01, 0.1])),
        "momentum": momentum,
        "dampening": 0.0 if nesterov else draw(st.sampled_from([0.0, 0.1])),
        "weight_decay": draw(st.sampled_from([0.0, 1e-4, 0.1])),
        "nesterov": nesterov,
        "trust_coeff": draw(st.sampled_from([0.001, 0.02])),
        "eps": draw(st.sampled_from([1e-8, 1e-3])),
        "trust_clip": draw(st.booleans()),
        "always_adapt": draw(st.booleans()),
        "layer_adaptation": draw(st.sampled_from([None, True, False])),
    }


@st.composite
def param_specs(draw, strided_ok):
    shape = draw(st.sampled_from(SHAPES))
    # Mostly contiguous, as most models are; each other layout where the shape allows it.
    layouts = ["contiguous"] * 3 + [layout for layout, ok in (
        ("channels_last", len(shape) == 4),
        ("transposed", len(shape) >= 2),
        ("strided", strided_ok and len(shape) >= 1 and math.prod(shape) > 0 and shape[-1] > 1)) if ok]
    return {"shape": shape, "layout": draw(st.sampled_from(layouts)),
            "dtype": draw(st.sampled_from([torch.float32, torch.float32, torch.bfloat16]))}


MUTATIONS = ["lr", "state_dict", "relayout", "add_group", "bad_hyper", "bad_grad", "reshape", "duplicate"]


@st.composite
def scenarios(draw):
    lamb = draw(st.booleans())
    hyper = lamb_hyper() if lamb else lars_hyper()
    # One scenario in five may hold a parameter with gaps in memory, which only the torch backend takes.
    specs = param_specs(strided_ok=draw(st.sampled_from([True, False, False, False, False])))
    groups = draw(st.lists(st.fixed_dictionaries({"params": st.lists(specs, min_size=1, max_size=3),
                                                  "hyper": hyper}), min_size=1, max_size=2))
    n_params = sum(len(group["params"]) for group in groups)
    return {
        "lamb": lamb,
        "groups": groups,
        "seed": draw(st.integers(0, 2**16)),
        # Per step and parameter: does it get a grad? (Mostly yes.)
        "has_grad": draw(st.lists(st.lists(st.sampled_from([True, True, True, False]), min_size=n_params,
                                           max_size=n_params), min_size=STEPS, max_size=STEPS)),
        # After which step a user does what (a step index can come twice).
        "mutations": draw(st.lists(st.tuples(st.integers(0, STEPS - 2), st.sampled_from(MUTATIONS)), max_size=3)),
    }


def laid_out(values: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "channels_last":
        return values.contiguous(memory_format=torch.channels_last)
    if layout == "transposed":  # dense, but not contiguous
        return values.mT.contiguous().mT
    if layout == "strided":  # every other element of a wider tensor: not dense
        wide = torch.zeros(*values.shape[:-1], 2 * values.shape[-1], dtype=values.dtype)
        return wide[..., ::2].copy_(values)
    return values.clone()


class Run:
    """One backend's run of a scenario, beside the float64 reference."""

    def __init__(self, scenario, backend):
        self.scenario, self.backend = scenario, backend
        gen = torch.Generator().manual_seed(scenario["seed"])
        self.specs = [spec for group in scenario["groups"] for spec in group["params"]]
        values = [torch.randn(spec["shape"], generator=gen).to(spec["dtype"]) for spec in self.specs]
        self.params = [torch.nn.Parameter(laid_out(v, spec["layout"])) for v, spec in zip(values, self.specs)]
        groups, ref_groups, first = [], [], 0
        self.group_sizes = [len(group["params"]) for group in scenario["groups"]]
        for group in scenario["groups"]:
            count = len(group["params"])
            groups.append({"params": self.params[first:first + count], **group["hyper"]})
            ref_groups.append({"params": values[first:first + count], **group["hyper"]})
            first += count
        self.optimizer_class = FusedLAMB if scenario["lamb"] else FusedLARS
        self.opt = self.optimizer_class(groups, backend=backend, master_weights=True)
        self.reference = (Float64LAMB if scenario["lamb"] else Float64LARS)(ref_groups)
        self.ref_counts = [0] * len(self.params)

    # -- the step, and what a user does between steps ---------------------------------------------

    def step(self, index):
        gen = torch.Generator().manual_seed(self.scenario["seed"] * 7 + index)
        has_grad = self.scenario["has_grad"][index] + [True] * (len(self.params) - len(self.specs))
        grads = [torch.randn(p.shape, generator=gen).to(p.dtype) if has else None
                 for p, has in zip(self.params, has_grad)]
        for p, g in zip(self.params, grads):
            p.grad = g
        self.opt.step()
        per_group, first = [], 0
        for size in self.group_sizes:
            per_group.append(grads[first:first + size])
            first += size
        self.reference.step(per_group)
        self.ref_counts = [c + (g is not None) for c, g in zip(self.ref_counts, grads)]

    def mutate(self, kind, index):
        """A change between steps: handled (the reference mirrors it), or a mistake that must be
        refused before any change, after which the mistake is undone."""
        p = self.params[index % len(self.params)]
        if kind == "lr":
            for group, ref_group in zip(self.opt.param_groups, self.reference.groups):
                group["lr"] = ref_group["lr"] = ref_group["lr"] * 0.5
        elif kind == "state_dict":
            saved = copy.deepcopy(self.opt.state_dict())
            self.opt = self.optimizer_class([dict(group) for group in self.opt.param_groups], backend=self.backend,
                                            master_weights=True)
            self.opt.load_state_dict(saved)
        elif kind == "add_group":  # a new parameter, in a group of its own with a smaller lr
            values = torch.randn(5, generator=torch.Generator().manual_seed(index))
            hyper = dict(self.scenario["groups"][0]["hyper"], lr=self.scenario["groups"][0]["hyper"]["lr"] / 4)
            self.params.append(torch.nn.Parameter(values.clone()))
            self.opt.add_param_group({"params": [self.params[-1]], **hyper})
            defaults = APEX_DEFAULTS if self.scenario["lamb"] else TIMM_DEFAULTS
            self.reference.groups.append({**defaults, **hyper, "params": [values.double()]})
            self.group_sizes.append(1)
            self.ref_counts.append(0)
        elif kind == "relayout":
            if p.dim() == 4:
                layout = torch.contiguous_format if p.is_contiguous(memory_format=torch.channels_last) \
                    else torch.channels_last
                p.data = p.data.contiguous(memory_format=layout)
            elif p.dim() >= 2 and p.is_contiguous():
                p.data = laid_out(p.data, "transposed")
            else:
                p.data = p.data.contiguous()  # (a strided parameter becomes dense)
        elif kind == "bad_hyper":
            group = self.opt.param_groups[0]
            name, bad = ("betas", (0.9,)) if self.scenario["lamb"] else ("momentum", "0.9")
            good, group[name] = group[name], bad
            self.expect_refusal((TypeError, ValueError), rf"param_groups\[0\]: {name} must be")
            group[name] = good
        elif kind == "bad_grad":
            for q in self.params:
                q.grad = torch.zeros(q.shape, dtype=q.dtype)
            p.grad.data = torch.zeros(p.numel() + 1, dtype=p.dtype)  # (torch refuses it as p.grad)
            self.expect_refusal(ValueError, r"grad of param_groups\[\d\]\['params'\]\[\d\] has shape")
        elif kind == "reshape":
            if p not in self.opt.state or not self.opt.state[p]:
                return  # no state yet: another shape is a new parameter, nothing to refuse
            data, p.data = p.data, torch.zeros(p.numel() + 2, dtype=p.dtype)
            for q in self.params:
                q.grad = torch.zeros(q.shape, dtype=q.dtype)
            self.expect_refusal(ValueError, r"optimizer state of param_groups\[\d\]\['params'\]\[\d\].*does not fit")
            p.data = data
        elif kind == "duplicate":
            self.opt.param_groups[-1]["params"].append(p)
            self.expect_refusal(ValueError, r"(is param_groups\[\d\]\['params'\]\[\d\] again|appear in more than one parameter group)")
            self.opt.param_groups[-1]["params"].pop()
        for q in self.params:
            q.grad = None

    def expect_refusal(self, error, match):
        before = self.snapshot()
        with pytest.raises(error, match=match):
            self.opt.step()
        after = self.snapshot()
        assert len(before) == len(after)
        for a, b in zip(before, after):
            assert a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)

    def snapshot(self):
        tensors = [p.detach().clone() for p in self.params]
        for p in self.params:
            for key, value in sorted(self.opt.state.get(p, {}).items()):
                if torch.is_tensor(value):
                    tensors.append(value.clone())
        return tensors

    # -- the results ------------------------------------------------------------------------------

    def results(self):
        """Per parameter: the fp32 weights the step updates (masters for bf16), and its fp32 states."""
        out = []
        for p in self.params:
            state = self.opt.state.get(p, {})
            weights = state.get("master_param", p.detach())
            if "master_param" in state:  # the model's bf16 parameter is its master, rounded
                assert torch.equal(p.detach(), state["master_param"].to(p.dtype))
            states = {key: state[key] for key in ("exp_avg", "exp_avg_sq", "momentum_buffer") if key in state}
            out.append((weights.float().contiguous(), {k: v.contiguous() for k, v in states.items()},
                        float(state["step"]) if "step" in state else None))
        return out


def assert_close(actual, expected, where):
    actual = actual.double()
    err = float((actual - expected).norm())
    bound = PARAM_RTOL * float(expected.norm()) + ELEMENT_ATOL * expected.numel() ** 0.5
    assert err <= bound, f"{where}: error {err:.3e} above {bound:.3e}"


def check_against_reference(run):
    ref_params = [p for group in run.reference.groups for p in group["params"]]
    ref_states, flat = [], 0
    for gi, group in enumerate(run.reference.groups):
        for pi in range(len(group["params"])):
            ref_states.append(run.reference.state.get((gi, pi)))
            flat += 1
    for i, ((weights, states, step), ref_p, ref_state, count) in enumerate(
            zip(run.results(), ref_params, ref_states, run.ref_counts)):
        where = f"{run.backend}: param {i} {run.specs[i] if i < len(run.specs) else '(added)'}"
        assert_close(weights, ref_p, where)
        if run.scenario["lamb"]:
            assert (step or 0.0) == count, where
            if count:
                assert_close(states["exp_avg"], ref_state["exp_avg"], where + " exp_avg")
                assert_close(states["exp_avg_sq"], ref_state["exp_avg_sq"], where + " exp_avg_sq")
        elif ref_state is not None:
            assert_close(states["momentum_buffer"], ref_state, where + " momentum_buffer")
        else:
            assert "momentum_buffer" not in states, where


def run_scenario(scenario, backend):
    run = Run(scenario, backend)
    mutations = scenario["mutations"]
    for index in range(STEPS):
        run.step(index)
        for i, (after, kind) in enumerate(mutations):
            if after == index:
                run.mutate(kind, i + index)
    return run


@given(scenarios())
def test_every_backend_matches_float64_and_refuses_mistakes_cleanly(scenario):
    backends = available_backends("cpu")
    strided = any(spec["layout"] == "strided" for group in scenario["groups"] for spec in group["params"])
    runs = []
    for backend in backends:
        if strided and backend != "torch":  # a parameter with gaps is the torch backend's alone
            with pytest.raises(ValueError, match="is not dense"):
                Run(scenario, backend)
            continue
        run = run_scenario(scenario, backend)
        check_against_reference(run)
        runs.append(run)
    # The backends agree with each other, not only each with the reference.
    for other in runs[1:]:
        for i, ((w0, s0, t0), (w1, s1, t1)) in enumerate(zip(runs[0].results(), other.results())):
            where = f"{other.backend} vs {runs[0].backend}: param {i}"
            assert_close(w1, w0.double(), where)
            assert t0 == t1 and s0.keys() == s1.keys(), where
            for key in s0:
                assert_close(s1[key], s0[key].double(), f"{where} {key}")
