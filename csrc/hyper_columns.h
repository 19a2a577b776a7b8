// Columns of the per-tensor hyperparameter tables (float32 [n_tensors, width]) that the Python side
// builds each step. They mirror LambColumn and LarsColumn in lamb_kernels/hyper_table.py.
#pragma once

namespace lamb_kernels {

enum LambColumn : int {
  kLambLr = 0,
  kLambBeta1 = 1,
  kLambBeta2 = 2,
  kLambBeta3 = 3,
  kLambOneMinusBeta2 = 4,
  kLambEps = 5,
  kLambWdL2 = 6,          // weight decay added to the grad (L2 mode), else 0
  kLambWdDecoupled = 7,   // weight decay added to the update (AdamW mode), else 0
  kLambBc1 = 8,           // 1 - beta1^t, or 1 without bias correction
  kLambBc2 = 9,
  kLambMaxGradNorm = 10,  // 0: this tensor's group does not clip
  kLambAdapt = 11,        // 1: apply the trust ratio
  kLambRatioLo = 12,
  kLambRatioHi = 13,
  kLambKeyLo = 14,        // bf16 states: this step's rounding key (lamb_kernels/rounding.py), low 16 bits
  kLambKeyHi = 15,        //   and high 16 bits
  kLambColumns = 16,
};

enum LarsColumn : int {
  kLarsLr = 0,
  kLarsMomentum = 1,
  kLarsOneMinusDampening = 2,
  kLarsWeightDecay = 3,
  kLarsTrustCoeff = 4,
  kLarsEps = 5,
  kLarsTrustClip = 6,    // 1: LARC, r <- min(r / lr, 1)
  kLarsAdapt = 7,        // 1: trust ratio and weight decay apply
  kLarsNesterov = 8,
  kLarsHasMomentum = 9,  // 0: no buffer
  kLarsFirstStep = 10,   // 1: the buffer is new and becomes d
  kLarsKeyLo = 11,       // bf16 buffers: this step's rounding key (lamb_kernels/rounding.py), low 16 bits
  kLarsKeyHi = 12,       //   and high 16 bits
  kLarsColumns = 16,
};

}  // namespace lamb_kernels
