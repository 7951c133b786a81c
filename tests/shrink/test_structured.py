"""Exact structural pruning: equivalence on every supported architecture under IMP-like sparsity,
the removal rules (what must go, what must stay), and the safety nets (warnings, errors)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torchvision
from torch import nn
from torch.nn import functional as F

from dnnshifter_lightning.shrink import _surgery
from dnnshifter_lightning.demo.models import DigitsCNN, cifar_resnet, cifar_vgg16
from dnnshifter_lightning.shrink.structured import (
    PruneResult, StructuralPruningError, clear_analysis_cache, prune_structurally,
)


def imp_like(model: nn.Module, sparsity: float = 0.8, filter_frac: float = 0.25, slice_frac: float = 0.15,
             seed: int = 0) -> nn.Module:
    """The shape of sparsity IMP leaves, made by hand: per-layer magnitude pruning, whole filters and
    whole input slices zeroed, and random non-trivial BN statistics with shifts of both signs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g))
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                w = m.weight
                k = max(1, int(sparsity * w.numel()))
                w[w.abs() <= w.abs().flatten().kthvalue(k).values] = 0
                if w.shape[0] > 10:  # not the classifier's output rows
                    w[torch.randperm(w.shape[0], generator=g)[: int(filter_frac * w.shape[0])]] = 0
                if w.shape[1] > 1:
                    w[:, torch.randperm(w.shape[1], generator=g)[: int(slice_frac * w.shape[1])]] = 0
    return model.eval()


def assert_same_function(sparse: nn.Module, result: PruneResult, x: torch.Tensor, rtol: float = 1e-4) -> None:
    with torch.no_grad():
        ref, out = sparse.eval()(x), result.model(x)
    scale = float(ref.abs().max())
    assert scale > 0, "degenerate test: the sparse model's output is all zero"
    torch.testing.assert_close(out, ref, rtol=0, atol=rtol * scale)


class TwoBranchNet(nn.Module):
    """A user model with a custom forward: concat of two branches, a residual add, a depthwise conv,
    and a functional global mean before the classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.branch_a = nn.Sequential(nn.Conv2d(16, 12, 1, bias=False), nn.BatchNorm2d(12), nn.ReLU())
        self.branch_b = nn.Sequential(nn.Conv2d(16, 20, 3, padding=1, bias=False), nn.BatchNorm2d(20), nn.ReLU())
        self.merge = nn.Sequential(nn.Conv2d(32, 16, 1, bias=False), nn.BatchNorm2d(16))
        self.depthwise = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False), nn.BatchNorm2d(16),
                                       nn.ReLU6())
        self.project = nn.Sequential(nn.Conv2d(16, 24, 1, bias=False), nn.BatchNorm2d(24), nn.ReLU())
        self.head = nn.Linear(24, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.stem(x)
        y = torch.cat([self.branch_a(s), self.branch_b(s)], dim=1)
        y = F.relu(self.merge(y) + s)
        y = self.project(self.depthwise(y))
        return self.head(y.mean(dim=(2, 3)))


def _vgg16_bn_small_head() -> nn.Module:
    # torchvision's vgg16_bn features at full width; the 25088x4096 classifier (120M of its 138M
    # parameters) is narrowed to 256 hidden units so the test stays fast.
    net = torchvision.models.vgg16_bn(weights=None)
    net.classifier = nn.Sequential(nn.Linear(512 * 7 * 7, 256), nn.ReLU(True), nn.Dropout(),
                                   nn.Linear(256, 256), nn.ReLU(True), nn.Dropout(), nn.Linear(256, 10))
    return net


ARCHITECTURES = {
    "digits_cnn": (lambda: DigitsCNN(width=32), (1, 8, 8)),
    "cifar_vgg16": (lambda: cifar_vgg16(), (3, 32, 32)),
    "cifar_resnet20": (lambda: cifar_resnet(20), (3, 32, 32)),
    "cifar_resnet56": (lambda: cifar_resnet(56), (3, 32, 32)),
    "vgg16_bn": (_vgg16_bn_small_head, (3, 32, 32)),
    "resnet18": (lambda: torchvision.models.resnet18(weights=None), (3, 64, 64)),
    "resnet50": (lambda: torchvision.models.resnet50(weights=None), (3, 32, 32)),  # 32x32 keeps it fast
    "mobilenet_v2": (lambda: torchvision.models.mobilenet_v2(weights=None), (3, 64, 64)),
    "custom_two_branch": (TwoBranchNet, (3, 16, 16)),
}


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_equivalent_and_smaller_under_imp_like_sparsity(arch: str) -> None:
    torch.manual_seed(0)
    build, shape = ARCHITECTURES[arch]
    sparse = imp_like(build())
    with torch.no_grad():
        for p in sparse.parameters():
            p[p == 0] = -0.0  # IMP's mask multiply leaves pruned negative weights at -0.0
    snapshot = copy.deepcopy(sparse.state_dict())
    sparse.train()  # the input's mode must survive too

    result = prune_structurally(sparse, torch.randn(2, *shape))

    assert sparse.training, "prune_structurally changed the input model's mode"
    for key, value in sparse.state_dict().items():
        assert torch.equal(value, snapshot[key]), f"input model changed at {key}"
    assert not result.model.training
    assert result.params_after < result.params_before
    assert result.params_after == sum(p.numel() for p in result.model.parameters())
    assert result.channels_removed > 0 and sum(result.reason_counts.values()) == result.channels_removed
    assert result.max_abs_diff <= result.tolerance
    assert not any(isinstance(m, nn.BatchNorm2d) for m in result.model.modules() if arch != "custom_two_branch")
    # the variant shares no memory with its source: training it further cannot corrupt the checkpoint
    source_storage = {t.untyped_storage().data_ptr() for t in [*sparse.parameters(), *sparse.buffers()]}
    assert not any(t.untyped_storage().data_ptr() in source_storage
                   for t in [*result.model.parameters(), *result.model.buffers()])
    # same function on inputs it never saw, not just on the example inputs
    assert_same_function(sparse, result, torch.randn(3, *shape))
    # pruned negative weights (-0.0 after masking) leave as +0.0: same values, far better compression
    assert any(bool((torch.signbit(v) & (v == 0)).any()) for v in sparse.state_dict().values() if v.is_floating_point())
    assert not any(bool((torch.signbit(t) & (t == 0)).any()) for t in [*result.model.parameters(), *result.model.buffers()]
                   if t.is_floating_point())


def test_removes_exactly_the_dead_filters_and_reports_why() -> None:
    torch.manual_seed(0)
    net = imp_like(DigitsCNN(width=8), sparsity=0.0, filter_frac=0.0, slice_frac=0.0)
    with torch.no_grad():
        net.features[3].weight[[1, 4, 6]] = 0  # filters of conv 2 (features.3), then BN 4, ReLU 5
        net.features[4].bias[[1, 4, 6]] = torch.tensor([-1.0, -0.5, -2.0])  # ReLU(negative shift) = 0
        net.features[4].running_mean[[1, 4, 6]] = 0.0
        net.features[7].weight[:, 2] = 0  # conv 3 no longer reads channel 2 of conv 2's output
    result = prune_structurally(net, torch.randn(4, 1, 8, 8))
    entry = result.removed["features.3"]
    assert (entry["before"], entry["after"]) == (8, 4)
    assert entry["reasons"] == {"zero_constant": 3, "unread": 1}
    assert result.model.features[3].weight.shape[:2] == (4, 8)
    assert result.model.features[7].weight.shape[:2] == (16, 4)
    assert_same_function(net, result, torch.randn(5, 1, 8, 8))


def test_removal_cascades_to_channels_that_only_removed_filters_read() -> None:
    """Removing conv 2's unread filters leaves conv 1's channels 4-7 with no reader left: they must
    go too, in a second pass over the virtual state, and the function must not change."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(8, 10)).eval()
    with torch.no_grad():
        net[4].weight[:, :4] = 0  # conv 3 never reads conv 2's channels 0-3 ...
        net[2].weight[4:, 4:] = 0  # ... which are the only filters of conv 2 reading conv 1's channels 4-7
    result = prune_structurally(net, torch.randn(4, 1, 8, 8))
    assert result.removed["2"] == {"before": 8, "after": 4, "reasons": {"unread": 4}}
    assert result.removed["0"] == {"before": 8, "after": 4, "reasons": {"unread": 4}}
    assert result.passes == [4, 4]
    assert result.model[2].weight.shape[:2] == (4, 4)
    assert_same_function(net, result, torch.randn(5, 1, 8, 8))


def _positive_constant_into_padded_conv() -> nn.Module:
    net = imp_like(DigitsCNN(width=8), sparsity=0.0, filter_frac=0.0, slice_frac=0.0)
    with torch.no_grad():
        net.features[0].weight[3] = 0  # conv 1 filter 3 all zero ...
        net.features[1].bias[3] = 1.5  # ... and BN shifts it up: ReLU(1.5 - ...) > 0 everywhere
        net.features[1].running_mean[3] = 0.0
    return net


def test_positive_constant_into_padded_conv_is_kept() -> None:
    # DNNShifter's rule drops every all-zero filter with its BN; here that changes the function,
    # because the padded 3x3 conv sees the constant inside and zeros at the border.
    net = _positive_constant_into_padded_conv()
    result = prune_structurally(net, torch.randn(4, 1, 8, 8))
    assert result.removed["features.0"]["after"] == 8
    assert result.approx_error is None
    assert_same_function(net, result, torch.randn(5, 1, 8, 8))

    dropped = copy.deepcopy(net)  # what DNNShifter would compute: channel 3 gone, no compensation
    with torch.no_grad():
        dropped.features[3].weight[:, 3] = 0
        assert (dropped(torch.randn(5, 1, 8, 8)) - net(torch.randn(5, 1, 8, 8))).abs().max() > 1e-3


def test_approximate_mode_folds_padded_constant_and_reports_error() -> None:
    net = _positive_constant_into_padded_conv()
    result = prune_structurally(net, torch.randn(4, 1, 8, 8), approximate=True)
    assert result.removed["features.0"]["after"] == 7
    assert result.removed["features.0"]["reasons"] == {"folded_approx": 1}
    assert result.approx_error is not None and result.approx_error > 0
    assert result.approx_error == result.max_abs_diff


def test_constant_channel_into_linear_after_global_pool_is_folded_exactly() -> None:
    torch.manual_seed(0)
    net = imp_like(DigitsCNN(width=8), sparsity=0.0, filter_frac=0.0, slice_frac=0.0)
    last_conv, last_bn = net.features[17], net.features[18]
    with torch.no_grad():
        last_conv.weight[[0, 5]] = 0
        last_bn.bias[[0, 5]] = torch.tensor([2.0, 0.7])
        last_bn.running_mean[[0, 5]] = 0.0
    result = prune_structurally(net, torch.randn(4, 1, 8, 8))
    assert result.removed["features.17"]["after"] == 30
    assert result.removed["features.17"]["reasons"] == {"folded": 2}
    assert result.model.classifier.in_features == 30
    assert_same_function(net, result, torch.randn(6, 1, 8, 8), rtol=1e-5)


def test_fuse_bn_false_keeps_batchnorm() -> None:
    net = imp_like(cifar_resnet(20))
    result = prune_structurally(net, torch.randn(2, 3, 32, 32), fuse_bn=False)
    assert any(isinstance(m, nn.BatchNorm2d) for m in result.model.modules())
    assert result.params_after < result.params_before
    assert_same_function(net, result, torch.randn(2, 3, 32, 32))


class ChannelShuffleNet(nn.Module):
    """Mixes channels with a permute + reshape the analysis does not model."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 1)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.conv1(x))
        n, c, h, w = y.shape
        y = y.reshape(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)  # channel shuffle
        return self.head(F.relu(self.conv2(y)).mean(dim=(2, 3)))


def _dead_shuffle_net() -> nn.Module:
    torch.manual_seed(0)
    net = ChannelShuffleNet().eval()
    with torch.no_grad():
        net.conv2.weight[:, 1] = 0  # conv2 ignores shuffled channel 1, i.e. conv1's channel 4
    return net


def test_unanalysable_coupling_is_kept_with_a_warning() -> None:
    net = _dead_shuffle_net()
    with pytest.warns(UserWarning, match="cannot analyse safely"):
        result = prune_structurally(net, torch.randn(2, 3, 8, 8))
    assert "conv1" in result.kept_unsupported
    assert result.removed["conv1"]["after"] == 8
    assert_same_function(net, result, torch.randn(2, 3, 8, 8))


def test_verification_refuses_a_different_function(monkeypatch: pytest.MonkeyPatch) -> None:
    # Pretend every op is channel-wise: Torch-Pruning then slices across the shuffle and the result
    # computes something else. The built-in check must catch it.
    monkeypatch.setattr(_surgery, "_channelwise", lambda node: True)
    clear_analysis_cache()  # the patched analysis must run, not the one cached by the test above
    net = _dead_shuffle_net()
    with pytest.raises(StructuralPruningError, match="differs from the sparse model|fails on the example inputs"):
        prune_structurally(net, torch.randn(2, 3, 8, 8))


def test_model_that_cannot_be_traced_gets_a_clear_error() -> None:
    class ReturnsNothing(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x: torch.Tensor) -> dict:
            return {"label": int(self.conv(x).argmax())}

    with pytest.raises(StructuralPruningError):
        prune_structurally(ReturnsNothing(), torch.randn(1, 3, 8, 8))


def test_lightning_module_trained_then_zeroed_keeps_every_prediction() -> None:
    L = pytest.importorskip("lightning")
    from dnnshifter_lightning.demo.digits import DigitsClassifier, DigitsDataModule, load_digits_tensors

    L.seed_everything(0, workers=True)
    module = DigitsClassifier(width=16)
    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", devices=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, datamodule=DigitsDataModule(batch_size=64))
    weights = [m.weight for m in module.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():  # heavy global magnitude pruning, as a late IMP level would leave
        threshold = torch.cat([w.abs().flatten() for w in weights]).kthvalue(
            int(0.95 * sum(w.numel() for w in weights))).values
        for w in weights:
            w[w.abs() <= threshold] = 0
    x, _ = load_digits_tensors()
    module.eval()
    result = prune_structurally(module, x[:64])
    assert isinstance(result.model, nn.Module) and not isinstance(result.model, L.LightningModule)
    assert result.params_after < result.params_before
    with torch.no_grad():
        assert torch.equal(result.model(x).argmax(1), module(x).argmax(1))


def test_concat_branch_channel_goes_at_its_offset_and_residual_stream_stays_coupled() -> None:
    torch.manual_seed(0)
    net = imp_like(TwoBranchNet(), sparsity=0.0, filter_frac=0.0, slice_frac=0.0)
    with torch.no_grad():
        net.branch_b[0].weight[5] = 0  # concat channel 12 + 5
        net.branch_b[1].bias[5], net.branch_b[1].running_mean[5] = -1.0, 0.0
        net.stem[0].weight[3] = 0  # residual stream channel 3: the stem writes nothing ...
        net.stem[1].bias[3], net.stem[1].running_mean[3] = -1.0, 0.0  # ... ReLU gives 0 ...
        # ... but merge still writes channel 3 of the stream, so it must stay everywhere
    result = prune_structurally(net, torch.randn(2, 3, 16, 16))
    assert result.model.branch_b[0].out_channels == 19
    assert result.model.merge[0].in_channels == 31
    assert result.model.stem[0].out_channels == 16 and result.model.depthwise[0].groups == 16
    assert_same_function(net, result, torch.randn(3, 3, 16, 16))


def test_later_checkpoints_of_one_architecture_reuse_its_analysis_and_get_the_same_result() -> None:
    """The dependency analysis depends on the structure only, so a portfolio's later levels reuse
    the first one's. What they get must be exactly what a fresh analysis gives."""
    torch.manual_seed(0)
    first, later = imp_like(cifar_resnet(20), sparsity=0.5, seed=1), imp_like(cifar_resnet(20), sparsity=0.9, seed=2)
    x = torch.randn(2, 3, 32, 32)
    clear_analysis_cache()
    assert not prune_structurally(first, x).analysis_reused
    warm = prune_structurally(later, x)
    assert warm.analysis_reused
    clear_analysis_cache()
    cold = prune_structurally(later, x)
    assert not cold.analysis_reused
    assert warm.removed == cold.removed and warm.passes == cold.passes
    warm_state, cold_state = warm.model.state_dict(), cold.model.state_dict()
    assert warm_state.keys() == cold_state.keys()
    for key, value in cold_state.items():
        assert torch.equal(warm_state[key], value), key
    assert_same_function(later, warm, torch.randn(3, 3, 32, 32))


class OptionalSkip(nn.Module):
    def __init__(self, skip: bool) -> None:
        super().__init__()
        self.skip = skip
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.conv1(x))
        z = F.relu(self.conv2(y))
        return self.head((z + y if self.skip else z).mean(dim=(2, 3)))


def test_a_changed_setting_or_input_shape_gets_a_fresh_analysis() -> None:
    """A plain attribute that changes the forward (here a residual add that couples conv1 and conv2)
    is part of the structure: without the add conv1's dead filters may go, with it they must stay."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    clear_analysis_cache()
    plain = OptionalSkip(skip=False).eval()
    with torch.no_grad():
        plain.conv1.weight[:3] = 0
        plain.conv1.bias[:3] = -1.0  # ReLU(-1) = 0: conv1's first three channels are zero constants
    assert prune_structurally(plain, x).removed["conv1"]["after"] == 5
    skip = copy.deepcopy(plain)
    skip.skip = True
    result = prune_structurally(skip, x)
    assert not result.analysis_reused
    assert result.removed["conv1"]["after"] == 8  # coupled through the add with conv2's live channels
    assert_same_function(skip, result, torch.randn(3, 3, 8, 8))
    assert not prune_structurally(plain, torch.randn(2, 3, 16, 16)).analysis_reused
    assert prune_structurally(plain, torch.randn(5, 3, 16, 16)).analysis_reused is False  # batch size is part of it


class Bottleneck(nn.Module):
    """A padded 3x3 conv into a bias-free 1x1 conv, as in ResNet-50's bottleneck blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 6, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(6)
        self.head = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))
        return self.head(y.mean(dim=(2, 3)))


@pytest.mark.parametrize("fuse_bn", [True, False])
def test_positive_constant_folds_into_a_bias_free_1x1_conv(fuse_bn: bool) -> None:
    """The 1x1 conv has no bias: the fold must create one, and BN fusion must then keep it."""
    torch.manual_seed(0)
    net = imp_like(Bottleneck(), sparsity=0.0, filter_frac=0.0, slice_frac=0.0)
    with torch.no_grad():
        net.conv1.weight[[2, 5]] = 0
        net.bn1.bias[[2, 5]] = torch.tensor([0.8, 1.3])  # ReLU(positive shift): nonzero constants
        net.bn1.running_mean[[2, 5]] = 0.0
    result = prune_structurally(net, torch.randn(4, 3, 8, 8), fuse_bn=fuse_bn)
    assert result.removed["conv1"] == {"before": 8, "after": 6, "reasons": {"folded": 2}}
    assert result.model.conv2.in_channels == 6 and result.model.conv2.bias is not None
    assert isinstance(result.model.bn2, nn.Identity) == fuse_bn
    assert_same_function(net, result, torch.randn(5, 3, 8, 8), rtol=1e-5)


class TiedConvs(nn.Module):
    """Two convs sharing one weight (``b.weight = a.weight``), then an untied conv."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a = nn.Conv2d(8, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.b.weight = self.a.weight
        self.c = nn.Conv2d(8, 8, 1)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.b(F.relu(self.a(F.relu(self.stem(x))))))
        return self.head(F.relu(self.c(y)).mean(dim=(2, 3)))


def test_layers_sharing_a_parameter_keep_their_channels_and_stay_tied() -> None:
    """Slicing a shared weight for one layer would change the other: their groups are kept (with a
    warning), the rest of the model is still pruned, and the copy keeps the tie."""
    torch.manual_seed(0)
    net = TiedConvs().eval()
    with torch.no_grad():
        net.a.weight[:, 2] = 0  # a (and so b) never reads input channel 2
        net.c.weight[[1, 6]] = 0
        net.c.bias[[1, 6]] = -1.0  # ReLU(-1) = 0: two dead channels of the untied conv
    with pytest.warns(UserWarning, match="shares a parameter"):
        result = prune_structurally(net, torch.randn(2, 3, 8, 8))
    assert {"stem", "a", "b"} <= set(result.kept_unsupported)
    assert result.removed["a"]["after"] == 8 and result.removed["stem"]["after"] == 8
    assert result.removed["c"] == {"before": 8, "after": 6, "reasons": {"zero_constant": 2}}
    assert result.model.a.weight is result.model.b.weight
    assert result.model.a.weight.data_ptr() != net.a.weight.data_ptr()
    assert_same_function(net, result, torch.randn(3, 3, 8, 8))


def test_later_lightning_checkpoints_reuse_the_fx_trace(monkeypatch: pytest.MonkeyPatch) -> None:
    """A LightningModule is traced with torch.fx once per structure; a later checkpoint of the same
    class gets a GraphModule from the cached graph, and the same predictions as its own weights give."""
    pytest.importorskip("lightning")
    from dnnshifter_lightning.demo.digits import DigitsClassifier, load_digits_tensors

    traces = []
    real_trace = torch.fx.symbolic_trace
    monkeypatch.setattr(torch.fx, "symbolic_trace", lambda m, *a, **k: traces.append(m) or real_trace(m, *a, **k))
    clear_analysis_cache()
    x, _ = load_digits_tensors()
    for seed in (0, 1):
        torch.manual_seed(seed)
        module = DigitsClassifier(width=8).eval()
        with torch.no_grad():
            for m in module.modules():
                if isinstance(m, (nn.Conv2d, nn.Linear)):
                    m.weight[m.weight.abs() < m.weight.abs().median()] = 0
        result = prune_structurally(module, x[:32])
        assert result.analysis_reused == (seed == 1)
        with torch.no_grad():
            assert torch.equal(result.model(x).argmax(1), module(x).argmax(1))
    assert len(traces) == 1
