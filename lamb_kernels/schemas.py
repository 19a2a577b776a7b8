"""The four stages every native operator family implements, with one schema each: the C++ operators
``torch.ops.lamb_kernels.<stage>`` (csrc/ops.cpp) and the Triton ones
``torch.ops.lamb_kernels.triton_<stage>`` take the same arguments in the same order, and their fake
kernels (shapes and dtypes without running, for torch.compile and opcheck) are written here once.

    sums_of_squares(Tensor[] tensors, Tensor[]? paired, int chunk_size) -> Tensor
        per tensor, the sum of squares: [n] fp32, or [n, 2] with `paired` (both read in one pass)
    lamb_moments(Tensor[] params, Tensor[] grads, Tensor(a!)[] exp_avgs, Tensor(b!)[] exp_avg_sqs,
                 Tensor(c!)[] exp_avg_scales, Tensor(e!)[] exp_avg_sq_scales, Tensor hyper,
                 Tensor? grad_sumsq, Tensor? grad_scale, Tensor? found_inf, int chunk_size) -> Tensor
        LAMB steps 1-5, moments in place; per tensor ||p||^2 and ||u||^2, [n, 2]
    lamb_apply(Tensor(a!)[] params, Tensor[] exp_avgs, Tensor[] exp_avg_sqs, Tensor[] exp_avg_scales,
               Tensor[] exp_avg_sq_scales, Tensor hyper, Tensor norms, Tensor? found_inf,
               Tensor(d!)[] copies, int chunk_size) -> ()
        LAMB steps 6-7
    lars_apply(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers,
               Tensor(e!)[] buffer_scales, Tensor hyper, Tensor? norms, Tensor? grad_scale,
               Tensor? found_inf, Tensor(c!)[] copies, int chunk_size) -> ()
        LARS, docs/design.md section 3
    lamb_update(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs,
                Tensor(e!)[] exp_avg_scales, Tensor(f!)[] exp_avg_sq_scales, Tensor hyper,
                Tensor? grad_sumsq, Tensor? grad_scale, Tensor? found_inf, Tensor(d!)[] copies,
                int chunk_size, int cache_bytes) -> ()
        LAMB steps 1-7 of a bucket without sharded tensors: lamb_moments then lamb_apply, their bits
    lars_update(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers,
                Tensor(e!)[] buffer_scales, Tensor hyper, Tensor? grad_scale, Tensor? found_inf,
                Tensor(c!)[] copies, bool adaptive, int chunk_size, int cache_bytes) -> ()
        LARS of a bucket without sharded tensors: the norms (when `adaptive`) then lars_apply
        The update stages run on CPU by cache groups of at most `cache_bytes` (docs/benchmark.md,
        "The schedule"); the CUDA and Triton families run the two passes in turn.

The ``*_scales`` lists are empty for float states; for 8-bit states (m and momentum buffers int8
codes, v uint8) they hold each state's float32 block scales (lamb_kernels/quantization.py).

`hyper` is the bucket's hyperparameter table (lamb_kernels/hyper_table.py); `chunk_size` the elements per
chunk (one program, or one task of a thread). docs/design.md section 7 says what each computes.
"""
import torch

# The schemas, as csrc/ops.cpp declares them (tests/test_cpp_backend.py checks that they agree).
SCHEMAS = {
    "sums_of_squares": "(Tensor[] tensors, Tensor[]? paired, int chunk_size) -> Tensor",
    "lamb_moments": "(Tensor[] params, Tensor[] grads, Tensor(a!)[] exp_avgs, Tensor(b!)[] exp_avg_sqs, "
                    "Tensor(c!)[] exp_avg_scales, Tensor(e!)[] exp_avg_sq_scales, Tensor hyper, Tensor? grad_sumsq, Tensor? grad_scale, Tensor? found_inf, "
                    "int chunk_size) -> Tensor",
    "lamb_apply": "(Tensor(a!)[] params, Tensor[] exp_avgs, Tensor[] exp_avg_sqs, Tensor[] exp_avg_scales, "
                  "Tensor[] exp_avg_sq_scales, Tensor hyper, Tensor norms, Tensor? found_inf, Tensor(d!)[] copies, "
                  "int chunk_size) -> ()",
    "lars_apply": "(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, Tensor(e!)[] buffer_scales, "
                  "Tensor hyper, Tensor? norms, Tensor? grad_scale, Tensor? found_inf, Tensor(c!)[] copies, "
                  "int chunk_size) -> ()",
    "lamb_update": "(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
                   "Tensor(e!)[] exp_avg_scales, Tensor(f!)[] exp_avg_sq_scales, Tensor hyper, Tensor? grad_sumsq, "
                   "Tensor? grad_scale, Tensor? found_inf, Tensor(d!)[] copies, int chunk_size, int cache_bytes) -> ()",
    "lars_update": "(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, Tensor(e!)[] buffer_scales, "
                   "Tensor hyper, Tensor? grad_scale, Tensor? found_inf, Tensor(c!)[] copies, bool adaptive, "
                   "int chunk_size, int cache_bytes) -> ()",
}
STAGES = tuple(SCHEMAS)


def _sums_of_squares(tensors, paired, chunk_size):
    shape = (len(tensors),) if paired is None else (len(tensors), 2)
    return torch.empty(shape, dtype=torch.float32, device=tensors[0].device if tensors else "cpu")


def _lamb_moments(params, grads, exp_avgs, exp_avg_sqs, exp_avg_scales, exp_avg_sq_scales, hyper, grad_sumsq, grad_scale, found_inf, chunk_size):
    return hyper.new_empty((len(params), 2), dtype=torch.float32)


def _lamb_apply(params, exp_avgs, exp_avg_sqs, exp_avg_scales, exp_avg_sq_scales, hyper, norms, found_inf, copies, chunk_size):
    return None


def _lars_apply(params, grads, momentum_buffers, buffer_scales, hyper, norms, grad_scale, found_inf, copies, chunk_size):
    return None


def _lamb_update(params, grads, exp_avgs, exp_avg_sqs, exp_avg_scales, exp_avg_sq_scales, hyper, grad_sumsq, grad_scale,
                 found_inf, copies, chunk_size, cache_bytes):
    return None


def _lars_update(params, grads, momentum_buffers, buffer_scales, hyper, grad_scale, found_inf, copies, adaptive,
                 chunk_size, cache_bytes):
    return None


FAKES = {"sums_of_squares": _sums_of_squares, "lamb_moments": _lamb_moments, "lamb_apply": _lamb_apply,
         "lars_apply": _lars_apply, "lamb_update": _lamb_update, "lars_update": _lars_update}


def register_fakes(prefix: str) -> None:
    """Registers the fake kernels of the operator family ``lamb_kernels::<prefix><stage>``."""
    for stage in STAGES:
        torch.library.register_fake(f"lamb_kernels::{prefix}{stage}", FAKES[stage])
