"""StyleGAN3 backend: network layout, generator behaviour, safe conversion of official pickles.

The official-format pickles used here are built by the test itself: small stand-in objects whose
``__reduce__`` names ``torch_utils.persistence._reconstruct_persistent_obj`` (a fake module
registered in ``sys.modules`` only while dumping), exactly as NVIDIA's persistence mechanism
writes them.  No NVIDIA code is imported.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import types
from collections import Counter, OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from generators.base import GeneratorError
from generators.stylegan3 import (
    StyleGAN3Config,
    StyleGAN3Generator,
    StyleGAN3Network,
    convert_stylegan3_pickle,
    load_stylegan3,
    read_stylegan3_pickle,
)
from generators.stylegan3.convert import write_converted_dir
from generators.stylegan3.ops import (
    design_lowpass_filter,
    lowpass_jinc_filter,
    lowpass_sinc_filter,
    upfirdn2d,
)

# A small configuration: 32 px, 6 layers (2 critically sampled), margin 2, at most 16 channels.
TINY_KWARGS: dict[str, Any] = {
    "z_dim": 8,
    "c_dim": 0,
    "w_dim": 12,
    "img_resolution": 32,
    "img_channels": 3,
    "mapping_kwargs": {"num_layers": 2},
    "channel_base": 256,
    "channel_max": 16,
    "num_layers": 6,
    "num_critical": 2,
    "margin_size": 2,
    "magnitude_ema_beta": 0.999,
}
R_KWARGS = {**TINY_KWARGS, "conv_kernel": 1, "use_radial_filters": True}


def _expected_shapes(r_config: bool) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the official ``G_ema.state_dict()`` for TINY_KWARGS, by hand.

    Schedule (img_resolution 32, num_layers 6, num_critical 2):
    cutoffs 2, 3.36, 5.66, 9.51, 16, 16, 16; sampling rates 16, 16, 32, 32, 32, 32, 32;
    sizes (rate + 2 * margin, last two = 32) 20, 20, 36, 36, 36, 32, 32;
    channels rint(min(128 / cutoff, 16)) 16, 16, 16, 13, 8, 8 and 3 for ToRGB.
    Filters: every non-ToRGB layer resamples by 2 through a rate of 2x its larger rate
    (12 taps), except L2 (16 -> 32: upsampling by 4, 24 taps); the -R config uses 12x12
    radial down filters in the non-critical layers L0-L3.
    """
    k = 1 if r_config else 3
    w = 12
    shapes: dict[str, tuple[int, ...]] = {
        "synthesis.input.weight": (16, 16),
        "synthesis.input.transform": (3, 3),
        "synthesis.input.freqs": (16, 2),
        "synthesis.input.phases": (16,),
        "synthesis.input.affine.weight": (4, w),
        "synthesis.input.affine.bias": (4,),
    }
    layers = [  # name, in, out, up taps, down taps, critically sampled
        ("L0_20_16", 16, 16, 12, 12, False),
        ("L1_20_16", 16, 16, 12, 12, False),
        ("L2_36_16", 16, 16, 24, 12, False),
        ("L3_36_13", 16, 13, 12, 12, False),
        ("L4_36_8", 13, 8, 12, 12, True),
        ("L5_32_8", 8, 8, 12, 12, True),
        ("L6_32_3", 8, 3, 0, 0, True),
    ]
    for name, cin, cout, up, down, critical in layers:
        p = f"synthesis.{name}."
        torgb = name.startswith("L6")
        shapes[p + "weight"] = (cout, cin, 1, 1) if torgb else (cout, cin, k, k)
        shapes[p + "bias"] = (cout,)
        shapes[p + "magnitude_ema"] = ()
        if up:
            shapes[p + "up_filter"] = (up,)
        if down:
            shapes[p + "down_filter"] = (down, down) if r_config and not critical else (down,)
        shapes[p + "affine.weight"] = (cin, w)
        shapes[p + "affine.bias"] = (cin,)
    shapes["mapping.w_avg"] = (w,)
    shapes["mapping.fc0.weight"] = (w, 8)
    shapes["mapping.fc0.bias"] = (w,)
    shapes["mapping.fc1.weight"] = (w, w)
    shapes["mapping.fc1.bias"] = (w,)
    return shapes


def _make_network(kwargs: dict[str, Any], seed: int = 0) -> StyleGAN3Network:
    torch.manual_seed(seed)
    net = StyleGAN3Network(StyleGAN3Config.from_init_kwargs(kwargs)).eval()
    with torch.no_grad():  # make every parameter and buffer matter
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        net.mapping.w_avg.normal_()
        for name, b in net.named_buffers():
            if name.endswith("magnitude_ema"):
                b.copy_(torch.rand([]) + 0.5)
    return net


@pytest.fixture(scope="module", autouse=True)
def _single_thread():
    """The tiny networks here run fastest on one thread (and avoid oversubscribing shared CPUs)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_net() -> StyleGAN3Network:
    return _make_network(TINY_KWARGS)


# --------------------------------------------------------------------------------------------
# Crafted official-format pickles.

_OFFICIAL_CLASS = {"StyleGAN3Network": "Generator"}


class _Persistent:
    """Pickles like an NVIDIA persistent object: ``_reconstruct_persistent_obj(meta)``."""

    def __init__(self, meta: dict[str, Any]) -> None:
        self.meta = meta

    def __reduce__(self):
        return (sys.modules["torch_utils.persistence"]._reconstruct_persistent_obj, (self.meta,))


class _EasyDict(dict):
    pass


def _persistent_state(module: torch.nn.Module, marker: Path | None) -> _Persistent:
    state: dict[str, Any] = {
        "training": False,
        "_parameters": OrderedDict(module._parameters),
        "_buffers": OrderedDict(module._buffers),
        "_non_persistent_buffers_set": set(),
        "_modules": OrderedDict(
            (name, _persistent_state(child, marker)) for name, child in module._modules.items()
        ),
        "_forward_hooks": OrderedDict(),
        "_init_args": (),
        "_init_kwargs": {},
    }
    for attr in ("in_size", "out_size"):  # official layers keep sizes as NumPy arrays
        if hasattr(module, attr):
            state[attr] = np.broadcast_to(np.asarray(getattr(module, attr)), [2]).copy()
    if hasattr(module, "in_cutoff"):
        state["in_cutoff"] = np.float64(module.in_cutoff)
    src = "raise RuntimeError('embedded module source must never run')\n"
    if marker is not None:
        src = f"open({str(marker)!r}, 'w').close()\n"
    cls = type(module).__name__
    meta = {
        "type": "class",
        "version": 6,
        "module_src": src,
        "class_name": _OFFICIAL_CLASS.get(cls, cls),
        "state": state,
    }
    return _Persistent(meta)


@pytest.fixture()
def fake_nvidia_modules(monkeypatch: pytest.MonkeyPatch):
    """``torch_utils.persistence`` and ``dnnlib.util`` stand-ins, present only while dumping."""

    def _reconstruct_persistent_obj(meta):  # pragma: no cover - never called by our loader
        raise AssertionError("the real reconstructor must never be called")

    persistence = types.ModuleType("torch_utils.persistence")
    _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    persistence._reconstruct_persistent_obj = _reconstruct_persistent_obj
    util = types.ModuleType("dnnlib.util")
    _EasyDict.__module__ = "dnnlib.util"
    _EasyDict.__qualname__ = "EasyDict"
    util.EasyDict = _EasyDict
    monkeypatch.setitem(sys.modules, "torch_utils", types.ModuleType("torch_utils"))
    monkeypatch.setitem(sys.modules, "torch_utils.persistence", persistence)
    monkeypatch.setitem(sys.modules, "dnnlib", types.ModuleType("dnnlib"))
    monkeypatch.setitem(sys.modules, "dnnlib.util", util)
    yield


def _official_pickle(
    net: StyleGAN3Network, kwargs: dict[str, Any], path: Path, marker: Path | None = None, **extra
) -> Path:
    g = _persistent_state(net, marker)
    init_kwargs = dict(kwargs)
    init_kwargs["mapping_kwargs"] = _EasyDict(kwargs["mapping_kwargs"])
    g.meta["state"]["_init_kwargs"] = init_kwargs
    data = {
        "G": g,
        "D": None,
        "G_ema": g,
        "augment_pipe": None,
        "training_set_kwargs": _EasyDict(resolution=kwargs["img_resolution"], use_labels=False),
        **extra,
    }
    path.write_bytes(pickle.dumps(data, protocol=4))
    return path


# --------------------------------------------------------------------------------------------
# Network layout.


@pytest.mark.parametrize("r_config", [False, True], ids=["T", "R"])
def test_state_dict_names_and_shapes_match_official(r_config: bool) -> None:
    net = StyleGAN3Network(StyleGAN3Config.from_init_kwargs(R_KWARGS if r_config else TINY_KWARGS))
    got = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    expected = _expected_shapes(r_config)
    assert got == expected
    assert list(got) == list(expected)  # same order as the official state dict
    assert net.num_ws == 8


def test_filters_match_reference_design() -> None:
    signal = pytest.importorskip("scipy.signal")
    special = pytest.importorskip("scipy.special")
    for numtaps, cutoff, width, fs in [(12, 2.0, 6.5, 32), (24, 5.66, 3.1, 64), (12, 16, 7.4, 64)]:
        ref = signal.firwin(numtaps=numtaps, cutoff=cutoff, width=width, fs=fs)
        np.testing.assert_allclose(lowpass_sinc_filter(numtaps, cutoff, width, fs), ref, atol=1e-12)
        x = (np.arange(numtaps) - (numtaps - 1) / 2) / fs
        r = np.hypot(*np.meshgrid(x, x))
        jinc = special.j1(2 * cutoff * (np.pi * r)) / (np.pi * r)
        beta = signal.kaiser_beta(signal.kaiser_atten(numtaps, width / (fs / 2)))
        jinc = jinc * np.outer(np.kaiser(numtaps, beta), np.kaiser(numtaps, beta))
        np.testing.assert_allclose(
            lowpass_jinc_filter(numtaps, cutoff, width, fs), jinc / jinc.sum(), atol=1e-12
        )
    assert design_lowpass_filter(1, 2.0, 1.0, 16) is None


def _naive_upfirdn2d(x, f, up, down, pad, gain):
    n, c, h, w = x.shape
    z = torch.zeros(n, c, h * up, w * up)
    z[:, :, ::up, ::up] = x
    z = F.pad(z, list(pad))
    k = (f if f.ndim == 2 else f[None, :] * f[:, None]) * gain
    k = k.flip([0, 1]).expand(c, 1, *k.shape)
    return F.conv2d(z, k, groups=c)[:, :, ::down, ::down]


@pytest.mark.parametrize("up,down", [(1, 1), (2, 1), (1, 2), (4, 2), (2, 2)])
@pytest.mark.parametrize("radial", [False, True])
def test_upfirdn2d_matches_naive_definition(up: int, down: int, radial: bool) -> None:
    g = torch.Generator().manual_seed(up * 10 + down)
    x = torch.randn(2, 3, 9, 11, generator=g)
    f = torch.rand(6, 6, generator=g) if radial else torch.rand(6, generator=g)
    for pad in [(0, 0, 0, 0), (3, 2, 4, 1), (-1, 5, 2, -2)]:
        got = upfirdn2d(x, f, up=up, down=down, padding=pad, gain=up**2)
        want = _naive_upfirdn2d(x, f, up, down, pad, up**2)
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------
# Generator behaviour.


def test_generator_shapes_range_and_determinism(tiny_net: StyleGAN3Network) -> None:
    gen = StyleGAN3Generator(tiny_net)
    assert gen.latent_shape == (12,) and gen.resolution == 32 and gen.channels == 3
    w1 = gen.sample_latents(3, torch.Generator().manual_seed(7))
    w2 = gen.sample_latents(3, torch.Generator().manual_seed(7))
    assert w1.shape == (3, 12) and torch.equal(w1, w2)
    img = gen.synthesize(w1)
    assert img.shape == (3, 3, 32, 32) and img.dtype == torch.float32
    assert float(img.min()) >= 0.0 and float(img.max()) <= 1.0
    assert float(img.std()) > 1e-3
    assert torch.equal(img, gen.synthesize(w1))
    # A sample's image does not depend on the rest of its batch (or on chunking).
    torch.testing.assert_close(gen.synthesize(w1[1:2]), img[1:2], atol=1e-5, rtol=0)
    chunked = StyleGAN3Generator(tiny_net, batch_size=2).synthesize(w1)
    torch.testing.assert_close(chunked, img, atol=1e-5, rtol=0)
    # synthesize == (network output + 1) / 2 for the same w in every layer.
    raw = tiny_net.synthesis(w1.unsqueeze(1).repeat(1, tiny_net.num_ws, 1))
    torch.testing.assert_close(img, ((raw + 1) / 2).clamp(0, 1))
    assert gen.synthesize(torch.zeros(0, 12)).shape == (0, 3, 32, 32)


def test_truncation(tiny_net: StyleGAN3Network) -> None:
    w = StyleGAN3Generator(tiny_net, truncation_psi=0.0).sample_latents(
        4, torch.Generator().manual_seed(0)
    )
    torch.testing.assert_close(w, tiny_net.mapping.w_avg.expand(4, -1))
    half = StyleGAN3Generator(tiny_net, truncation_psi=0.5)
    full = StyleGAN3Generator(tiny_net)
    wh = half.sample_latents(4, torch.Generator().manual_seed(1))
    wf = full.sample_latents(4, torch.Generator().manual_seed(1))
    w_avg = tiny_net.mapping.w_avg
    torch.testing.assert_close(wh, w_avg + 0.5 * (wf - w_avg))


def test_wrong_latent_shape(tiny_net: StyleGAN3Network) -> None:
    gen = StyleGAN3Generator(tiny_net)
    with pytest.raises(GeneratorError, match=r"expects \(n, 12\)"):
        gen.synthesize(torch.zeros(2, 8))
    with pytest.raises(GeneratorError):
        gen.synthesize(torch.zeros(2, 8, 12))
    with pytest.raises(GeneratorError, match="torch.Tensor"):
        gen.synthesize(np.zeros((2, 12)))  # type: ignore[arg-type]


def test_device_means_the_same_as_for_every_generator(tiny_net: StyleGAN3Network) -> None:
    """StyleGAN3 resolves ``device`` with generators.device.resolve_device, like load_generator."""
    from generators.device import resolve_device

    assert StyleGAN3Generator(tiny_net).device == torch.device("cpu")
    assert StyleGAN3Generator(tiny_net, device="auto").device == resolve_device("auto")
    with pytest.raises(GeneratorError, match="not a device name"):
        StyleGAN3Generator(tiny_net, device="warp-drive")
    if not torch.cuda.is_available():
        with pytest.raises(GeneratorError, match="no cuda device"):
            StyleGAN3Generator(tiny_net, device="cuda")


def test_conditional_model() -> None:
    net = _make_network({**TINY_KWARGS, "c_dim": 4}, seed=3)
    assert "mapping.embed.weight" in net.state_dict()
    gen = StyleGAN3Generator(net)
    w = gen.sample_latents(2, torch.Generator().manual_seed(0))
    assert w.shape == (2, 12)
    fixed = StyleGAN3Generator(net, class_idx=2)
    z = torch.randn(2, 8)
    c = F.one_hot(torch.tensor([2, 2]), 4).float()
    torch.testing.assert_close(fixed.z_to_w(z), net.mapping(z, c)[:, 0])
    with pytest.raises(GeneratorError, match="class_idx"):
        StyleGAN3Generator(net, class_idx=4)


# --------------------------------------------------------------------------------------------
# Save / load and conversion.


def test_save_load_round_trip(tiny_net: StyleGAN3Network, tmp_path: Path) -> None:
    out = write_converted_dir(tiny_net.config, tiny_net.state_dict(), tmp_path / "tiny")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["w_dim"] == 12 and cfg["synthesis_kwargs"]["num_layers"] == 6
    assert cfg["ktl_architecture"] == "stylegan3-t"
    gen = load_stylegan3(out, truncation_psi=0.7)
    ref = StyleGAN3Generator(tiny_net, truncation_psi=0.7)
    w = ref.sample_latents(2, torch.Generator().manual_seed(3))
    assert torch.equal(gen.sample_latents(2, torch.Generator().manual_seed(3)), w)
    assert torch.equal(gen.synthesize(w), ref.synthesize(w))
    with pytest.raises(GeneratorError, match="already exists"):
        write_converted_dir(tiny_net.config, tiny_net.state_dict(), out)
    with pytest.raises(GeneratorError, match="unknown StyleGAN3 option"):
        load_stylegan3(out, truncation=0.5)


@pytest.mark.parametrize("kwargs", [TINY_KWARGS, R_KWARGS], ids=["T", "R"])
def test_convert_official_format_pickle(
    kwargs: dict[str, Any], tmp_path: Path, fake_nvidia_modules: None
) -> None:
    net = _make_network(kwargs, seed=5)
    marker = tmp_path / "module_src_ran"
    pkl = _official_pickle(net, kwargs, tmp_path / "network-snapshot.pkl", marker=marker)
    config, state = read_stylegan3_pickle(pkl)
    assert config == net.config
    assert state.keys() == net.state_dict().keys()
    for k, v in net.state_dict().items():
        assert torch.equal(state[k], v), k
    out = convert_stylegan3_pickle(pkl, tmp_path / "converted")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".converted")]
    ref = StyleGAN3Generator(net)
    w = ref.sample_latents(2, torch.Generator().manual_seed(0))
    for source in (out, pkl):
        gen = load_stylegan3(source)
        assert gen.config.architecture == (
            "stylegan3-r" if "conv_kernel" in kwargs else "stylegan3-t"
        )
        assert torch.equal(gen.synthesize(w), ref.synthesize(w))
    assert not marker.exists(), "code embedded in the pickle was executed"


def _evil_reduce(fn, *args):
    class Evil:
        def __reduce__(self):
            return (fn, args)

    return Evil()


@pytest.mark.parametrize("where", ["top", "nested"])
def test_pickle_with_os_system_is_refused(
    tmp_path: Path, where: str, tiny_net: StyleGAN3Network, fake_nvidia_modules: None
) -> None:
    marker = tmp_path / "pwned"
    evil = _evil_reduce(os.system, f"touch {marker}")
    pkl = tmp_path / "evil.pkl"
    if where == "top":
        pkl.write_bytes(pickle.dumps({"G_ema": evil}, protocol=4))
    else:  # hidden in a layer's state, after legitimate data
        g = _persistent_state(tiny_net, None)
        g.meta["state"]["_modules"]["synthesis"].meta["state"]["payload"] = evil
        pkl.write_bytes(pickle.dumps({"G_ema": g}, protocol=4))
    with pytest.raises(GeneratorError, match=r"refusing to load global '(posix|os|nt)\.system'"):
        load_stylegan3(pkl)
    with pytest.raises(GeneratorError, match="system"):
        convert_stylegan3_pickle(pkl, tmp_path / "out")
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "payload,name",
    [
        (_evil_reduce(eval, "1 + 1"), "builtins.eval"),
        (_evil_reduce(subprocess.call, ["true"]), "subprocess.call"),
        (_evil_reduce(getattr, 1, "real"), "builtins.getattr"),
        (torch.nn.Linear(2, 2), "torch.nn.modules.linear.Linear"),
        (Counter(a=1), "collections.Counter"),
    ],
)
def test_unknown_globals_are_refused(tmp_path: Path, payload: Any, name: str) -> None:
    pkl = tmp_path / "bad.pkl"
    try:
        pkl.write_bytes(pickle.dumps({"G_ema": payload}, protocol=4))
    except (pickle.PicklingError, TypeError, AttributeError):
        pytest.skip("payload not picklable on this Python")
    with pytest.raises(GeneratorError, match=f"refusing to load global '{name}'"):
        read_stylegan3_pickle(pkl)


def test_corrupt_inputs(tiny_net: StyleGAN3Network, tmp_path: Path, fake_nvidia_modules) -> None:
    with pytest.raises(GeneratorError, match="not found"):
        load_stylegan3(tmp_path / "missing.pkl")
    pkl = _official_pickle(tiny_net, TINY_KWARGS, tmp_path / "net.pkl")
    data = pkl.read_bytes()
    for cut in (len(data) // 3, len(data) - 10, 5):
        trunc = tmp_path / f"trunc{cut}.pkl"
        trunc.write_bytes(data[:cut])
        with pytest.raises(GeneratorError, match="truncated or corrupt"):
            load_stylegan3(trunc)
    (tmp_path / "notpickle.pkl").write_bytes(b"hello world")
    with pytest.raises(GeneratorError, match="pickle"):
        load_stylegan3(tmp_path / "notpickle.pkl")

    out = convert_stylegan3_pickle(pkl, tmp_path / "conv")
    weights = (out / "model.safetensors").read_bytes()
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((out / "config.json").read_text())
    (bad / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    with pytest.raises(GeneratorError, match="truncated or corrupt"):
        load_stylegan3(bad)
    (bad / "model.safetensors").unlink()
    with pytest.raises(GeneratorError, match="model.safetensors missing"):
        load_stylegan3(bad)


def test_config_weights_mismatch(tiny_net: StyleGAN3Network, tmp_path: Path) -> None:
    out = write_converted_dir(tiny_net.config, tiny_net.state_dict(), tmp_path / "m")
    cfg = json.loads((out / "config.json").read_text())
    cfg["synthesis_kwargs"]["channel_max"] = 8
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(GeneratorError, match=r"shape mismatches: synthesis\.input\.weight"):
        load_stylegan3(out)
    state = dict(tiny_net.state_dict())
    del state["mapping.fc1.bias"]
    state["extra.weight"] = torch.zeros(1)
    out2 = write_converted_dir(tiny_net.config, state, tmp_path / "m2")
    with pytest.raises(
        GeneratorError, match=r"missing keys: mapping\.fc1\.bias.*unexpected keys: extra"
    ):
        load_stylegan3(out2)
    cfg["synthesis_kwargs"]["bogus_option"] = 1
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(GeneratorError, match="bogus_option"):
        load_stylegan3(out)


def test_non_stylegan3_pickle_is_rejected(tmp_path: Path, fake_nvidia_modules: None) -> None:
    # A persistent Generator without a Fourier-feature input (e.g. StyleGAN2).
    mapping = torch.nn.Module()
    mapping.register_buffer("w_avg", torch.zeros(4))
    g = torch.nn.Module()
    g.add_module("mapping", mapping)
    g.add_module("synthesis", torch.nn.Module())
    wrapped = _persistent_state(g, None)
    wrapped.meta["class_name"] = "Generator"
    pkl = tmp_path / "sg2.pkl"
    pkl.write_bytes(pickle.dumps({"G_ema": wrapped}, protocol=4))
    with pytest.raises(GeneratorError, match="not a StyleGAN3 generator"):
        read_stylegan3_pickle(pkl)
    pkl.write_bytes(pickle.dumps({"G": 1}, protocol=4))
    with pytest.raises(GeneratorError, match="no 'G_ema'"):
        read_stylegan3_pickle(pkl)


def test_load_generator_spec(tiny_net: StyleGAN3Network, tmp_path: Path) -> None:
    loading = pytest.importorskip("generators.loading")
    out = write_converted_dir(tiny_net.config, tiny_net.state_dict(), tmp_path / "spec")
    gen = loading.load_generator(f"stylegan3:{out}", truncation_psi=0.5)
    assert isinstance(gen, StyleGAN3Generator) and gen.truncation_psi == 0.5
    assert gen.synthesize(gen.sample_latents(1, torch.Generator().manual_seed(0))).shape == (
        1,
        3,
        32,
        32,
    )
