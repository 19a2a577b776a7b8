"""Sharded training on CPU with gloo, in spawned processes: FSDP2 (``fully_shard``) at 2 and 4 ranks,
HSDP, FSDP x tensor parallel on a 2x2 mesh, DDP, mixed precision, the number of all-reduces a step
makes, distributed checkpoints (same world size, and 4 ranks -> 2), GradScaler with an inf on one
rank, and the errors.

Every rank trains on the same full batch, so the global gradient is the single-process one; each
step the sharded run's gradients are gathered and fed to a single-process copy of the same
optimizer, and params and every state tensor are compared with it after several steps
(docs/design.md section 5: 2e-5 relative). What differs is only how the sums of squares are split
across ranks."""
import copy
import os
import re

import pytest
import torch

dist = pytest.importorskip("torch.distributed")
if not dist.is_available():
    pytest.skip("torch without distributed support", allow_module_level=True)

from distributed_harness import (CountingAllReduce, full, in_turn, load_checkpoint, rel_error,  # noqa: E402
                                 save_checkpoint, spawn, train_steps)

import lamb_kernels  # noqa: E402
from lamb_kernels import FusedLAMB, FusedLARS  # noqa: E402
from tolerances import PARAM_RTOL  # noqa: E402

STEPS = 5
BACKENDS = lamb_kernels.available_backends("cpu")
LARS_OPTIONS = dict(lr=0.5, momentum=0.9, weight_decay=1e-3)


class OddNet(torch.nn.Module):
    """Odd sizes, a weight with fewer rows than 4 ranks (3, and 1: some ranks hold empty shards) and
    a 1-element parameter."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(7, 5)
        self.b = torch.nn.Linear(5, 3)
        self.c = torch.nn.Linear(3, 1)
        self.scale = torch.nn.Parameter(torch.full((1,), 1.5))

    def forward(self, x):
        return self.c(torch.tanh(self.b(torch.tanh(self.a(x))))) * self.scale


class MLP(torch.nn.Module):
    def __init__(self, width=8, hidden=12, depth=1):
        super().__init__()
        layers = []
        for i in range(depth):
            layers += [torch.nn.Linear(width, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, width)]
        self.layers = torch.nn.Sequential(*layers)

    def forward(self, x):
        return self.layers(x)


def batch(step, width):
    return torch.randn(16, width, generator=torch.Generator().manual_seed(1000 + step))


def loss_of(model, step):
    width = 7 if isinstance(getattr(model, "module", model), OddNet) else 8  # (DDP wraps the model)
    p = next(model.parameters())
    return model(batch(step, width).to(p.device, p.dtype)).float().square().mean()


def shard(model, layout, world, policy=None, device="cpu"):
    """Shards `model` in place: "fsdp" (1-D), "hsdp" (replicate x shard), "fsdp_tp" (2x2: tensor
    parallel inside, FSDP across), "ddp" (replicated: returns the DDP wrapper)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    options = {} if policy is None else {"mp_policy": policy}
    if layout == "ddp":
        return torch.nn.parallel.DistributedDataParallel(model)
    if layout == "fsdp":
        mesh = init_device_mesh(device, (world,))
    elif layout == "hsdp":
        mesh = init_device_mesh(device, (2, world // 2), mesh_dim_names=("replicate", "shard"))
    else:
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

        mesh2d = init_device_mesh(device, (2, world // 2), mesh_dim_names=("dp", "tp"))
        plan = {}
        for i in range(0, len(model.layers), 3):
            plan[f"layers.{i}"], plan[f"layers.{i + 2}"] = ColwiseParallel(), RowwiseParallel()
        parallelize_module(model, mesh2d["tp"], plan)
        mesh = mesh2d["dp"]
    for module in model.children():
        if isinstance(module, torch.nn.Linear) or isinstance(module, torch.nn.Sequential):
            fully_shard(module, mesh=mesh, **options)
    fully_shard(model, mesh=mesh, **options)
    return model


def make_optimizer(case, model, extra):
    optimizer = FusedLAMB if case["optimizer"] == "lamb" else FusedLARS
    options = dict(case.get("options", {}))
    if case.get("groups"):
        params = lamb_kernels.param_groups(model, options.pop("weight_decay", 0.01))
    else:
        params = [{"params": list(model.parameters())}]
    if extra is not None:
        params.append({"params": [extra]})
    return optimizer(params, backend=case["backend"], master_weights=case.get("master_weights", False), **options)


def compare_states(where, opt, ref_opt, params, ref_params):
    for p, q in zip(params, ref_params):
        name = where + f" {tuple(q.shape)}"
        state, ref_state = opt.state.get(p, {}), ref_opt.state.get(q, {})
        assert state.keys() == ref_state.keys(), name
        for key, value in sorted(state.items()):
            if key == "step":
                assert float(value) == float(ref_state[key]), name
                continue
            err = rel_error(full(value), ref_state[key])
            assert err <= PARAM_RTOL, f"{name} {key}: error {err:.2e}"


def train_against_single_process(rank, world, cases):
    """Each case: a sharded model and optimizer, and a single-process copy fed the gathered grads."""
    for case in cases:
        where = f"rank {rank}: {case}"
        torch.manual_seed(0)
        reference = OddNet() if case.get("model", "odd") == "odd" else MLP(depth=case.get("depth", 1))
        device = case.get("device", "cpu")
        reference.to(device, case.get("dtype"))
        sharded = shard(copy.deepcopy(reference), case["layout"], world, case.get("policy"), device)
        model = sharded.module if case["layout"] == "ddp" else sharded
        extra = ref_extra = None
        if case.get("plain_extra"):  # a plain (not sharded) parameter beside the DTensors
            extra, ref_extra = (torch.nn.Parameter(torch.randn(4, generator=torch.Generator().manual_seed(5)).to(device))
                                for _ in range(2))
        opt, ref_opt = make_optimizer(case, model, extra), make_optimizer(case, reference, ref_extra)
        names = [name for name, _ in reference.named_parameters()]
        params = dict(model.named_parameters())
        for step in range(STEPS):
            loss_of(sharded, step).backward()
            grads = {name: full(params[name].grad) for name in names}
            for name, q in reference.named_parameters():
                q.grad = grads[name].clone()
            if extra is not None:
                extra.grad = torch.randn(4, generator=torch.Generator().manual_seed(step)).to(device)
                ref_extra.grad = extra.grad.clone()
            opt.step()
            ref_opt.step()
            opt.zero_grad(set_to_none=True)
            ref_opt.zero_grad(set_to_none=True)
        ordered = [params[name] for name in names] + ([extra] if extra is not None else [])
        ref_ordered = list(reference.parameters()) + ([ref_extra] if ref_extra is not None else [])
        for name, p, q in zip(names + ["extra"], ordered, ref_ordered):
            err = rel_error(full(p), q)
            assert err <= PARAM_RTOL, f"{where} {name}: param error {err:.2e}"
        compare_states(where, opt, ref_opt, ordered, ref_ordered)


def lamb_cases(layout, **extra):
    return [dict(optimizer="lamb", backend=backend, layout=layout, **extra) for backend in BACKENDS]


FSDP_CASES = [
    # Two groups (no decay nor trust ratio for biases), clipping active, and off.
    *lamb_cases("fsdp", groups=True, options=dict(lr=0.02, max_grad_norm=0.05)),
    *lamb_cases("fsdp", options=dict(lr=0.02, max_grad_norm=None), plain_extra=True),
    *[dict(optimizer="lars", backend=backend, layout="fsdp", groups=True,
           options=dict(LARS_OPTIONS, trust_clip=True)) for backend in BACKENDS],
]


def test_fsdp2_two_ranks_matches_a_single_process():
    spawn(train_against_single_process, 2, FSDP_CASES)


def test_fsdp2_four_ranks_with_empty_shards_matches_a_single_process():
    cases = [case for case in FSDP_CASES if case["backend"] != "triton"] + [
        dict(optimizer="lamb", backend="triton", layout="fsdp", groups=True, options=dict(lr=0.02)),
        dict(optimizer="lars", backend="triton", layout="fsdp", options=dict(LARS_OPTIONS))]
    spawn(train_against_single_process, 4, cases)


def test_hsdp_and_fsdp_over_tensor_parallel_match_a_single_process():
    cases = []
    for backend in BACKENDS:
        cases += [dict(optimizer="lamb", backend=backend, layout="fsdp_tp", model="mlp", options=dict(lr=0.02)),
                  dict(optimizer="lars", backend=backend, layout="fsdp_tp", model="mlp", options=LARS_OPTIONS),
                  dict(optimizer="lamb", backend=backend, layout="hsdp", options=dict(lr=0.02, max_grad_norm=0.05))]
    spawn(train_against_single_process, 4, cases)


def test_mixed_precision_and_bf16_masters_match_a_single_process():
    from torch.distributed.fsdp import MixedPrecisionPolicy

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16)
    cases = []
    for backend in ("cpp", "torch"):
        cases += [dict(optimizer="lamb", backend=backend, layout="fsdp", policy=policy, options=dict(lr=0.02)),
                  dict(optimizer="lamb", backend=backend, layout="fsdp", dtype=torch.bfloat16, master_weights=True,
                       options=dict(lr=0.02)),
                  dict(optimizer="lars", backend=backend, layout="fsdp", dtype=torch.bfloat16, master_weights=True,
                       options=LARS_OPTIONS)]
    spawn(train_against_single_process, 2, [case for case in cases if case["backend"] in BACKENDS])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or not dist.is_nccl_available(), reason="needs CUDA and NCCL")
def test_fsdp2_on_one_gpu_with_nccl_matches_a_single_process():
    """The same code path on CUDA: a one-rank NCCL process group, every CUDA backend."""
    cases = [dict(case, device="cuda", backend=backend) for case in FSDP_CASES if case["backend"] == BACKENDS[0]
             for backend in lamb_kernels.available_backends("cuda")]
    spawn(train_against_single_process, 1, cases, backend="nccl")


def test_ddp_matches_a_single_process():
    cases = [dict(optimizer=name, backend=backend, layout="ddp", options=options)
             for name, options in (("lamb", dict(lr=0.02)), ("lars", LARS_OPTIONS)) for backend in BACKENDS]
    spawn(train_against_single_process, 2, cases)


# -- collectives -----------------------------------------------------------------------------------

def count_all_reduces(rank, world):
    """A 12-tensor model: LAMB makes 2 all-reduces a step with clipping (grad norm, norm table), and
    2 without (the grads' presences, norm table); LARS 1 (norm table), and 1 when no group adapts
    (the grads' presences); a replicated (DDP) model none."""
    expected = [("lamb", dict(max_grad_norm=1.0), 2), ("lamb", dict(max_grad_norm=None), 2),
                ("lars", dict(LARS_OPTIONS), 1), ("lars", dict(lr=0.1, momentum=0.9), 1)]
    for backend in BACKENDS:
        for name, options, count in expected:
            for layout in ("fsdp", "hsdp", "ddp"):
                torch.manual_seed(0)
                model = shard(MLP(depth=3), layout, world)  # 12 tensors
                optimizer = FusedLAMB if name == "lamb" else FusedLARS
                params = list(model.parameters())
                assert len(params) == 12
                opt = optimizer(params, backend=backend, **options)
                for step in range(2):
                    loss_of(model, step).backward()
                    with CountingAllReduce() as counter:
                        opt.step()
                    want = 0 if layout == "ddp" else count
                    assert counter.count == want, (rank, backend, name, options, layout, counter.count)
                    opt.zero_grad()


def test_all_reduces_per_step_do_not_grow_with_the_number_of_tensors():
    spawn(count_all_reduces, 4)


# -- checkpoints -------------------------------------------------------------------------------------

def checkpoint_run(rank, world, directory, optimizer_name, backend, saved_world):
    """saved_world None: steps 0-2, a DCP checkpoint, steps 3-4, then the full params and states saved
    by rank 0. Else: a new model and optimizer, the checkpoint (saved at `saved_world` ranks) loaded,
    steps 3-4, compared with the saved results: bit for bit at the same world size, within
    docs/design.md section 5 at another."""
    torch.manual_seed(0)
    model = shard(OddNet(), "fsdp", world)
    optimizer = FusedLAMB if optimizer_name == "lamb" else FusedLARS
    options = dict(lr=0.02, max_grad_norm=0.05) if optimizer_name == "lamb" else LARS_OPTIONS
    opt = optimizer(model.parameters(), backend=backend, **options)

    def train(steps):
        train_steps(model, opt, steps, loss_of)

    checkpoint = os.path.join(directory, "checkpoint")
    if saved_world is None:
        train(range(3))
        save_checkpoint(model, opt, checkpoint)
    else:
        load_checkpoint(model, opt, checkpoint)
    train(range(3, STEPS))
    results = {}
    for name, p in model.named_parameters():
        results[name] = full(p).clone()
        for key, value in sorted(opt.state[p].items()):
            results[f"{name}.{key}"] = full(value).clone()
    final = os.path.join(directory, "final.pt")
    if saved_world is None:
        if rank == 0:
            torch.save(results, final)
        return
    saved = torch.load(final)
    assert saved.keys() == results.keys()
    for key, value in results.items():
        if saved_world == world:
            assert torch.equal(value, saved[key]), (rank, key)
        else:
            assert rel_error(value, saved[key]) <= PARAM_RTOL, (rank, key, rel_error(value, saved[key]))


@pytest.mark.parametrize("optimizer_name", ["lamb", "lars"])
def test_checkpoint_resumes_bit_for_bit_and_reshards(tmp_path, optimizer_name):
    backend = BACKENDS[0]
    spawn(in_turn, 4, checkpoint_run, [(str(tmp_path), optimizer_name, backend, None),  # saved, then loaded
                                       (str(tmp_path), optimizer_name, backend, 4)])  # at the same world size
    spawn(checkpoint_run, 2, str(tmp_path), optimizer_name, backend, 4)  # resharded, 4 -> 2


# -- GradScaler ----------------------------------------------------------------------------------------

def grad_scaler_skip(rank, world, backend):
    """An inf in one rank's shard of one grad: every rank skips the step (params, states, step
    counts unchanged), and the next clean step runs everywhere."""
    torch.manual_seed(0)
    model = shard(OddNet(), "fsdp", world)
    opt = FusedLAMB(model.parameters(), lr=0.02, backend=backend)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)

    def snapshot():
        out = [full(p).clone() for p in model.parameters()]
        for p in model.parameters():
            out += [full(v).clone() for _, v in sorted(opt.state[p].items())]
        return out

    for step in range(3):
        scaler.scale(loss_of(model, step)).backward()
        if step == 1 and rank == world - 1:
            model.a.weight.grad._local_tensor.view(-1)[0] = float("inf")
        before = snapshot() if step == 1 else None
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        if step == 1:
            assert all(torch.equal(a, b) for a, b in zip(before, snapshot())), rank
            assert float(opt.state[model.a.weight]["step"]) == 1.0, rank
    assert float(opt.state[model.a.weight]["step"]) == 2.0, rank


def test_grad_scaler_skips_on_every_rank_when_one_rank_sees_an_inf():
    for backend in BACKENDS:
        spawn(grad_scaler_skip, 2, backend)


# -- errors ------------------------------------------------------------------------------------------

def placement_errors(rank, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Shard

    mesh = init_device_mesh("cpu", (world,))
    pending = torch.nn.Parameter(DTensor.from_local(torch.ones(3, 2), mesh, [Partial()]))
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[1\] has the placement .*Partial"):
        FusedLAMB([torch.nn.Parameter(torch.ones(2)), pending])
    p = torch.nn.Parameter(DTensor.from_local(torch.ones(3, 2), mesh, [Shard(0)]))
    opt = FusedLAMB([p], backend=BACKENDS[0])
    p.grad = DTensor.from_local(torch.ones(3, 2), mesh, [Shard(0)])
    opt.step()
    before = p.to_local().clone(), opt.state[p]["exp_avg"].to_local().clone()
    p.grad = DTensor.from_local(torch.ones(6, 2), mesh, [Partial()])
    with pytest.raises(ValueError, match=r"grad of param_groups\[0\]\['params'\]\[0\] has placements"):
        opt.step()
    p.grad = torch.ones(6, 2)
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[0\] is a DTensor, its grad a plain"):
        opt.step()
    assert torch.equal(p.to_local(), before[0]) and torch.equal(opt.state[p]["exp_avg"].to_local(), before[1])
    assert float(opt.state[p]["step"]) == 1.0


def test_placements_the_step_cannot_handle_are_refused_by_name():
    spawn(placement_errors, 2)


def flat_parameters_refused(rank, world):
    from torch.distributed.fsdp import FullyShardedDataParallel

    for use_orig_params in (False, True):
        model = FullyShardedDataParallel(OddNet(), use_orig_params=use_orig_params, device_id=torch.device("cpu"))
        with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[0\] was flattened by FSDP1"):
            FusedLAMB(model.parameters())


def test_fsdp1_flat_parameters_are_refused_by_name():
    spawn(flat_parameters_refused, 2)


def test_deepspeed_zero3_partitions_are_refused_by_name():
    p = torch.nn.Parameter(torch.randn(3))
    p.ds_id = 0  # what DeepSpeed ZeRO-3 marks its partitioned parameters with
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[0\] is partitioned by DeepSpeed ZeRO-3"):
        FusedLARS([p])


GRAD_PRESENCE_CASES = [
    (FusedLAMB, dict(lr=0.02, max_grad_norm=0.05)),  # found at the grad-norm all-reduce
    (FusedLAMB, dict(lr=0.02, max_grad_norm=None)),  # no all-reduce before the moments: a presence one
    (FusedLARS, dict(LARS_OPTIONS)),  # adaptive, momentum 0.9: found at the norms all-reduce
    (FusedLARS, dict(lr=0.1, momentum=0.9)),  # no adaptation, no norms: a presence all-reduce
]


def local_snapshot(model, opt) -> dict:
    """This rank's shards of the params and of every state entry, the step counts, and which
    parameters have a state: no collective, so it also runs where another rank failed."""
    from torch.distributed.tensor import DTensor

    out = {"with state": [name for name, p in model.named_parameters() if p in opt.state]}
    for name, p in model.named_parameters():
        out[name] = p.to_local().clone()
        for key, value in opt.state.get(p, {}).items():
            out[f"{name}.{key}"] = (value.to_local() if isinstance(value, DTensor) else value).clone()
    return out


def assert_same(where, actual: dict, expected: dict):
    assert actual.keys() == expected.keys(), (where, sorted(actual.keys() ^ expected.keys()))
    for key, value in expected.items():
        same = (actual[key].dtype == value.dtype and torch.equal(actual[key], value) if torch.is_tensor(value)
                else actual[key] == value)
        assert same, (where, key)


def grad_on_some_ranks_only(rank, world):
    """A sharded parameter with a grad on rank 0 and None on rank 1 (or rank 1 without any grad):
    every rank raises a ValueError naming it, and params, states and step counts stay as they were
    (c.weight, whose first step this is, gets no state; states the step converts to bf16 stay fp32);
    with the grads restored, the step equals, bit for bit, that of an optimizer that never saw the
    failure."""
    torch.manual_seed(0)
    reference = OddNet()
    for optimizer, options in GRAD_PRESENCE_CASES:
        for missing in ("b.weight", "every grad"):
            where = (rank, optimizer.__name__, options, missing)
            models = [shard(copy.deepcopy(reference), "fsdp", world) for _ in range(2)]
            names = [name for name, _ in models[0].named_parameters()]
            named = names.index(missing) if missing in names else 0  # (without any grad: the first)
            label = re.escape(f"param_groups[0]['params'][{named}] ({names[named]!r})")
            opts = [optimizer(model.named_parameters(), backend=BACKENDS[0], **options) for model in models]
            for model, opt in zip(models, opts):
                loss_of(model, 0).backward()
                model.c.weight.grad = None  # on every rank: its first step is the failing one
                opt.step()
                opt.zero_grad()
                loss_of(model, 1).backward()
            if missing == "b.weight":  # states converted to bf16 by the failing step, and again by the retry
                for opt in opts:
                    opt.param_groups[0]["state_dtype"] = torch.bfloat16
            failing, model = opts[0], models[0]
            grads = {name: p.grad for name, p in model.named_parameters()}
            if rank == 1:
                for name, p in model.named_parameters():
                    if missing in (name, "every grad"):
                        p.grad = None
            before = local_snapshot(model, failing)
            assert "c.weight" not in before["with state"], where
            with pytest.raises(ValueError, match=label + " has a grad on some ranks and None on others"):
                failing.step()
            assert_same(where, local_snapshot(model, failing), before)
            for name, p in model.named_parameters():
                p.grad = grads[name]
            failing.step()
            opts[1].step()
            assert_same(where, local_snapshot(model, failing), local_snapshot(models[1], opts[1]))


def test_a_sharded_grad_on_some_ranks_only_is_refused_on_every_rank_before_any_change():
    spawn(grad_on_some_ranks_only, 2)


def full_state_dict_loads_sharded(rank, world):
    """A state dict of whole tensors (as a single process saves it) loaded into an optimizer of
    sharded parameters: each rank keeps its own part, and the run continues as before."""
    for name in ("lamb", "lars"):
        torch.manual_seed(0)
        model = shard(OddNet(), "fsdp", world)
        optimizer = FusedLAMB if name == "lamb" else FusedLARS
        options = dict(lr=0.02) if name == "lamb" else LARS_OPTIONS
        opt = optimizer(model.parameters(), backend=BACKENDS[0], **options)
        for step in range(2):
            loss_of(model, step).backward()
            opt.step()
        saved = opt.state_dict()
        whole = {**saved, "state": {i: {k: full(v) if k != "step" else v for k, v in entry.items()}
                                    for i, entry in saved["state"].items()}}
        resumed = optimizer(model.parameters(), backend=BACKENDS[0], **options)
        resumed.load_state_dict(whole)
        for p in model.parameters():
            for key, value in opt.state[p].items():
                loaded = resumed.state[p][key]
                if key != "step":
                    assert type(loaded) is type(value) and loaded.placements == value.placements, (rank, key)
                    assert torch.equal(loaded.to_local(), value.to_local()), (rank, name, key)
        resumed.step()  # the grads of step 1 again: a step runs on the loaded state


def test_a_full_state_dict_loads_into_sharded_parameters():
    spawn(full_state_dict_loads_sharded, 2)


def buckets_that_differ_between_ranks(rank, world):
    """With backend="auto", a shard laid out with gaps on one rank only goes to the torch backend
    there and to the C++ one elsewhere: the ranks' buckets differ, and the norms must still be
    summed tensor by tensor (found by review: rows were joined bucket by bucket)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    if "cpp" not in BACKENDS:
        return
    mesh = init_device_mesh("cpu", (world,))
    gen = torch.Generator().manual_seed(0)
    wholes = [torch.randn(4, 3, generator=gen) * scale for scale in (1.0, 10.0, 0.1)]

    def shard_of(whole, gaps):
        part = whole.chunk(world)[rank].clone()
        if gaps:  # the same values, every other element of a wider tensor
            return torch.zeros(part.shape[0], 2 * part.shape[1])[:, ::2].copy_(part)
        return part

    for name in ("lamb", "lars"):
        optimizer = FusedLAMB if name == "lamb" else FusedLARS
        options = dict(lr=0.05, max_grad_norm=0.5) if name == "lamb" else dict(LARS_OPTIONS)
        params = [torch.nn.Parameter(DTensor.from_local(shard_of(w, gaps=(i == 1 and rank == 0)), mesh, [Shard(0)],
                                                        run_check=False)) for i, w in enumerate(wholes)]
        references = [torch.nn.Parameter(w.clone()) for w in wholes]
        opt, ref_opt = optimizer(params, backend="auto", **options), optimizer(references, backend="torch", **options)
        for step in range(2):
            for i, (p, q) in enumerate(zip(params, references)):
                q.grad = torch.randn(4, 3, generator=torch.Generator().manual_seed(10 * i + step))
                p.grad = DTensor.from_local(q.grad.chunk(world)[rank].clone(), mesh, [Shard(0)], run_check=False)
            opt.step()
            ref_opt.step()
        buckets = sorted(key[2] for key in opt._backends)
        assert buckets == (["cpp", "torch"] if rank == 0 else ["cpp"]), buckets  # the case is what it says
        for p, q in zip(params, references):
            assert rel_error(full(p), q) <= PARAM_RTOL, (rank, name, rel_error(full(p), q))


def test_norms_are_summed_by_tensor_when_buckets_differ_between_ranks():
    spawn(buckets_that_differ_between_ranks, 2)


def bf16_states_on_dtensors(rank, world):
    """bf16 states of sharded parameters: created as DTensors of bf16 shards, and converted there
    when a group's state_dtype changes between steps (LAMB's m and v, LARS's buffers); 8-bit states
    of a parameter whose shards cannot hold whole blocks kept in float32, and an 8-bit checkpoint of
    a plain parameter loaded into sharded float32 states."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    for optimizer, options in ((FusedLAMB, dict(lr=1e-2)), (FusedLARS, dict(lr=0.1, momentum=0.9))):
        for backend in BACKENDS:
            keys = ("exp_avg", "exp_avg_sq") if optimizer is FusedLAMB else ("momentum_buffer",)
            for start in (torch.float32, torch.bfloat16):
                p = torch.nn.Parameter(distribute_tensor(torch.randn(8, 4, generator=torch.Generator().manual_seed(0)),
                                                         mesh, [Shard(0)]))
                opt = optimizer([p], backend=backend, state_dtype=start, **options)
                for step in range(3):
                    grad = torch.randn(8, 4, generator=torch.Generator().manual_seed(10 + step))
                    p.grad = distribute_tensor(grad, mesh, [Shard(0)])
                    if step == 2:
                        opt.param_groups[0]["state_dtype"] = torch.bfloat16
                    opt.step()
                for key in keys:
                    state = opt.state[p][key]
                    assert state.dtype == torch.bfloat16 and state.to_local().dtype == torch.bfloat16, (key, backend)
                    assert torch.isfinite(state.to_local().float()).all()
                # 8-bit states of a parameter whose rows (4 elements) cannot hold whole blocks of
                # 256 in every shard: kept in float32 (tests/test_sharded_int8.py has the coded ones).
                opt.param_groups[0]["state_dtype"] = "int8"
                opt.step()
                assert all(opt.state[p][key].dtype == torch.float32 for key in keys), backend
                assert not any(key.endswith("_scales") for key in opt.state[p]), backend
    # A full int8 checkpoint (one process) loads into sharded float32 states: decoded whole, then
    # each rank keeps its own part (blocks of 256 do not follow the shards).
    from lamb_kernels.quantization import dequantize

    full = torch.randn(600, generator=torch.Generator().manual_seed(1))
    plain = torch.nn.Parameter(full.clone())
    saver = FusedLAMB([plain], lr=1e-2, backend="torch", state_dtype="int8")
    plain.grad = torch.randn(600, generator=torch.Generator().manual_seed(2))
    saver.step()
    saved = saver.state_dict()
    sharded = torch.nn.Parameter(distribute_tensor(full.clone(), mesh, [Shard(0)]))
    loader = FusedLAMB([sharded], lr=1e-2, backend=BACKENDS[0])
    loader.load_state_dict(saved)
    for key in ("exp_avg", "exp_avg_sq"):
        exact = dequantize(saved["state"][0][key], saved["state"][0][key + "_scales"])
        local = loader.state[sharded][key].to_local()
        assert torch.equal(local, exact[rank * 300:(rank + 1) * 300]), key
        assert key + "_scales" not in loader.state[sharded]


def test_bf16_states_of_sharded_parameters_and_int8_kept_in_float32_without_whole_blocks():
    spawn(bf16_states_on_dtensors, 2)
