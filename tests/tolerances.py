"""Every tolerance the tests use, named, with the reason for its size (docs/design.md section 5).
Errors are relative: the norm of the difference over the norm of the expected tensor, unless the
name says otherwise."""

# Against the float64 references (tests/lamb_float64.py, tests/lars_float64.py), fp32 arithmetic,
# after several steps.
PARAM_RTOL = 2e-5  # params and optimizer states
UPDATE_RTOL = 1e-3  # the accumulated update p_t - p_0, small beside p and so less well resolved
# Where fp32 rounding meets cancellation (an element stepped close to 0) a relative bound alone is
# meaningless: each element may also be off by this much (about 10 fp32 ulps at the size of a grad).
ELEMENT_ATOL = 1e-6

# The same fp32 steps taken two ways (another memory layout, another order of the same per-element
# operations, compiled against eager): a few ulps per element.
SAME_MATH_RTOL = 1e-6
SAME_MATH_ATOL = 1e-7

# Two backends whose arithmetic rounds in other places (the C++ and CUDA kernels multiply by
# 1 / (1 - beta^t) where the Triton kernels divide), after a few steps.
BACKENDS_RTOL = 1e-5
BACKENDS_ATOL = 1e-6

# Two backends through steps whose values reach the fp32 extremes (a trust ratio near overflow):
# their reductions add in another order, and the extremes magnify that.
BACKENDS_EXTREME_RTOL = 1e-5

# A long fp32 sum of squares (or of partial sums) against its float64 value: rows of at most 16384
# elements added in a fixed order keep it within a few fp32 roundings whatever the length.
LONG_SUM_RTOL = 1e-6

# Low-precision parameters written from fp32 masters that are a few ulps apart: at most one bf16
# rounding (8 bits of mantissa) apart.
BF16_RTOL = 2.0**-8

# One forward pass of a model computed two ways in fp32 (a conv as a linear layer over patches).
FORWARD_TOL = 1e-5
