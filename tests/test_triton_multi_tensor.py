"""The Triton backend's contract (docs/design.md section 4): a fixed number of launches per step whatever the
number of tensors, tables built once and reused, reductions in a fixed order."""
import pytest
import torch

import lamb_kernels
from lamb_kernels import FusedLAMB

if "triton" not in lamb_kernels.available_backends("cpu") + lamb_kernels.available_backends("cuda"):
    pytest.skip("the triton backend is not available here", allow_module_level=True)

from lamb_kernels.triton import lamb, multi_tensor  # noqa: E402
from harness import count_table_builds  # noqa: E402
from tolerances import LONG_SUM_RTOL  # noqa: E402

DEVICE = "cpu" if "triton" in lamb_kernels.available_backends("cpu") else "cuda"


class CountingKernel:
    def __init__(self, kernel, launches, name):
        self.kernel, self.launches, self.name = kernel, launches, name

    def __getitem__(self, grid):
        self.launches.append(self.name)
        return self.kernel[grid]


@pytest.fixture
def launches(monkeypatch):
    record = []
    for module, name in ((multi_tensor, "_chunk_sumsq_kernel"), (multi_tensor, "_segment_sum_kernel"),
                         (lamb, "_lamb_moments_kernel"), (lamb, "_lamb_apply_kernel")):
        monkeypatch.setattr(module, name, CountingKernel(getattr(module, name), record, name))
    return record


def step_launches(n_tensors, launches, **kwargs):
    params = [torch.nn.Parameter(torch.randn(7 + i, device=DEVICE)) for i in range(n_tensors)]
    opt = FusedLAMB(params, backend="triton", **kwargs)
    for p in params:
        p.grad = torch.randn_like(p)
    launches.clear()
    opt.step()
    return list(launches)


def test_launches_do_not_grow_with_the_tensor_count(launches):
    with_clipping = step_launches(3, launches)
    assert with_clipping == step_launches(60, launches)
    # Three passes over memory: grad norm, moments + norms, apply; two fixed-order reductions.
    assert sorted(with_clipping) == sorted(["_chunk_sumsq_kernel", "_segment_sum_kernel",
                                            "_lamb_moments_kernel", "_segment_sum_kernel",
                                            "_lamb_apply_kernel"])
    # Clipping off: no pass over the grads for their norm.
    without = step_launches(60, launches, max_grad_norm=None)
    assert sorted(without) == sorted(["_lamb_moments_kernel", "_segment_sum_kernel", "_lamb_apply_kernel"])


def test_tables_are_built_once_and_follow_new_addresses(monkeypatch):
    builds = count_table_builds(monkeypatch)
    params = [torch.nn.Parameter(torch.randn(n, device=DEVICE)) for n in (5, 300, 9000)]
    grads = [torch.randn_like(p) for p in params]
    opt = FusedLAMB(params, backend="triton")
    multi_tensor._TABLES.clear()
    for _ in range(3):
        for p, g in zip(params, grads):
            g.normal_()
            p.grad = g  # the same grad tensors every step, as with zero_grad(set_to_none=False)
        opt.step()
    tables = {key[0]: table for key, table in multi_tensor._TABLES.items()}
    assert len(multi_tensor._TABLES) == 3  # the grad norm, the moments, the apply
    assert all(builds(table) == {"chunks": 1, "pointers": 1} for table in tables.values())
    params[1].grad = torch.randn_like(params[1])  # a new grad tensor: new address, same sizes
    opt.step()
    assert len(multi_tensor._TABLES) == 3
    pointers = {name: builds(table)["pointers"] for name, table in tables.items()}
    assert pointers == {"sums_of_squares": 2, "lamb_moments": 2, "lamb_apply": 1}
    assert all(builds(table)["chunks"] == 1 for table in tables.values())


def test_segment_sum_adds_each_segment_in_a_fixed_order():
    gen = torch.Generator().manual_seed(0)
    partials = (torch.randn(3000, 2, generator=gen) * torch.logspace(-8, 8, 3000)[:, None]).to(DEVICE)
    bounds = torch.tensor([0, 0, 1, 1500, 3000], dtype=torch.int32, device=DEVICE)
    first = multi_tensor.segment_sum(partials, bounds, 4)
    for _ in range(3):
        assert torch.equal(multi_tensor.segment_sum(partials, bounds, 4), first)
    expected = torch.stack([partials[a:b].double().sum(0) for a, b in [(0, 0), (0, 1), (1, 1500), (1500, 3000)]])
    torch.testing.assert_close(first.double(), expected, rtol=LONG_SUM_RTOL, atol=0)


def test_chunk_map_covers_every_element_once():
    sizes = [0, 1, multi_tensor.CHUNK, multi_tensor.CHUNK + 1, 0, 3 * multi_tensor.CHUNK - 5]
    table = multi_tensor.MultiTensorTable(torch.device(DEVICE))
    tensors = [torch.ones(n, device=DEVICE) for n in sizes]
    table.update([tensors])
    assert table.per_tensor_sumsq(1).sum().item() == sum(sizes)
    assert table.tensor_chunks.tolist() == [0, 0, 1, 2, 4, 4, 7]
    per_chunk = torch.empty(table.n_chunks, 1, device=DEVICE)
    per_chunk[:] = 1.0
    assert table.per_tensor_sum(per_chunk).flatten().tolist() == [0, 1, 1, 2, 0, 3]


def test_the_vectorized_variant_is_chosen_where_every_tensor_is_16_byte_aligned(monkeypatch):
    aligned = [torch.randn(n, device=DEVICE) for n in (5, 3000)]
    table = multi_tensor.MultiTensorTable(torch.device(DEVICE))
    table.update([aligned])
    assert table.align
    view = torch.randn(3001, device=DEVICE)[1:]  # four bytes into its storage
    table.update([[aligned[0], view]])
    assert not table.align
    monkeypatch.setenv(multi_tensor.VECTORIZE_VAR, "0")
    forced = multi_tensor.MultiTensorTable(torch.device(DEVICE))
    forced.update([aligned])
    assert not forced.align


@pytest.mark.parametrize("algorithm", ["lamb", "lars"])
def test_scalar_and_vectorized_variants_give_the_same_bits(monkeypatch, algorithm):
    """The ALIGN hint changes how memory is accessed, never the arithmetic: both variants step alike,
    bf16 params with fp32 masters and momentum included."""
    results = []
    for vectorize in ("1", "0"):
        monkeypatch.setenv(multi_tensor.VECTORIZE_VAR, vectorize)
        multi_tensor._TABLES.clear()
        gen = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(n, generator=gen).to(DEVICE, torch.bfloat16))
                  for n in (3, multi_tensor.BLOCK + 5, multi_tensor.CHUNK + 9)]
        options = dict(lr=1e-2, weight_decay=0.01) if algorithm == "lamb" else dict(lr=0.1, momentum=0.9,
                                                                                      weight_decay=1e-4)
        cls = FusedLAMB if algorithm == "lamb" else lamb_kernels.FusedLARS
        opt = cls(params, backend="triton", master_weights=True, **options)
        for _ in range(2):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen).to(DEVICE, torch.bfloat16)
            opt.step()
        assert all(table.align == (vectorize == "1") for table in multi_tensor._TABLES.values())
        results.append([p.detach().clone() for p in params] + [opt.state[p]["master_param"] for p in params])
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_operators_take_empty_lists_as_the_cpp_ones_do():
    hyper = torch.zeros(0, 16, device=DEVICE)
    ops = torch.ops.lamb_kernels
    assert ops.triton_lamb_moments([], [], [], [], [], [], hyper, None, None, None, multi_tensor.CHUNK).shape == (0, 2)
    ops.triton_lamb_apply([], [], [], [], [], hyper, torch.zeros(0, 2, device=DEVICE), None, [], multi_tensor.CHUNK)
    assert ops.triton_sums_of_squares([], None, multi_tensor.CHUNK).shape == (0,)


def test_a_table_a_cuda_graph_holds_is_never_evicted_and_keeps_what_it_replaces(monkeypatch):
    """A captured graph reads a table's device tensors at every replay (pinned is set while capturing,
    which needs a GPU; here it is set by hand)."""
    monkeypatch.setattr(multi_tensor, "_TABLES_KEPT", 2)
    multi_tensor._TABLES.clear()
    held = multi_tensor.table_for("held", [[torch.randn(3, device=DEVICE)]])
    held.pinned = True
    for name in ("a", "b", "c"):
        multi_tensor.table_for(name, [[torch.randn(3, device=DEVICE)]])
    assert any(table is held for table in multi_tensor._TABLES.values())
    assert len(multi_tensor._TABLES) == 2
    replaced = held.pointers
    held.update([[torch.randn(3, device=DEVICE)]])  # a new address: the offsets are rebuilt
    assert held.pointers is not replaced and any(t is replaced for t in held._kept)
    multi_tensor._TABLES.clear()
