"""Numerical parity of the Flax NFNet with timm's ``dm_nfnet_*`` (DeepMind's NFNets ported to PyTorch).

Every timm parameter is randomised (skip gains included, which are 0 at init and would hide the residual branches),
the state dict goes through the plugin's ``import_weights``, and the logits must agree to 1e-4 relative (max
abs difference over max abs logit) in float32. The Flax model is built with timm's numerics: ``activation=
"gelu_exact"`` (timm uses erf GELU; DM's jax.nn.gelu is the tanh form) and ``ws_eps=1e-5, ws_eps_style="timm"``
(timm's ScaledStdConv2dSame adds eps=1e-5 to the weight variance; DM clamps var * fan_in at 1e-4).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.parity

NUM_CLASSES = 5
TIMM_NUMERICS = {"activation": "gelu_exact", "ws_eps": 1e-5, "ws_eps_style": "timm"}


@pytest.fixture(scope="module")
def timm():
    try:
        from _timm import import_timm
    except ImportError:  # tests/ collected as a package
        from tests._timm import import_timm
    return import_timm()


def _randomise(model, seed: int = 0) -> dict[str, np.ndarray]:
    """Perturb every parameter so that no branch is silent, and return the state dict as numpy."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith("skipinit_gain"):
                p.copy_(0.5 + 0.5 * noise)
            elif name.endswith("gain"):
                p.mul_(1.0 + 0.2 * noise)
            elif name.endswith("bias"):
                p.copy_(0.1 * noise)
            elif name == "head.fc.weight":
                p.copy_(noise / p.shape[1] ** 0.5)  # O(1) logits, so the relative error is meaningful
            else:
                p.add_(0.2 * p.std() * noise)
    return {k: v.numpy() for k, v in model.state_dict().items()}


def _compare(model, variant_or_spec, params, resolution: int, build_kwargs: dict) -> float:
    import jax

    x = np.random.default_rng(1).standard_normal((2, resolution, resolution, 3), dtype=np.float32)
    with torch.no_grad():
        ref = model.eval()(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()
    flax_model = variant_or_spec(num_classes=NUM_CLASSES, **build_kwargs)
    forward = jax.jit(lambda p, x: flax_model.apply({"params": p}, x, train=False)).lower(params, x)
    # Values, not speed, matter here: compiling without LLVM optimisation halves XLA's CPU compile time.
    out = np.asarray(forward.compile(compiler_options={"xla_backend_optimization_level": 0})(params, x))
    assert out.shape == ref.shape
    return float(np.abs(out - ref).max() / np.abs(ref).max())


def test_dm_nfnet_f0_logits_match_timm(timm):
    from convscale_plugins.nfnet import spec
    from convscale_plugins.nfnet.variants import VARIANTS

    arch = spec(VARIANTS["nfnet-f0"])
    model = timm.create_model(arch.weight_sources["timm"], pretrained=False, num_classes=NUM_CLASSES)
    params = arch.import_weights("timm", _randomise(model), NUM_CLASSES).params
    assert _compare(model, arch.build, params, 64, TIMM_NUMERICS) <= 1e-4


def test_deeper_stage1_and_odd_feature_maps_match_timm(timm):
    """Two blocks in stage 1 (F1+ have them, F0 does not) at 72 px, where stages 3-4 see odd maps (9 -> 5 -> 3):
    checks SAME padding of the strided convs and the count-exclude-pad average pool of the transitions."""
    from convscale_plugins.nfnet import build
    from convscale_plugins.nfnet.timm_import import import_timm
    from convscale_plugins.nfnet.variants import VARIANTS

    depths = (2, 1, 1, 2)
    base = VARIANTS["nfnet-f1"]
    variant = dataclasses.replace(base, config=dataclasses.replace(base.config, depths=depths))
    model = timm.create_model("dm_nfnet_f1", pretrained=False, num_classes=NUM_CLASSES, depths=depths)
    params = import_timm(variant, _randomise(model, seed=3), None).params

    def make(**kwargs):
        return build(variant, **kwargs)

    assert _compare(model, make, params, 72, TIMM_NUMERICS) <= 1e-4
    # The check has teeth: DM's tanh GELU alone moves the logits by far more than the tolerance.
    assert _compare(model, make, params, 72, {**TIMM_NUMERICS, "activation": "gelu"}) > 1e-4
