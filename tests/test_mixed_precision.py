"""Mixed precision and the training stack (issue 6): bf16/fp16 params on every backend, fp32 master
weights, GradScaler, tensor lr and capturable step counts, state_dict round trips, torch.compile,
opcheck on every operator, and (on a GPU) CUDA graph capture."""
import copy

import pytest
import torch

from harness import on_every_backend, rel_error
from lamb_float64 import Float64LAMB
from lars_float64 import Float64LARS
import lamb_kernels
from lamb_kernels import FusedLAMB, FusedLARS, FusedMixedPrecisionLamb, available_backends
from lamb_kernels.hyper_table import LarsColumn
from lamb_kernels.schemas import STAGES
from tolerances import BF16_RTOL, PARAM_RTOL, SAME_MATH_ATOL, SAME_MATH_RTOL

LOW = (torch.bfloat16, torch.float16)
SIZES = [(7,), (33, 65), (2, 3, 1025)]  # odd sizes; one spans several triton interpreter chunks
LAMB = dict(lr=2e-2, weight_decay=0.01)
LARS = dict(lr=0.5, momentum=0.9, weight_decay=1e-4, trust_clip=True)
ALGORITHMS = {"lamb": (FusedLAMB, LAMB, Float64LAMB), "lars": (FusedLARS, LARS, Float64LARS)}


def make_params(dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(device=device, dtype=dtype)) for s in SIZES]


def make_grads(params, steps, seed=1):
    """Per step, per param, a grad in the params' dtype (what a low-precision backward gives)."""
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(p.shape, generator=gen).to(device=p.device, dtype=p.dtype) for p in params]
            for _ in range(steps)]


def run(algorithm, device, backend, dtype, steps=5, master_weights=False, **options):
    cls, defaults, _ = ALGORITHMS[algorithm]
    params = make_params(dtype, device)
    opt = cls(params, backend=backend, master_weights=master_weights, **{**defaults, **options})
    for grads in make_grads(params, steps):
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
    return params, opt


def reference(algorithm, dtype, steps=5):
    """The float64 reference from the same (low-precision) initial params and grads."""
    _, defaults, ref_cls = ALGORITHMS[algorithm]
    params = make_params(dtype, "cpu")
    ref = ref_cls([{"params": params}], **defaults)
    for grads in make_grads(params, steps):
        ref.step([[g for g in grads]])
    return ref.groups[0]["params"]


def error(params, ref_params):
    return rel_error(torch.cat([p.detach().cpu().double().flatten() for p in params]),
                     torch.cat([r.flatten() for r in ref_params]))


@pytest.mark.parametrize("algorithm", ["lamb", "lars"])
@pytest.mark.parametrize("dtype", LOW, ids=str)
@on_every_backend
def test_low_precision_within_twice_the_torch_backend_error(device, backend, dtype, algorithm):
    """docs/design.md section 5: against float64, at most 2x the error of the torch backend in the same dtype."""
    ref = reference(algorithm, dtype)
    params, opt = run(algorithm, device, backend, dtype)
    torch_params, _ = run(algorithm, device, "torch", dtype)
    err, torch_err = error(params, ref), error(torch_params, ref)
    assert all(p.dtype == dtype for p in params)
    states = [t for state in opt.state.values() for t in state.values() if torch.is_tensor(t) and t.dim() > 0]
    assert states and all(t.dtype == torch.float32 for t in states)
    assert err <= 2 * torch_err, (err, torch_err)
    # And an absolute bound: a few roundings to the storage format per step, not more.
    assert err < 5 * 2.0 ** (-8 if dtype == torch.bfloat16 else -11), err


@pytest.mark.parametrize("algorithm", ["lamb", "lars"])
@pytest.mark.parametrize("dtype", LOW, ids=str)
@on_every_backend
def test_master_weights_track_the_fp32_run(device, backend, dtype, algorithm):
    """With master weights, a low-precision model follows an fp32 run fed the same grads: the masters
    within the fp32 tolerance of docs/design.md section 5, the model params their masters rounded to nearest."""
    params, opt = run(algorithm, device, backend, dtype, master_weights=True)
    cls, defaults, _ = ALGORITHMS[algorithm]
    fp32 = [torch.nn.Parameter(p.detach().float()) for p in make_params(dtype, device)]
    fp32_opt = cls(fp32, backend=backend, **defaults)
    for grads in make_grads(make_params(dtype, device), 5):
        for p, g in zip(fp32, grads):
            p.grad = g.float()
        fp32_opt.step()
    for p, reference_p in zip(params, fp32):
        master = opt.state[p]["master_param"]
        assert master.dtype == torch.float32
        assert rel_error(master, reference_p.detach().cpu().double()) < PARAM_RTOL
        assert torch.equal(p.detach(), master.to(dtype))


@pytest.mark.parametrize("algorithm", ["lamb", "lars"])
@on_every_backend
def test_master_weights_state_dict_round_trip(device, backend, algorithm):
    """Resuming from a state_dict (masters included, kept fp32 by load_state_dict) continues the run
    bit for bit."""
    cls, defaults, _ = ALGORITHMS[algorithm]
    params = make_params(torch.bfloat16, device)
    opt = cls(params, backend=backend, master_weights=True, **defaults)
    grads = make_grads(params, 6)
    for step, step_grads in enumerate(grads):
        if step == 3:
            saved_params = [p.detach().clone() for p in params]
            saved = copy.deepcopy(opt.state_dict())
        for p, g in zip(params, step_grads):
            p.grad = g
        opt.step()
    resumed = [torch.nn.Parameter(p.clone()) for p in saved_params]
    opt2 = cls(resumed, backend=backend, master_weights=True, **defaults)
    opt2.load_state_dict(saved)
    for key in ("master_param", "exp_avg", "exp_avg_sq", "momentum_buffer"):
        for p in resumed:
            if key in opt2.state[p]:
                assert opt2.state[p][key].dtype == torch.float32, key
    assert all("master_param" in opt2.state[p] for p in resumed)
    for step_grads in grads[3:]:
        for p, g in zip(resumed, step_grads):
            p.grad = g
        opt2.step()
    for p, q in zip(params, resumed):
        assert torch.equal(p, q)
        assert torch.equal(opt.state[p]["master_param"], opt2.state[q]["master_param"])


# -- GradScaler --------------------------------------------------------------------------------


def _scaled_run(algorithm, device, backend, dtype, scales, bad_steps=(), master_weights=False):
    """Steps driven the way GradScaler drives them (grad_scale and found_inf set on the optimizer):
    grads multiplied by the scale, a non-finite element injected at `bad_steps`."""
    cls, defaults, _ = ALGORITHMS[algorithm]
    params = make_params(dtype, device)
    opt = cls(params, backend=backend, master_weights=master_weights, **defaults)
    history = []
    for step, (grads, scale) in enumerate(zip(make_grads(params, len(scales)), scales)):
        for p, g in zip(params, grads):
            p.grad = (g.float() * scale).to(dtype)
        if step in bad_steps:
            params[1].grad[0, 0] = float("inf")
        before = (copy.deepcopy([p.detach() for p in params]), copy.deepcopy(opt.state_dict()["state"]))
        opt.grad_scale = torch.tensor(float(scale), device=device)
        opt.found_inf = torch.tensor(1.0 if step in bad_steps else 0.0, device=device)
        opt.step()
        del opt.grad_scale, opt.found_inf
        history.append(before)
    return params, opt, history


def _same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        x.keys() == y.keys() and all(torch.equal(x[k], y[k]) if torch.is_tensor(x[k]) else x[k] == y[k] for k in x)
        for x, y in ((a[i], b[i]) for i in a))


@pytest.mark.parametrize("algorithm", ["lamb", "lars"])
@on_every_backend
def test_scaled_grads_are_unscaled_in_the_kernels(device, backend, algorithm):
    """Growing and shrinking power-of-two scales give the unscaled run's results."""
    params, _ = run(algorithm, device, backend, torch.float32, steps=5)
    scaled, _, _ = _scaled_run(algorithm, device, backend, torch.float32, [2.0**10, 2.0**11, 2.0**12, 2.0**6, 2.0**-3])
    for p, q in zip(params, scaled):
        torch.testing.assert_close(q, p, rtol=SAME_MATH_RTOL, atol=SAME_MATH_ATOL)


@pytest.mark.parametrize("algorithm", ["lamb", "lars"])
@pytest.mark.parametrize("master_weights", [False, True], ids=["plain", "master"])
@on_every_backend
def test_a_non_finite_grad_skips_the_whole_step(device, backend, algorithm, master_weights):
    """found_inf: params, copies, states and step counts unchanged, bit for bit; the next clean step
    proceeds as if the bad one had never been (only its grads are missing)."""
    scales = [2.0**8] * 5
    params, opt, history = _scaled_run(algorithm, device, backend, torch.bfloat16, scales, bad_steps=(0, 2),
                                       master_weights=master_weights)
    # Step 0 (the very first, buffers and masters new) and step 2 were skipped: the state after
    # each equals the state before it.
    for bad in (0, 2):
        params_before, state_before = history[bad]
        params_after, state_after = history[bad + 1]
        assert all(torch.equal(a, b) for a, b in zip(params_before, params_after))
        if bad == 2:
            assert _same_state(state_before, state_after)
    if algorithm == "lamb":
        assert all(float(opt.state[p]["step"]) == 3 for p in params)
    # The clean steps equal a run fed only the clean steps' grads.
    cls, defaults, _ = ALGORITHMS[algorithm]
    clean = make_params(torch.bfloat16, device)
    clean_opt = cls(clean, backend=backend, master_weights=master_weights, **defaults)
    all_grads = make_grads(clean, 5)
    for step in (1, 3, 4):
        for p, g in zip(clean, all_grads[step]):
            p.grad = g
        clean_opt.step()
    for p, q in zip(params, clean):
        torch.testing.assert_close(p.float(), q.float(), rtol=0, atol=0)


@pytest.mark.parametrize("algorithm", ["lamb", "lars"])
@on_every_backend
def test_torch_grad_scaler_drives_the_step(device, backend, algorithm):
    """A real GradScaler loop on CPU (fp16 params, which torch's own unscale_ refuses): an injected
    inf halves the scale and skips the step, growth doubles it, and the result equals an unscaled
    run that simply skips the bad step."""
    if device != "cpu":
        pytest.skip("the CPU GradScaler; CUDA's is the same code with another device")
    cls, defaults, _ = ALGORITHMS[algorithm]
    torch.manual_seed(0)
    model = torch.nn.Linear(16, 4).to(torch.float16)
    reference_model = copy.deepcopy(model)
    opt = cls(model.parameters(), backend=backend, master_weights=True, **defaults)
    reference_opt = cls(reference_model.parameters(), backend=backend, master_weights=True, **defaults)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=2)
    data = torch.randn(6, 8, 16, dtype=torch.float16)
    scales = []
    for step, x in enumerate(data):
        loss = model(x).float().square().mean()
        scaler.scale(loss).backward()
        if step == 3:
            model.weight.grad[0, 0] = float("inf")
        scaler.step(opt)
        scaler.update()
        scales.append(scaler.get_scale())
        opt.zero_grad()
        if step != 3:
            reference_model(x).float().square().mean().backward()
            reference_opt.step()
            reference_opt.zero_grad()
    assert scales == [2.0**8, 2.0**9, 2.0**9, 2.0**8, 2.0**8, 2.0**9]
    for p, q in zip(model.parameters(), reference_model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_bad_scaler_tensors_are_refused_by_name():
    p = torch.nn.Parameter(torch.randn(3))
    p.grad = torch.randn(3)
    opt = FusedLAMB([p], backend="torch")
    opt.found_inf = torch.zeros(2)
    before = p.detach().clone()
    with pytest.raises(TypeError, match="found_inf"):
        opt.step()
    assert torch.equal(p, before) and not opt.state


# -- tensor lr, capturable, FusedMixedPrecisionLamb ---------------------------------------------


@pytest.mark.parametrize("algorithm", ["lamb", "lars"])
@on_every_backend
def test_tensor_lr_and_capturable_match_floats(device, backend, algorithm):
    """A tensor lr changed in place by an LR scheduler, with step counts on the parameters' device,
    gives the float-lr run's results."""
    cls, defaults, _ = ALGORITHMS[algorithm]
    results = []
    for capturable in (False, True):
        params = make_params(torch.float32, device)
        lr = torch.tensor(defaults["lr"], device=device) if capturable else defaults["lr"]
        opt = cls(params, backend=backend, capturable=capturable, **{**defaults, "lr": lr})
        schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + step))
        for grads in make_grads(params, 4):
            for p, g in zip(params, grads):
                p.grad = g
            opt.step()
            schedule.step()
        if capturable:
            assert torch.is_tensor(opt.param_groups[0]["lr"])
            if algorithm == "lamb":
                assert all(opt.state[p]["step"].device == p.device for p in params)
        results.append(params)
    for p, q in zip(*results):
        torch.testing.assert_close(q, p, rtol=SAME_MATH_RTOL, atol=SAME_MATH_ATOL)


@on_every_backend
def test_fused_mixed_precision_lamb_is_apex_shaped(device, backend):
    """apex's signature; masters for reduced_precision_dtype only, lr and step counts on the device,
    starting from `step`; the same math as FusedLAMB with master weights."""
    params = make_params(torch.bfloat16, device) + [torch.nn.Parameter(torch.randn(5, device=device))]
    opt = FusedMixedPrecisionLamb(params, 2e-2, 10, True, (0.9, 0.999), 1e-6, 0.01, False, True, True, 1.0, False,
                                  torch.bfloat16, backend=backend)
    twin = [torch.nn.Parameter(p.detach().clone()) for p in params]
    twin_opt = FusedLAMB(twin, lr=2e-2, backend=backend, master_weights=True)
    for p in twin:  # the state FusedLAMB would create, starting from step 10
        twin_opt.state[p].update(step=torch.tensor(10.0), exp_avg=torch.zeros_like(p, dtype=torch.float32),
                                 exp_avg_sq=torch.zeros_like(p, dtype=torch.float32))
    for grads in make_grads(params, 3):
        for p, q, g in zip(params, twin, grads):
            p.grad, q.grad = g, g.clone()
        opt.step()
        twin_opt.step()
    assert torch.is_tensor(opt.param_groups[0]["lr"]) and opt.param_groups[0]["lr"].device == params[0].device
    assert "master_param" in opt.state[params[0]] and "master_param" not in opt.state[params[-1]]
    assert float(opt.state[params[0]]["step"]) == 13
    for p, q in zip(params, twin):
        torch.testing.assert_close(p, q, rtol=SAME_MATH_RTOL, atol=0)
    with pytest.raises(ValueError, match="reduced_precision_dtype"):
        FusedMixedPrecisionLamb(params, reduced_precision_dtype=torch.float64)


def test_low_precision_grad_of_another_dtype_is_refused_by_name():
    p = torch.nn.Parameter(torch.randn(4, dtype=torch.bfloat16))
    if hasattr(p, "grad_dtype"):
        p.grad_dtype = None  # torch itself refuses such a grad otherwise
    p.grad = torch.randn(4)
    opt = FusedLAMB([p], backend="torch", master_weights=True)
    with pytest.raises(TypeError, match=r"grad of param_groups\[0\]\['params'\]\[0\].*float32.*bfloat16"):
        opt.step()
    assert not opt.state


# -- torch.compile, opcheck, CUDA graphs ------------------------------------------------------


@pytest.mark.parametrize("algorithm", ["lamb", "lars"])
@on_every_backend
def test_compiled_step_equals_eager(device, backend, algorithm):
    """torch.compile(opt.step) (inductor) over several steps of an lr schedule matches eager; the
    graph holds the backend's registered operators, not a break around them."""
    cls, defaults, _ = ALGORITHMS[algorithm]
    torch._dynamo.reset()
    graphs = []

    def recording_inductor(gm, example_inputs):
        graphs.append(gm)
        from torch._inductor.compile_fx import compile_fx

        return compile_fx(gm, example_inputs)

    results = []
    for compiled in (False, True):
        params = make_params(torch.bfloat16, device)
        opt = cls(params, backend=backend, master_weights=True, **defaults)
        schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + step))
        step = torch.compile(opt.step, backend=recording_inductor) if compiled else opt.step
        for grads in make_grads(params, 4):
            for p, g in zip(params, grads):
                p.grad = g
            step()
            schedule.step()
        results.append((params, opt))
    (eager, eager_opt), (compiled, compiled_opt) = results
    # Inductor compiles the small torch ops around the operators (the sum of per-tensor grad norms,
    # and all of the torch backend) in its own order: an fp32 ulp on the masters, so at most one
    # bf16 rounding on the params.
    for p, q in zip(eager, compiled):
        torch.testing.assert_close(compiled_opt.state[q]["master_param"], eager_opt.state[p]["master_param"],
                                   rtol=SAME_MATH_RTOL, atol=SAME_MATH_ATOL)
        torch.testing.assert_close(q.float(), p.float(), rtol=BF16_RTOL, atol=0)
    targets = {str(node.target) for gm in graphs for node in gm.graph.nodes if node.op == "call_function"}
    if backend != "torch":
        prefix = "lamb_kernels.triton_" if backend == "triton" else "lamb_kernels."
        update = {"lamb": "lamb_update", "lars": "lars_update"}[algorithm]
        assert any(t.startswith(prefix) and update in t for t in targets), targets


def _op_inputs(device, dtype, master):
    """Small inputs for every operator: params (fp32 masters or `dtype`), grads in `dtype`."""
    from lamb_kernels.hyper_table import lamb_hyper, lars_hyper
    from lamb_kernels.backend_api import LambSegment, LarsSegment

    gen = torch.Generator().manual_seed(0)
    sizes = (3, 1000)
    weights = [torch.randn(n, generator=gen).to(device=device, dtype=torch.float32 if master else dtype) for n in sizes]
    grads = [torch.randn(n, generator=gen).to(device=device, dtype=dtype) for n in sizes]
    moments = [torch.rand(n, generator=gen).to(device) for n in sizes]
    copies = [w.to(dtype) for w in weights] if master else []
    lamb_seg = LambSegment(params=weights, grads=grads, exp_avgs=moments, exp_avg_sqs=[m.clone() for m in moments],
                           bias_correction1=[0.1, 0.2], bias_correction2=[0.001, 0.002], lr=0.01, beta1=0.9,
                           beta2=0.999, beta3=0.1, eps=1e-6, weight_decay=0.01, adam_w_mode=True,
                           layer_adaptation=True, max_grad_norm=1.0, low_precision_params=copies)
    lars_seg = LarsSegment(params=weights, grads=grads, momentum_buffers=[m.clone() for m in moments],
                           first_step=[False, False], lr=0.1, momentum=0.9, dampening=0.0, weight_decay=1e-4,
                           nesterov=False, trust_coeff=0.001, eps=1e-8, trust_clip=False, adaptation=True, low_precision_params=copies)
    scalar = dict(grad_scale=torch.tensor([4.0], device=device), found_inf=torch.tensor([0.0], device=device))
    return lamb_seg, lamb_hyper(device).update([lamb_seg]), lars_seg, lars_hyper(device).update([lars_seg]), scalar


@pytest.mark.parametrize("master", [False, True], ids=["plain", "master"])
@pytest.mark.parametrize("dtype", (torch.float32, *LOW), ids=str)
@on_every_backend
def test_opcheck_every_operator(device, backend, dtype, master):
    """torch.library.opcheck: schemas, fake kernels and declared mutations of every operator."""
    if backend == "torch":
        pytest.skip("the torch backend has no operators of its own")
    if master and dtype == torch.float32:
        pytest.skip("fp32 params have no master copies")
    ops = torch.ops.lamb_kernels
    lamb_seg, lamb_table, lars_seg, lars_table, s = _op_inputs(device, dtype, master)
    norms = torch.rand(2, 2, device=device) + 0.5
    plain_sgd = lars_table.clone()  # without norms no tensor may adapt
    plain_sgd[:, LarsColumn.ADAPT] = 0.0
    w, g, m, v, c = lamb_seg.params, lamb_seg.grads, lamb_seg.exp_avgs, lamb_seg.exp_avg_sqs, lamb_seg.low_precision_params
    b = lars_seg.momentum_buffers
    # One schema per stage: the C++ operators (CPU and CUDA kernels) and the Triton ones take the same
    # arguments.
    prefix, chunk = ("", 256) if backend in ("cpp", "cuda") else ("triton_", 256)
    op = {stage: getattr(ops, prefix + stage) for stage in STAGES}
    calls = [
        (op["sums_of_squares"], (g, None, chunk)), (op["sums_of_squares"], (w, g, chunk)),
        (op["lamb_moments"], (w, g, m, v, [], [], lamb_table, torch.tensor([9.0], device=device), s["grad_scale"],
                              s["found_inf"], chunk)),
        (op["lamb_moments"], (w, g, m, v, [], [], lamb_table, None, None, None, chunk)),
        (op["lamb_apply"], (w, m, v, [], [], lamb_table, norms, s["found_inf"], c, chunk)),
        (op["lars_apply"], (w, g, b, [], lars_table, norms, s["grad_scale"], s["found_inf"], c, chunk)),
        (op["lars_apply"], (w, g, b, [], plain_sgd, None, None, None, c, chunk)),
        (op["lamb_update"], (w, g, m, v, [], [], lamb_table, torch.tensor([9.0], device=device), s["grad_scale"],
                             s["found_inf"], c, chunk, 1 << 20)),
        (op["lars_update"], (w, g, b, [], lars_table, s["grad_scale"], s["found_inf"], c, True, chunk, 0)),
        (op["lars_update"], (w, g, b, [], plain_sgd, None, None, c, False, chunk, 0)),
    ]
    assert {o for o, _ in calls} == set(op.values())  # every stage's operator is checked
    for op, args in calls:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


@pytest.mark.gpu
@pytest.mark.parametrize("algorithm", ["lamb", "lars"])
@pytest.mark.parametrize("backend_name", ["triton", "cuda", "torch"])
def test_cuda_graph_capture_replays_like_eager(algorithm, backend_name):
    """capturable=True with a tensor lr: a captured step(), replayed with new grads and a new lr,
    equals eager steps; a replay allocates nothing."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if backend_name not in available_backends("cuda"):
        pytest.skip(f"{backend_name} unavailable: {lamb_kernels.backends._unavailable_reason(backend_name, 'cuda')}")
    cls, defaults, _ = ALGORITHMS[algorithm]
    steps = 6
    grads = make_grads(make_params(torch.bfloat16, "cuda"), steps)
    lrs = [defaults["lr"] / (1 + i) for i in range(steps)]
    results = []
    for graphed in (False, True):
        params = make_params(torch.bfloat16, "cuda")
        lr = torch.tensor(lrs[0], device="cuda")
        opt = cls(params, backend=backend_name, master_weights=True, capturable=True, **{**defaults, "lr": lr})
        static_grads = [torch.zeros_like(p) for p in params]
        for p, g in zip(params, static_grads):
            p.grad = g
        for i in range(steps):
            for g, new in zip(static_grads, grads[i]):
                g.copy_(new)
            lr.fill_(lrs[i])
            if not graphed or i < 2:  # eager warm-up steps before the capture (tables, state)
                opt.step()
                continue
            if i == 2:
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    opt.step()
                # Capturing does not run the step: replay it for this step's grads.
            before = torch.cuda.memory_stats()["allocation.all.allocated"]
            graph.replay()
            assert torch.cuda.memory_stats()["allocation.all.allocated"] == before
        torch.cuda.synchronize()
        results.append(params)
    for p, q in zip(*results):
        torch.testing.assert_close(q.float(), p.float(), rtol=0, atol=0)
