"""The "cuda" backend (csrc/cuda): how it is chosen, loaded and refused everywhere, and on a GPU what
the shared suites do not reach: the scalar and vectorized variants, tensors beyond 2^31 elements,
and its agreement with the Triton kernels. Every float64-reference suite runs it too, through
the (device, backend) cases of `on_every_backend` (harness.py)."""
import warnings

import pytest
import torch

import lamb_kernels
from lamb_kernels import FusedLAMB, FusedLARS, build_cache, extension
from lamb_kernels.backends import BACKEND_NAMES, resolve_backend
from tolerances import BACKENDS_ATOL, BACKENDS_RTOL, SAME_MATH_ATOL, SAME_MATH_RTOL

GPU = torch.cuda.is_available()
CUDA_BACKEND = GPU and "cuda" in lamb_kernels.available_backends("cuda")
needs_cuda_backend = pytest.mark.skipif(not CUDA_BACKEND, reason="no CUDA device, or the cuda backend is unavailable")


def test_cuda_is_a_backend_that_cpu_parameters_refuse_by_name(monkeypatch):
    assert "cuda" in BACKEND_NAMES
    assert "cuda" not in lamb_kernels.available_backends("cpu")
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.ones(3)
    with pytest.raises(ValueError, match=r"backend='cuda' is not available on cpu: the CUDA kernels run on CUDA"):
        FusedLAMB([p], backend="cuda").step()
    monkeypatch.setenv("LAMB_KERNELS_BACKEND", "cuda")
    with pytest.raises(ValueError, match="LAMB_KERNELS_BACKEND='cuda' is not available on cpu"):
        FusedLARS([p]).step()
    assert torch.equal(p, torch.ones(3))


def test_auto_takes_the_first_backend_that_can_run_without_asking_the_others(monkeypatch):
    """So that "auto" with triton working never builds the CUDA kernels (a minute or two)."""
    asked = []

    def reason(name, device_type):
        asked.append(name)
        return None

    monkeypatch.setattr(lamb_kernels.backends, "_unavailable_reason", reason)
    assert resolve_backend("auto", torch.device("cuda")) == "triton"
    assert resolve_backend("auto", torch.device("cpu")) == "cpp"
    assert asked == ["triton", "cpp"]


def test_a_failed_cuda_build_warns_once_and_raises_with_the_builds_error(monkeypatch, tmp_path):
    def broken_build(work, arches, *args, **kwargs):
        raise RuntimeError("nvcc: no such architecture sm_99")

    monkeypatch.setattr(extension, "load", lambda: "cpu library")  # the CPU library is there
    monkeypatch.setattr(extension, "_cuda_outcome", None)
    monkeypatch.setattr(extension, "_device_arch", lambda: "99")
    monkeypatch.setattr(extension, "_cuda_build_key", lambda arch: "test")
    monkeypatch.setattr(build_cache, "cache_directory", lambda: tmp_path)
    monkeypatch.setattr(extension, "build_cuda", broken_build)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            with pytest.raises(extension.ExtensionUnavailable, match="no such architecture sm_99"):
                extension.load_cuda()
        assert "no such architecture sm_99" in extension.cuda_unavailable_reason()
    ours = [w for w in caught if "CUDA C++ backend is unavailable" in str(w.message)]
    assert len(ours) == 1, [str(w.message) for w in caught]
    assert (tmp_path / f"{extension.CUDA_LIBRARY_NAME}_test").is_dir()  # the build ran in the patched cache
    assert not list(tmp_path.glob("*/*.so"))  # nothing half-built where a later process would load it


def test_the_cuda_sources_travel_with_the_package():
    for name in (*extension.CUDA_SOURCES, *extension.CUDA_HEADERS):
        assert (extension.CSRC / name).exists(), name
    setup = (extension.CSRC.parent / "setup.py").read_text() if (extension.CSRC.parent / "setup.py").exists() else ""
    if setup:  # a checkout: the package data takes every kind of file csrc/cuda holds
        suffixes = {name.rsplit(".", 1)[1] for name in (*extension.CUDA_SOURCES, *extension.CUDA_HEADERS)
                    if name.startswith("cuda/")}
        assert all(f'"cuda/*.{suffix}"' in setup for suffix in suffixes), suffixes


# -- on a GPU --------------------------------------------------------------------------------------

def _run(algorithm, backend, params_of, steps=3, **options):
    cls = FusedLAMB if algorithm == "lamb" else FusedLARS
    defaults = dict(lr=1e-2, weight_decay=0.01) if algorithm == "lamb" else dict(lr=0.1, momentum=0.9,
                                                                                    weight_decay=1e-4)
    params = params_of()
    opt = cls(params, backend=backend, **{**defaults, **options})
    gen = torch.Generator(device="cuda").manual_seed(1)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen, device="cuda", dtype=p.dtype)
        opt.step()
    return params


def _shapes_params(offset):
    """Tensors of odd and empty sizes; `offset` 1 makes every tensor a view one element in, so no
    pointer is 16-byte aligned and the scalar variant runs."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    params = []
    for n in (0, 1, 7, 8, 4097, 16384, 16385, 3 * 16384 + 5):
        base = torch.randn(n + offset, generator=gen, device="cuda")
        params.append(torch.nn.Parameter(base[offset:].clone() if offset == 0 else base[offset:]))
    return params


@pytest.mark.gpu
@needs_cuda_backend
@pytest.mark.parametrize("algorithm", ["lamb", "lars"])
def test_scalar_and_vectorized_variants_agree(algorithm):
    aligned = _run(algorithm, "cuda", lambda: _shapes_params(0))
    unaligned = _run(algorithm, "cuda", lambda: _shapes_params(1))
    for a, b in zip(aligned, unaligned):
        torch.testing.assert_close(b, a, rtol=SAME_MATH_RTOL, atol=SAME_MATH_ATOL)


@pytest.mark.gpu
@needs_cuda_backend
@pytest.mark.parametrize("algorithm", ["lamb", "lars"])
def test_reruns_give_the_same_bits_and_agree_with_triton(algorithm):
    first = _run(algorithm, "cuda", lambda: _shapes_params(0))
    again = _run(algorithm, "cuda", lambda: _shapes_params(0))
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    if "triton" in lamb_kernels.available_backends("cuda"):
        triton = _run(algorithm, "triton", lambda: _shapes_params(0))
        for a, b in zip(first, triton):
            torch.testing.assert_close(a, b, rtol=BACKENDS_RTOL, atol=BACKENDS_ATOL)


@pytest.mark.gpu
@needs_cuda_backend
def test_a_tensor_over_two_to_the_31_elements():
    """64-bit element offsets: the last elements of a 2^31 + 16 element bf16 tensor step like the first."""
    free, _ = torch.cuda.mem_get_info()
    n = 2**31 + 16
    if free < 30 * 2**30:
        pytest.skip(f"needs about 30 GiB of free GPU memory, {free / 2**30:.0f} GiB free")
    p = torch.nn.Parameter(torch.ones(n, device="cuda", dtype=torch.bfloat16))
    p.grad = torch.ones_like(p)
    FusedLAMB([p], lr=1e-2, weight_decay=0.0, max_grad_norm=0.0, backend="cuda").step()
    head, tail = p[:16].float(), p[-16:].float()
    assert torch.equal(head, tail) and bool((head < 1).all()), (head, tail)
