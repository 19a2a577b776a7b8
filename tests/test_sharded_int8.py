"""8-bit states (``state_dtype="int8"``) of sharded parameters (docs/states.md, "Sharded parameters"),
on CPU with gloo in spawned processes: FSDP2 at 2 and 4 ranks (uneven and empty shards), tensor
parallel's colwise and rowwise weights under FSDP, HSDP; the block layout (the single process's
blocks, each inside one rank's shard); the all-reduce count; GradScaler; DCP checkpoints resumed
bit for bit and resharded 4 -> 2 and 2 -> 4; full state dicts both ways; int8 <-> float32 and bf16
across a reshard; the refusals that remain.

The bound against one process fed the gathered grads: each run keeps every stored value within one
code gap (2^-3 of it) of the fp32 value it rounds, and tests/test_int8_states.py holds each run's
movement within 2^-3 of the float64 reference's; two such runs (the same blocks, other random bits:
a rank indexes its shard's elements from 0) differ by at most the sum, 2 x 2^-3 of the movement."""
import copy
import os

import pytest
import torch

dist = pytest.importorskip("torch.distributed")
if not dist.is_available():
    pytest.skip("torch without distributed support", allow_module_level=True)

from distributed_harness import (CountingAllReduce, full, in_turn, load_checkpoint, save_checkpoint, spawn,  # noqa: E402
                                 train_steps)

import lamb_kernels  # noqa: E402
from lamb_kernels import FusedLAMB, FusedLARS  # noqa: E402
from lamb_kernels.quantization import dequantize  # noqa: E402
from test_distributed import LARS_OPTIONS, MLP, shard  # noqa: E402

BACKENDS = lamb_kernels.available_backends("cpu")
BOUND = 2 * 2.0**-3
STEPS = 4
WIDTH = 256
CODED = {"exp_avg", "exp_avg_sq", "momentum_buffer"}


class CodedNet(torch.nn.Module):
    """Rows of 2 x 256 (8-bit blocks inside every shard), 3 of them (uneven at 2 ranks, an empty shard
    at 4), rows of 256, a weight whose rows are 3 elements and 1-D biases (kept in float32 when
    sharded), and a 1-element parameter."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(2 * WIDTH, 3)
        self.b = torch.nn.Linear(3, WIDTH)
        self.c = torch.nn.Linear(WIDTH, WIDTH)
        self.scale = torch.nn.Parameter(torch.full((1,), 1.5))

    def forward(self, x):
        return self.c(torch.tanh(self.b(torch.tanh(self.a(x))))) * self.scale


def loss_of(model, step):
    width = 2 * WIDTH if isinstance(model, CodedNet) else WIDTH
    x = torch.randn(16, width, generator=torch.Generator().manual_seed(1000 + step))
    return model(x).square().mean()


def make(name, params, backend, state_dtype="int8", **extra):
    optimizer = FusedLAMB if name == "lamb" else FusedLARS
    options = dict(lr=0.02, max_grad_norm=None) if name == "lamb" else dict(LARS_OPTIONS)
    return optimizer(params, backend=backend, state_dtype=state_dtype, **{**options, **extra})


def values(state, key):
    """A state entry's whole values (decoded when codes): every rank calls it."""
    t = full(state[key])
    return dequantize(t, full(state[key + "_scales"]).reshape(-1)) if t.dtype in (torch.int8, torch.uint8) else t


def movement_error(p, q, start):
    return float((full(p).detach() - q.detach()).norm() / (q.detach() - start).norm())


def against_one_process(rank, world, cases):
    """Each case: a sharded model and optimizer with int8 states, and one process fed the gathered
    grads. After LAMB's first step (no clipping), every block scale is the single process's, bit for
    bit (the same blocks); after STEPS, params and decoded states within BOUND."""
    for layout, name, backend, extra in cases:
        torch.manual_seed(0)
        reference = CodedNet() if layout in ("fsdp", "hsdp") else MLP(width=WIDTH, hidden=2 * WIDTH)
        model = shard(copy.deepcopy(reference), layout, world)
        opt, ref_opt = make(name, model.parameters(), backend, **extra), make(name, reference.parameters(), backend, **extra)
        params = dict(model.named_parameters())
        start = {n: q.detach().clone() for n, q in reference.named_parameters()}
        for step in range(STEPS):
            loss_of(model, step).backward()
            for n, q in reference.named_parameters():
                q.grad = full(params[n].grad).clone()
            opt.step()
            ref_opt.step()
            opt.zero_grad()
            ref_opt.zero_grad()
            for n, q in reference.named_parameters():
                p, where = params[n], (rank, layout, name, backend, n)
                state, ref_state = opt.state[p], ref_opt.state[q]
                for key in sorted(CODED & state.keys()):
                    coded = state[key].dtype in (torch.int8, torch.uint8)
                    # Blocks inside every shard: a weight whose rows are a multiple of 256 long (or
                    # split along such rows); the others keep float32 states.
                    assert coded == (p.shape[-1] % WIDTH == 0 and p.dim() == 2), where + (key, state[key].dtype)
                    if coded and step == 0 and name == "lamb" and "max_grad_norm" not in extra:
                        # (LAMB's first m and v come from the grads alone; LARS's buffer and a clipped
                        # grad from all-reduced norms, summed in another order than one process's)
                        scales = full(state[key + "_scales"])
                        assert scales.shape == (*p.shape[:-1], p.shape[-1] // WIDTH), where
                        assert torch.equal(scales.reshape(-1), ref_state[key + "_scales"]), where + (key,)
                    if step == STEPS - 1:
                        err = float((values(state, key) - values(ref_state, key)).norm() / values(ref_state, key).norm())
                        assert err <= BOUND, where + (key, err)
        for n, q in reference.named_parameters():
            err = movement_error(params[n], q, start[n])
            assert err <= BOUND, (rank, layout, name, backend, n, err)


def lamb_and_lars(layout, backends=BACKENDS):
    return [(layout, name, backend, extra) for backend in backends
            for name, extra in (("lamb", {}), ("lamb", dict(max_grad_norm=0.05)), ("lars", {}))]


def test_fsdp2_int8_states_match_one_process():
    spawn(against_one_process, 2, lamb_and_lars("fsdp"))


def test_fsdp2_int8_states_with_an_empty_shard_match_one_process():
    spawn(against_one_process, 4, lamb_and_lars("fsdp", [b for b in BACKENDS if b != "triton"]))


def test_tensor_parallel_colwise_rowwise_and_hsdp_int8_states_match_one_process():
    cases = [(layout, name, backend, {}) for layout in ("fsdp_tp", "hsdp") for name in ("lamb", "lars")
             for backend in BACKENDS if backend != "triton"]
    spawn(against_one_process, 4, cases)


def all_reduces_and_scaler(rank, world, backend):
    """int8 states add no collective: LAMB 2 all-reduces a step (grad norm and norm table; without
    clipping, the grads' presences and the table), LARS 1. An inf in one rank's shard: every rank
    skips the step, codes and scales unchanged."""
    for name, extra, count in (("lamb", dict(max_grad_norm=1.0), 2), ("lamb", {}, 2), ("lars", {}, 1)):
        torch.manual_seed(0)
        model = shard(CodedNet(), "fsdp", world)
        opt = make(name, model.parameters(), backend, **extra)
        for step in range(2):
            loss_of(model, step).backward()
            with CountingAllReduce() as counter:
                opt.step()
            assert counter.count == count, (rank, name, extra, counter.count)
            opt.zero_grad()
    torch.manual_seed(0)
    model = shard(CodedNet(), "fsdp", world)
    opt = make("lamb", model.parameters(), backend)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    for step in range(3):
        scaler.scale(loss_of(model, step)).backward()
        if step == 1 and rank == world - 1:
            model.c.weight.grad._local_tensor.view(-1)[0] = float("inf")
        before = [full(t).clone() for p in model.parameters() for t in (p, *opt.state[p].values())] if step == 1 else None
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        if step == 1:
            after = [full(t).clone() for p in model.parameters() for t in (p, *opt.state[p].values())]
            assert all(torch.equal(a, b) for a, b in zip(before, after)), rank
    assert float(opt.state[model.c.weight]["step"]) == 2.0


def test_int8_states_add_no_all_reduce_and_skip_an_inf_on_every_rank():
    for backend in [b for b in BACKENDS if b != "triton"]:
        spawn(all_reduces_and_scaler, 2, backend)


# -- checkpoints -------------------------------------------------------------------------------------

def checkpoint_run(rank, world, directory, name, saved_world, state_dtype, layout="fsdp"):
    """saved_world None: 2 steps with int8 states (the float dtype `state_dtype` with "from_float"),
    a DCP checkpoint, the whole states written by rank 0, 2 more steps, their params written. Else: a
    new model and optimizer of the checkpoint's state dtype, the checkpoint loaded (states equal to
    the saved ones bit for bit), the group's state_dtype set to `state_dtype` (converted at the next
    step), 2 steps: bit for bit the saved run at the same world size and state dtype, within BOUND
    of it otherwise."""
    saved_dtype = torch.float32 if state_dtype == "from_float" else "int8"
    target = "int8" if state_dtype == "from_float" else state_dtype
    torch.manual_seed(0)
    model = shard(CodedNet() if layout == "fsdp" else MLP(width=WIDTH, hidden=2 * WIDTH), layout, world)
    opt = make(name, model.parameters(), "cpp" if "cpp" in BACKENDS else "torch", state_dtype=saved_dtype)

    def train(steps):
        train_steps(model, opt, steps, loss_of)

    checkpoint = os.path.join(directory, "checkpoint")
    whole = lambda: {f"{n}.{k}": full(v).clone() for n, p in model.named_parameters()  # noqa: E731
                     for k, v in sorted(opt.state[p].items()) if k != "step"}
    if saved_world is None:
        train(range(2))
        save_checkpoint(model, opt, checkpoint)
        states = whole()
        start = {n: full(p).detach().clone() for n, p in model.named_parameters()}
    else:
        load_checkpoint(model, opt, checkpoint)
        saved_states = torch.load(os.path.join(directory, "states.pt"))
        loaded = whole()
        assert loaded.keys() == saved_states.keys(), (rank, sorted(loaded))
        assert all(torch.equal(loaded[k], saved_states[k]) for k in loaded), rank  # resharded bit for bit
        for group in opt.param_groups:
            group["state_dtype"] = target
    train(range(2, 4))
    results = {n: full(p).detach().clone() for n, p in model.named_parameters()}
    if saved_world is None:
        if rank == 0:
            torch.save(states, os.path.join(directory, "states.pt"))
            torch.save(results, os.path.join(directory, "params.pt"))
            torch.save(start, os.path.join(directory, "start.pt"))
        return
    weight = model.c.weight if layout == "fsdp" else model.layers[2].weight  # (rowwise under fsdp_tp)
    kinds = {k: v.dtype for k, v in opt.state[weight].items()}
    want = {"int8": torch.int8, torch.float32: torch.float32, torch.bfloat16: torch.bfloat16}[target]
    assert kinds[min(CODED & kinds.keys())] == want, (rank, kinds)  # (exp_avg, or momentum_buffer)
    saved, start = (torch.load(os.path.join(directory, f)) for f in ("params.pt", "start.pt"))
    for n, value in results.items():
        if saved_world == world and state_dtype == "int8":
            assert torch.equal(value, saved[n]), (rank, n)
        else:  # (the movement of the two steps after the checkpoint)
            moved = float((saved[n] - value).norm() / max(float((saved[n] - start[n]).norm()), 1e-12))
            assert moved <= BOUND, (rank, n, moved)


@pytest.mark.parametrize("name", ["lamb", "lars"])
def test_dcp_checkpoint_resumes_bit_for_bit_and_reshards(tmp_path, name):
    folder = str(tmp_path)
    # saved, then loaded at the same world size: bit for bit
    spawn(in_turn, 4, checkpoint_run, [(folder, name, None, "int8"), (folder, name, 4, "int8")])
    spawn(checkpoint_run, 2, folder, name, 4, "int8")  # 4 -> 2


def test_dcp_checkpoints_of_tensor_parallel_and_hsdp_resume_bit_for_bit(tmp_path):
    """Colwise and rowwise weights under FSDP (_StridedShard, and blocks along a split last
    dimension), HSDP's replicated dimension: the same world size."""
    runs = [(str(tmp_path / layout), "lamb", saved_world, "int8", layout)
            for layout in ("fsdp_tp", "hsdp") for saved_world in (None, 4)]
    spawn(in_turn, 4, checkpoint_run, runs)


def test_dcp_checkpoint_reshards_2_to_4_and_changes_state_dtype(tmp_path):
    folder = str(tmp_path)
    spawn(checkpoint_run, 2, folder, "lamb", None, "int8")
    spawn(in_turn, 4, checkpoint_run, [(folder, "lamb", 2, "int8"),  # 2 -> 4
                                       (folder, "lamb", 2, torch.float32),  # int8 -> float32 across it
                                       (folder, "lamb", 2, torch.bfloat16)])
    (tmp_path / "checkpoint").rename(tmp_path / "int8-checkpoint")
    spawn(checkpoint_run, 2, folder, "lars", None, "from_float")  # float32 -> int8 across it
    spawn(checkpoint_run, 4, folder, "lars", 2, "from_float")


def full_state_dicts(rank, world, layout="fsdp"):
    """One process's int8 state dict loads into sharded parameters, each rank keeping its blocks
    (codes and scales bit for bit); a sharded optimizer's state, gathered, loads into one process
    bit for bit; a 1-D parameter's codes (float32 when sharded) are decoded."""
    for name in ("lamb", "lars"):
        torch.manual_seed(0)
        single = CodedNet() if layout == "fsdp" else MLP(width=WIDTH, hidden=2 * WIDTH)
        model = shard(copy.deepcopy(single), layout, world)
        one = make(name, single.parameters(), BACKENDS[0])
        for step in range(2):
            loss_of(single, step).backward()
            one.step()
        sharded = make(name, model.parameters(), BACKENDS[0])
        sharded.load_state_dict(one.state_dict())
        for (n, p), q in zip(model.named_parameters(), single.parameters()):
            for key, value in one.state[q].items():
                if key.endswith("_scales") and key not in sharded.state[p]:
                    continue  # (a parameter whose shards cannot hold whole blocks: float32 states)
                loaded = sharded.state[p][key]
                expected = value if loaded.dtype == value.dtype or key == "step" else values(one.state[q], key)
                assert torch.equal(full(loaded).reshape(expected.shape), expected), (rank, name, n, key)
        gathered = sharded.state_dict()
        gathered["state"] = {i: {k: full(v) if k != "step" else v for k, v in entry.items()}
                             for i, entry in gathered["state"].items()}
        again = make(name, copy.deepcopy(single).parameters(), BACKENDS[0])
        again.load_state_dict(gathered)
        for p, q, r in zip(model.parameters(), single.parameters(), again.param_groups[0]["params"]):
            for key, value in sharded.state[p].items():
                if value.dtype in (torch.int8, torch.uint8) or key.endswith("_scales"):
                    assert torch.equal(again.state[r][key], one.state[q][key]), (rank, name, key)


def test_full_state_dicts_load_into_sharded_parameters_and_back():
    spawn(full_state_dicts, 2)
    spawn(full_state_dicts, 4, "fsdp_tp")  # colwise and rowwise weights under FSDP


def layouts_and_refusals(rank, world):
    """A replicated DTensor (blocks over the whole tensor) and one split on a middle dimension get
    codes; a Partial one in an int8 group is refused by name as in a float group; a rowwise weight
    whose last dimension splits into parts that are not multiples of 256 (768 over 4 ranks: 192) is
    refused by name, before any change."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    for placement, shape, scales in ((Replicate(), (600,), (3,)), (Shard(1), (4, 8, 256), (4, 8, 1))):
        p = torch.nn.Parameter(distribute_tensor(torch.randn(shape, generator=torch.Generator().manual_seed(0)),
                                                 mesh, [placement]))
        p.grad = distribute_tensor(torch.randn(shape, generator=torch.Generator().manual_seed(1)), mesh, [placement])
        opt = FusedLAMB([p], lr=0.01, state_dtype="int8", backend=BACKENDS[0])
        opt.step()
        codes, block_scales = opt.state[p]["exp_avg"], opt.state[p]["exp_avg_scales"]
        assert codes.dtype == torch.int8 and block_scales.shape == scales, (placement, block_scales.shape)
        assert block_scales.placements == p.placements and torch.isfinite(values(opt.state[p], "exp_avg")).all()
    partial = torch.nn.Parameter(DTensor.from_local(torch.ones(4, 256), mesh, [Partial()]))
    partial.grad = DTensor.from_local(torch.ones(4, 256), mesh, [Partial()])
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[0\] has the placement Partial"):
        FusedLAMB([partial], lr=0.01, state_dtype="int8", backend=BACKENDS[0])
    opt = FusedLAMB([torch.nn.Parameter(torch.ones(2))], lr=0.01, state_dtype="int8", backend=BACKENDS[0])
    opt.param_groups[0]["params"].append(partial)  # (a group edited after the constructor)
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[1\] has the placement Partial"):
        opt.step()
    p = torch.nn.Parameter(distribute_tensor(torch.randn(4, 768), mesh, [Shard(1)]))
    p.grad = distribute_tensor(torch.randn(4, 768), mesh, [Shard(1)])
    opt = FusedLAMB([p], lr=0.01, state_dtype="int8", backend=BACKENDS[0])
    before = p.to_local().clone()
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[0\].*split on its last dimension over 4 "
                                         r"ranks, 192 elements.*multiple of 256"):
        opt.step()
    assert torch.equal(p.to_local(), before) and not opt.state.get(p)
    opt.param_groups[0]["state_dtype"] = torch.bfloat16
    opt.step()  # the message's way out
    q = torch.nn.Parameter(distribute_tensor(torch.randn(4, 1024), mesh, [Shard(1)]))  # 256 a rank: kept
    q.grad = distribute_tensor(torch.randn(4, 1024), mesh, [Shard(1)])
    opt = FusedLAMB([q], lr=0.01, state_dtype="int8", backend=BACKENDS[0])
    opt.step()
    assert opt.state[q]["exp_avg"].dtype == torch.int8 and opt.state[q]["exp_avg_scales"].shape == (4, 4)


def test_replicated_and_middle_dimension_layouts_and_the_refusals_by_name():
    spawn(layouts_and_refusals, 4)
