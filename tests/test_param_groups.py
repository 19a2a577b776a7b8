"""lamb_kernels.param_groups: 1-D parameters and name matches go to a group without weight decay or
trust ratio, on real small models, for both optimizers."""
import pytest
import torch
from torch import nn

from lamb_float64 import Float64LAMB
from harness import on_every_backend, rel_error
from lamb_kernels import FusedLAMB, FusedLARS, param_groups
from tolerances import PARAM_RTOL
from lars_float64 import Float64LARS


def conv_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, bias=False),
                         nn.BatchNorm2d(8), nn.Flatten(), nn.Linear(8 * 4 * 4, 10))


def transformer_block():
    torch.manual_seed(0)
    return nn.TransformerEncoderLayer(d_model=16, nhead=2, dim_feedforward=32, batch_first=True)


def names(groups):
    return [sorted(group["param_names"]) for group in groups]


def named(model, weight_decay, **kwargs):
    return param_groups(model, weight_decay, with_names=True, **kwargs)


def test_conv_net_with_batch_norm():
    groups = named(conv_net(), weight_decay=1e-4)
    assert names(groups) == [["0.weight", "3.weight", "6.weight"],
                             ["0.bias", "1.bias", "1.weight", "4.bias", "4.weight", "6.bias"]]
    assert groups[0]["weight_decay"] == 1e-4 and "layer_adaptation" not in groups[0]
    assert groups[1]["weight_decay"] == 0.0 and groups[1]["layer_adaptation"] is False


def test_transformer_block_with_name_patterns():
    model = transformer_block()
    groups = named(model, weight_decay=0.01, lr=1e-3)
    assert names(groups)[0] == ["linear1.weight", "linear2.weight", "self_attn.in_proj_weight",
                                "self_attn.out_proj.weight"]
    assert all(group["lr"] == 1e-3 for group in groups)
    # A name pattern excludes 2-D weights too; without exclude_1d only the patterns count.
    groups = named(model, weight_decay=0.01, no_decay=("linear1", "norm"), exclude_1d=False)
    assert names(groups) == [
        ["linear2.bias", "linear2.weight", "self_attn.in_proj_bias", "self_attn.in_proj_weight",
         "self_attn.out_proj.bias", "self_attn.out_proj.weight"],
        ["linear1.bias", "linear1.weight", "norm1.bias", "norm1.weight", "norm2.bias", "norm2.weight"],
    ]


def test_frozen_parameters_and_empty_groups_are_left_out():
    model = nn.Linear(4, 3)
    model.bias.requires_grad_(False)
    assert names(named(model, 0.1)) == [["weight"]]
    with pytest.raises(TypeError, match="no_decay"):
        param_groups(model, 0.1, no_decay="bias")


def test_timm_no_weight_decay_names_are_excluded():
    class TinyViT(nn.Module):
        def __init__(self):
            super().__init__()
            self.pos_embed = nn.Parameter(torch.zeros(1, 5, 8))
            self.cls_token = nn.Parameter(torch.zeros(1, 1, 8))
            self.head = nn.Linear(8, 2)

        def no_weight_decay(self):
            return {"pos_embed", "cls_token"}

    assert names(named(TinyViT(), 0.05)) == [["head.weight"], ["cls_token", "head.bias", "pos_embed"]]


def test_groups_without_names_leave_room_for_unnamed_groups():
    model = conv_net()
    groups = param_groups(model[:2], weight_decay=1e-4)
    assert all("param_names" not in group for group in groups)
    opt = FusedLARS(groups, lr=0.1, momentum=0.9)
    opt.add_param_group({"params": list(model[3:].parameters())})  # a head added later, unnamed
    assert len(opt.param_groups) == 3


def one_step(model, make_optimizer, make_reference):
    groups = param_groups(model, weight_decay=0.05)
    reference = make_reference([{**{k: v for k, v in group.items() if k != "param_names"},
                                 "params": [p.detach().cpu() for p in group["params"]]} for group in groups])
    opt = make_optimizer(groups)
    gen = torch.Generator().manual_seed(1)
    grads = [[torch.randn(p.shape, generator=gen) for p in group["params"]] for group in groups]
    for group, group_grads in zip(groups, grads):
        for p, g in zip(group["params"], group_grads):
            p.grad = g.to(p.device)
    opt.step()
    reference.step(grads)
    for gi, group in enumerate(groups):
        for pi, p in enumerate(group["params"]):
            assert rel_error(p, reference.groups[gi]["params"][pi]) <= PARAM_RTOL, group["param_names"][pi]


@pytest.mark.parametrize("model", [conv_net, transformer_block])
@on_every_backend
def test_groups_step_both_optimizers_like_the_references(model, backend, device):
    one_step(model().to(device), lambda groups: FusedLAMB(groups, lr=1e-2, backend=backend),
             lambda groups: Float64LAMB(groups, lr=1e-2))
    one_step(model().to(device), lambda groups: FusedLARS(groups, lr=0.1, momentum=0.9, backend=backend),
             lambda groups: Float64LARS(groups, lr=0.1, momentum=0.9))
