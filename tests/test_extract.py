"""Feature extraction: layers by hook, pooling, preprocessing, batching, the cache, and the CLI end to end."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import write_image_folder
from evalkit import extract
from evalkit.cli import main
from evalkit.config import DataConfig, ExtractConfig, ModelConfig, PoolingConfig, PreprocessConfig
from evalkit.data import load_dataset
from evalkit.errors import EvalkitError
from evalkit.extract import (
    build_transform, cache_read, cache_write, extract_model, list_layers, pool, resolve_device, resolve_layers,
    resolve_preprocess, run_layers,
)
from evalkit.models import create_model

CPU = torch.device("cpu")
TINY_VIT = {"img_size": 16, "patch_size": 4, "in_chans": 3, "num_classes": 3, "embed_dim": 32, "depth": 2,
            "num_heads": 2}
USER = "python:usermodels:make_net"


def _ecfg(tmp_path, **kw) -> ExtractConfig:
    return ExtractConfig(**{"cache_dir": str(tmp_path / "cache"), "batch_size": 8, "device": "cpu", **kw})


def _dataset(root, **kw):
    return load_dataset(DataConfig(kind="imagefolder", path=str(root), **kw))


def _batch(model, dataset, spec=None, *, source=None):
    """The dataset as one preprocessed tensor batch, the reference input for known answers."""
    transform = build_transform(spec or resolve_preprocess(model, None, source=source))
    return torch.stack([transform(dataset.load_image(i)) for i in range(len(dataset))])


# --- pooling --------------------------------------------------------------------------------


@pytest.mark.parametrize("shape, kw, expected", [
    ((2, 3, 4, 5), {"spatial": "avg"}, lambda t: t.mean(dim=(2, 3))),
    ((2, 3, 4, 5), {"spatial": "max"}, lambda t: t.amax(dim=(2, 3))),
    ((2, 3, 4, 5), {"spatial": "flatten"}, lambda t: t.reshape(2, 60)),
    ((2, 7, 6), {"tokens": "cls", "prefix_tokens": 1}, lambda t: t[:, 0]),
    ((2, 7, 6), {"tokens": "mean", "prefix_tokens": 1}, lambda t: t[:, 1:].mean(dim=1)),
    ((2, 7, 6), {"tokens": "cls", "prefix_tokens": 0}, lambda t: t.mean(dim=1)),  # no class token
    ((2, 7, 6), {"tokens": "flatten"}, lambda t: t.reshape(2, 42)),
    ((2, 9), {}, lambda t: t),
])
def test_pool(shape, kw, expected):
    t = torch.randn(*shape)
    out = pool(t, **kw)
    assert out.dtype == torch.float32 and out.ndim == 2
    assert torch.allclose(out, expected(t))
    assert torch.allclose(pool((t, "extra"), **kw), out)  # tuple outputs: the first tensor


# --- layers on real architectures -----------------------------------------------------------


def test_timm_vit_blocks_pool_to_the_class_token_and_penultimate_is_the_head_input(image_folder, tmp_path):
    ds = _dataset(image_folder)
    cfg = ModelConfig(name="vit", source="timm:vit_tiny_patch16_224", kwargs=TINY_VIT,
                      layers=("blocks.0", "blocks.1", "penultimate"))
    feats = {f.layer: f.features for f in extract_model(cfg, ds, _ecfg(tmp_path))}
    model = create_model(cfg.source, kwargs=TINY_VIT).eval()
    x = _batch(model, ds)
    assert x.shape == (15, 3, 16, 16)  # the model's own size, not ImageNet's 224
    with torch.no_grad():
        head_input = model.forward_head(model.forward_features(x), pre_logits=True)
        inter = model.forward_intermediates(x, indices=[0, 1], return_prefix_tokens=True, intermediates_only=True)
    np.testing.assert_allclose(feats["penultimate"], head_input.numpy(), atol=1e-5)
    for i, (spatial, prefix) in enumerate(inter):
        np.testing.assert_allclose(feats[f"blocks.{i}"], prefix[:, 0].numpy(), atol=1e-5)  # class token
    mean_cfg = cfg.model_copy(update={"layers": ("blocks.1",), "pooling": PoolingConfig(tokens="mean")})
    mean_feats = extract_model(mean_cfg, ds, _ecfg(tmp_path))[0].features
    np.testing.assert_allclose(mean_feats, inter[1][0].mean(dim=(2, 3)).numpy(), atol=1e-5)  # patch tokens


def test_timm_cnn_layers_and_penultimate(image_folder, tmp_path):
    ds = _dataset(image_folder)
    pre = PreprocessConfig(resize=32, channels=3, mean=(0.5,), std=(0.5,))
    cfg = ModelConfig(name="r", source="timm:resnet10t", kwargs={"num_classes": 3}, preprocess=pre,
                      layers=("layer2", "penultimate"), pooling=PoolingConfig(spatial="max"))
    feats = {f.layer: f.features for f in extract_model(cfg, ds, _ecfg(tmp_path))}
    model = create_model(cfg.source, kwargs=cfg.kwargs).eval()
    x = _batch(model, ds, resolve_preprocess(model, pre))
    with torch.no_grad():
        head_input = model.forward_head(model.forward_features(x), pre_logits=True)
    np.testing.assert_allclose(feats["penultimate"], head_input.numpy(), atol=1e-5)
    assert feats["layer2"].shape == (15, 128)
    assert np.all(feats["layer2"] >= 0)  # max of ReLU outputs


def test_timm_swin_channels_last_maps_pool_over_space():
    model = create_model("timm:swin_tiny_patch4_window7_224", kwargs={
        "img_size": 32, "window_size": 4, "embed_dim": 16, "depths": (1, 1), "num_heads": (1, 2),
        "num_classes": 3}).eval()
    x = torch.randn(3, 3, 32, 32)
    layer_map = resolve_layers(model, ["patch_embed.proj", "layers.1", "penultimate"])
    feats, _ = run_layers(model, [x], layer_map, device=CPU, pooling=PoolingConfig())
    with torch.no_grad():
        conv = model.patch_embed.proj(x)  # (B, C, H, W): a convolution stays channels-first
        stage1 = model.layers[1](model.layers[0](model.patch_embed(x)))  # (B, H, W, C)
        head_input = model.forward_head(model.forward_features(x), pre_logits=True)
    np.testing.assert_allclose(feats["patch_embed.proj"], conv.mean(dim=(2, 3)).numpy(), atol=1e-5)
    np.testing.assert_allclose(feats["layers.1"], stage1.mean(dim=(1, 2)).numpy(), atol=1e-5)
    np.testing.assert_allclose(feats["penultimate"], head_input.numpy(), atol=1e-5)


def test_user_module_with_control_flow_is_captured_by_hooks():
    from usermodels import make_net

    model = make_net(width=4).eval()
    with pytest.raises(Exception):  # tracing cannot follow a value-dependent branch
        torch.fx.symbolic_trace(model)
    x = torch.randn(6, 3, 10, 10)
    calls = []
    model.register_forward_pre_hook(lambda *_: calls.append(1))
    layer_map = resolve_layers(model, ["blocks.1", "penultimate"])
    feats, _ = run_layers(model, [x], layer_map, device=CPU, pooling=PoolingConfig())
    assert len(calls) == 1  # both layers from one forward pass
    with torch.no_grad():
        np.testing.assert_allclose(feats["penultimate"], model(x, return_features=True).numpy(), atol=1e-6)
        h = model.stem(x)
        h = h + model.blocks[0](h)
        block1 = model.blocks[1](h)  # the module's own output, before the residual sum
    np.testing.assert_allclose(feats["blocks.1"], block1.mean(dim=(2, 3)).numpy(), atol=1e-5)


def test_forward_stops_once_every_layer_is_captured():
    from usermodels import make_net

    model = make_net(width=4).eval()
    ran = []
    model.classifier.register_forward_hook(lambda *_: ran.append("classifier"))
    model.blocks[2].register_forward_hook(lambda *_: ran.append("blocks.2"))
    x = torch.randn(5, 3, 8, 8)
    layer_map = resolve_layers(model, ["blocks.1", "stem"])
    early, _ = run_layers(model, [x], layer_map, device=CPU, pooling=PoolingConfig())
    assert ran == []  # nothing after blocks.1 ran
    full, _ = run_layers(model, [x], layer_map, device=CPU, pooling=PoolingConfig(), stop_early=False)
    assert ran == ["blocks.2", "classifier"]
    for layer in early:
        np.testing.assert_array_equal(early[layer], full[layer])


def test_layer_errors():
    from usermodels import NoClassifier, make_net

    model = make_net()
    with pytest.raises(EvalkitError, match=r"unknown layer 'block.1'; did you mean 'blocks.1'") as info:
        resolve_layers(model, ["block.1"])
    assert "\n" not in str(info.value) and "evalkit layers" in str(info.value)
    with pytest.raises(EvalkitError, match=r"'penultimate': this model has no final Linear"):
        resolve_layers(NoClassifier(), ["penultimate"])

    class Unused(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.spare = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)

        def forward(self, x):
            return self.used(x)

    m = Unused()
    with pytest.raises(EvalkitError, match=r"layer 'spare' was not run by the model's forward"):
        run_layers(m, [torch.randn(2, 3)], resolve_layers(m, ["spare"]), device=CPU, pooling=PoolingConfig())


@pytest.mark.parametrize("head, softmax", [("out", False), ("head", False), ("out", True)])
def test_penultimate_is_the_input_of_the_layer_that_makes_the_output(image_folder, tmp_path, head, softmax):
    from usermodels import HiddenFc

    model = HiddenFc(head, softmax)
    x = torch.randn(1, 3, 16, 16)
    assert resolve_layers(model, ["penultimate"], example=x) == {"penultimate": (head, "input")}
    assert dict((n, k) for n, k, _ in list_layers_of(model))["penultimate"] == f"input of {head}"
    (fs,) = extract.extract_model(ModelConfig(name="h", source="python:usermodels:HiddenFc",
                                              kwargs={"head": head, "softmax": softmax}),
                                  _dataset(image_folder), _ecfg(tmp_path, cache=False))
    assert fs.features.shape == (15, 8)  # the input of the 8 -> 3 classifier, not of the 4 -> 8 hidden fc


def list_layers_of(model):
    from unittest import mock

    with mock.patch("evalkit.models.create_model", return_value=model):
        return list_layers("python:x:y", input_size=(1, 3, 16, 16))


def test_list_layers_prints_shapes_for_a_dummy_input():
    rows = {name: (kind, shape) for name, kind, shape in list_layers(USER, kwargs={"width": 4, "embed_dim": 6})}
    assert rows["blocks.1"] == ("Sequential", (1, 4, 224, 224))
    assert rows["penultimate"] == ("input of classifier", (1, 6))
    vit = {n: s for n, _, s in list_layers("timm:vit_tiny_patch16_224", kwargs=TINY_VIT)}
    assert vit["blocks.1"] == (1, 17, 32) and vit["penultimate"] == (1, 32)
    with pytest.raises(EvalkitError, match=r"dummy forward pass with input \(1, 3, 5, 5\) failed.*--input-size"):
        list_layers("timm:vit_tiny_patch16_224", kwargs=TINY_VIT, input_size=(1, 3, 5, 5))


# --- preprocessing --------------------------------------------------------------------------


def test_preprocess_sources():
    demo_vit = create_model("timm:vit_tiny_patch16_224", kwargs={
        "img_size": 8, "patch_size": 2, "in_chans": 1, "num_classes": 10, "embed_dim": 16, "depth": 1,
        "num_heads": 2})
    spec = resolve_preprocess(demo_vit, None)
    assert (spec["resize"], spec["crop"], spec["channels"], spec["mean"], spec["origin"]) == (8, 8, 1, [0.5], "timm")
    resnet = create_model("timm:resnet10t")
    spec = resolve_preprocess(resnet, None)
    assert (spec["crop"], spec["channels"], len(spec["mean"])) == (176, 3, 3)  # timm's metadata
    explicit = PreprocessConfig(resize=20, mean=(0.1,), std=(0.2,))
    spec = resolve_preprocess(resnet, explicit)
    assert (spec["resize"], spec["crop"], spec["mean"], spec["origin"]) == (20, None, [0.1], "config")
    tv = create_model("torchvision:mobilenet_v3_small")
    spec = resolve_preprocess(tv, None, source="torchvision:mobilenet_v3_small")
    assert (spec["resize"], spec["crop"], spec["origin"]) == (256, 224, "torchvision")
    user = create_model(USER, kwargs={"in_chans": 1})
    spec = resolve_preprocess(user, None, source=USER)
    assert (spec["resize"], spec["mean"], spec["channels"], spec["origin"]) == (None, None, 1, "default")
    with pytest.raises(EvalkitError, match=r"preprocess.mean: 3 values for a 1-channel input"):
        resolve_preprocess(user, PreprocessConfig(mean=(0.5, 0.5, 0.5), std=(0.2,)))


def test_grey_images_become_rgb_for_a_three_channel_model(tmp_path):
    root = write_image_folder(tmp_path / "grey", classes=("a", "b"), n_per_class=3, mode="L")
    cfg = ModelConfig(name="u", source=USER, kwargs={"in_chans": 3}, layers=("penultimate",))
    (fs,) = extract_model(cfg, _dataset(root), _ecfg(tmp_path))
    assert fs.features.shape == (6, 16)


def test_images_of_different_sizes_need_a_resize(tmp_path):
    root = write_image_folder(tmp_path / "a", classes=("a",), n_per_class=2, size=(12, 12))
    write_image_folder(tmp_path / "a", classes=("b",), n_per_class=2, size=(16, 16))
    cfg = ModelConfig(name="u", source=USER)
    with pytest.raises(EvalkitError, match=r"images of different sizes.*preprocess: \{resize: N, crop: N\}"):
        extract_model(cfg, _dataset(root), _ecfg(tmp_path, cache=False))
    fixed = cfg.model_copy(update={"preprocess": PreprocessConfig(resize=8, crop=8)})
    assert extract_model(fixed, _dataset(root), _ecfg(tmp_path, cache=False))[0].features.shape == (4, 16)


@pytest.mark.parametrize("workers", [0, 1])
def test_a_corrupt_image_during_extraction_is_one_line_naming_the_file(image_folder, tmp_path, workers):
    (image_folder / "fish" / "012.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    cfg = ModelConfig(name="u", source=USER)
    with pytest.raises(EvalkitError) as info:
        extract_model(cfg, _dataset(image_folder), _ecfg(tmp_path, num_workers=workers, cache=False))
    msg = str(info.value)
    assert "\n" not in msg and re.search(r"fish/012\.png: cannot read image", msg)


# --- batching and devices -------------------------------------------------------------------


def test_out_of_memory_halves_the_batch_and_retries():
    from usermodels import OutOfMemoryNet

    model = OutOfMemoryNet(max_batch=3).eval()
    x = torch.randn(8, 3, 5, 5)
    layer_map = resolve_layers(model, ["penultimate"])
    notes = []
    loader = torch.utils.data.DataLoader(x, batch_size=8)
    feats, _ = run_layers(model, loader, layer_map, device=CPU, pooling=PoolingConfig(), log=notes.append)
    assert model.batch_sizes == [8, 4, 2, 2, 2, 2]
    assert [re.sub(r"\s+", " ", n).strip() for n in notes] == [
        "cpu out of memory: retrying with batch size 4", "cpu out of memory: retrying with batch size 2"]
    with torch.no_grad():
        expected = model.features(x).mean(dim=(2, 3))
    np.testing.assert_allclose(feats["penultimate"], expected.numpy(), atol=1e-6)


def test_device_resolution():
    assert resolve_device("cpu") == CPU
    if torch.cuda.is_available():
        assert resolve_device("auto").type == "cuda"
    else:
        assert resolve_device("auto").type in ("cpu", "mps")
        with pytest.raises(EvalkitError, match=r"extract.device: 'cuda' asked for but no CUDA device"):
            resolve_device("cuda")


@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_extraction_matches_cpu(image_folder, tmp_path, bf16):
    ds = _dataset(image_folder)
    cfg = ModelConfig(name="vit", source="timm:vit_tiny_patch16_224", kwargs=TINY_VIT,
                      layers=("blocks.1", "penultimate"))
    cpu = extract_model(cfg, ds, _ecfg(tmp_path, cache=False))
    cuda = extract_model(cfg, ds, _ecfg(tmp_path, cache=False, device="cuda", bf16=bf16))
    for a, b in zip(cpu, cuda):
        assert b.features.dtype == np.float32 and b.features.shape == a.features.shape
        if bf16:
            cos = (a.features * b.features).sum(1) / (np.linalg.norm(a.features, axis=1) * np.linalg.norm(b.features, axis=1))
            assert cos.min() > 0.98
        else:
            np.testing.assert_allclose(b.features, a.features, rtol=1e-3, atol=1e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_out_of_memory_retry_with_a_real_allocation():
    class Hungry(torch.nn.Module):  # above 2 samples, asks for 1 TiB per sample: beyond any GPU
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(4, 2)

        def forward(self, x):
            if x.shape[0] > 2:
                torch.empty(x.shape[0] * (1 << 40), dtype=torch.uint8, device=x.device)
            return self.fc(x)

    notes = []
    model = Hungry()
    x = torch.randn(64, 4)
    feats, _ = run_layers(model, torch.utils.data.DataLoader(x, batch_size=64), resolve_layers(model, ["penultimate"]),
                          device=torch.device("cuda"), pooling=PoolingConfig(), log=notes.append)
    np.testing.assert_allclose(feats["penultimate"], x.numpy(), atol=1e-6)
    assert notes[-1].strip() == "cuda out of memory: retrying with batch size 2" and len(notes) == 5


# --- the feature cache ----------------------------------------------------------------------


@pytest.fixture
def count_runs(monkeypatch):
    """How many times extraction actually ran a model."""
    calls = []
    real = extract.run_layers

    def counting(*a, **kw):
        calls.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(extract, "run_layers", counting)
    return calls


def _checkpointed_user_model(tmp_path, seed=1, **kw):
    path = tmp_path / f"user-{seed}.pt"
    torch.save(create_model(USER, kwargs={"width": 4}, seed=seed).state_dict(), path)
    return ModelConfig(name="u", source=USER, kwargs={"width": 4}, checkpoint=str(path),
                       layers=("blocks.0", "penultimate"), **kw)


def test_cache_hit_skips_the_model_and_a_change_recomputes(image_folder, tmp_path, count_runs):
    ds = _dataset(image_folder)
    ecfg = _ecfg(tmp_path)
    cfg = _checkpointed_user_model(tmp_path)
    first = extract_model(cfg, ds, ecfg)
    second = extract_model(cfg, ds, ecfg)
    assert len(count_runs) == 1
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a.features, b.features)
    changes = [
        cfg.model_copy(update={"pooling": PoolingConfig(spatial="max")}),
        cfg.model_copy(update={"layers": ("blocks.1", "penultimate")}),
        cfg.model_copy(update={"preprocess": PreprocessConfig(resize=8)}),
        _checkpointed_user_model(tmp_path, seed=2),  # other weights in another file
    ]
    for n, changed in enumerate(changes, start=2):
        extract_model(changed, ds, ecfg)
        assert len(count_runs) == n
    extract_model(cfg, ds, ecfg, use_cache=False)  # --no-cache
    assert len(count_runs) == len(changes) + 2
    extract_model(cfg, _dataset(image_folder, max_samples=6), ecfg)  # other samples
    assert len(count_runs) == len(changes) + 3


@pytest.mark.parametrize("source, kwargs, layers, default", [
    ("timm:resnet18", {}, ("layer4", "penultimate", "fc"), 1000),
    ("torchvision:mobilenet_v3_small", {}, ("penultimate", "classifier.3"), 1000),
    (USER, {"width": 4}, ("penultimate", "classifier"), 4),
])
def test_a_checkpoint_with_another_classifier_width_loads_with_a_note(image_folder, tmp_path, count_runs, source,
                                                                      kwargs, layers, default):
    torch.save(create_model(source, kwargs={**kwargs, "num_classes": 3}, seed=7).state_dict(), tmp_path / "w.pt")
    ds = _dataset(image_folder)
    cfg = ModelConfig(name="m", source=source, kwargs=kwargs, checkpoint=str(tmp_path / "w.pt"), layers=layers,
                      preprocess=PreprocessConfig(resize=32, crop=32, channels=3))
    explicit = cfg.model_copy(update={"kwargs": {**kwargs, "num_classes": 3}})
    want = extract_model(explicit, ds, _ecfg(tmp_path, cache=False))
    notes, logged = [], []
    got = extract_model(cfg, ds, _ecfg(tmp_path), notes=notes, log=logged.append)
    note = (f"model 'm': classifier width 3 taken from the checkpoint (the source builds {default} by default; "
            f"set kwargs: {{num_classes: 3}} to silence this)")
    assert notes == [note] and f"  note: {note}" in logged
    assert [fs.layer for fs in got] == list(layers)
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a.features, b.features)
    again_notes = []
    again = extract_model(cfg, ds, _ecfg(tmp_path), notes=again_notes)  # from the cache: the note comes back
    assert len(count_runs) == 2 and again_notes == [note]
    for a, b in zip(again, want):
        np.testing.assert_array_equal(a.features, b.features)


def test_python_model_cache_covers_its_code_and_initial_weights(image_folder, tmp_path, count_runs, monkeypatch):
    code = ("import os\nimport torch\n\n\ndef make():\n    torch.manual_seed(int(os.environ.get('H4_SEED', '0')))\n"
            "    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(2))\n")
    mod = tmp_path / "mods" / "h4_cached_net.py"
    mod.parent.mkdir()
    mod.write_text(code)
    monkeypatch.syspath_prepend(str(mod.parent))
    ds, ecfg = _dataset(image_folder), _ecfg(tmp_path)
    cfg = ModelConfig(name="p", source="python:h4_cached_net:make", layers=("0",))
    extract_model(cfg, ds, ecfg)
    extract_model(cfg, ds, ecfg)
    assert len(count_runs) == 1  # unchanged: served from the cache
    mod.write_text(code + "# edited\n")  # the module's file changed
    extract_model(cfg, ds, ecfg)
    assert len(count_runs) == 2
    monkeypatch.setenv("H4_SEED", "7")  # same code, other weights as created
    extract_model(cfg, ds, ecfg)
    assert len(count_runs) == 3


def test_rewritten_checkpoint_recomputes(image_folder, tmp_path, count_runs):
    ds = _dataset(image_folder)
    cfg = _checkpointed_user_model(tmp_path)
    extract_model(cfg, ds, _ecfg(tmp_path))
    torch.save(create_model(USER, kwargs={"width": 4}, seed=5).state_dict(), cfg.checkpoint)  # same path
    extract_model(cfg, ds, _ecfg(tmp_path))
    assert len(count_runs) == 2


@pytest.mark.parametrize("damage", ["truncate", "flip-a-value", "garbage"])
def test_a_damaged_cache_file_is_never_served(image_folder, tmp_path, count_runs, damage):
    ds = _dataset(image_folder)
    ecfg = _ecfg(tmp_path)
    cfg = _checkpointed_user_model(tmp_path)
    good = extract_model(cfg, ds, ecfg)
    (path,) = Path(ecfg.cache_dir).glob("u-*.npz")
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:-100])
    elif damage == "garbage":
        path.write_bytes(b"garbage")
    else:  # a valid archive whose arrays no longer match the stored digest
        with np.load(path) as z:
            arrays = {k: z[k] for k in z.files}
        arrays["penultimate"] = arrays["penultimate"] + 1
        np.savez(path, **arrays)
    assert cache_read(path) is None
    again = extract_model(cfg, ds, ecfg)
    assert len(count_runs) == 2
    for a, b in zip(good, again):
        np.testing.assert_array_equal(a.features, b.features)
    assert cache_read(path) is not None  # rewritten


def test_cache_write_is_atomic_and_verified(tmp_path):
    arrays = {"a": np.arange(6, dtype=np.float32).reshape(2, 3)}
    cache_write(tmp_path / "x.npz", arrays)
    assert [p.name for p in tmp_path.iterdir()] == ["x.npz"]
    np.testing.assert_array_equal(cache_read(tmp_path / "x.npz")["a"], arrays["a"])
    assert cache_read(tmp_path / "absent.npz") is None


def test_precomputed_features_entry(tmp_path):
    X = np.random.default_rng(0).normal(size=(899, 4)).astype(np.float32)
    np.save(tmp_path / "f.npy", X)
    ds = load_dataset(DataConfig(kind="digits", max_samples=30))
    (fs,) = extract_model(ModelConfig(name="pre", features=str(tmp_path / "f.npy")), ds, _ecfg(tmp_path))
    np.testing.assert_array_equal(fs.features, X[ds.indices])
    assert fs.layer == "features"
    np.save(tmp_path / "short.npy", X[:100])
    with pytest.raises(EvalkitError, match=r"100 feature rows for a dataset of 899 samples"):
        extract_model(ModelConfig(name="pre", features=str(tmp_path / "short.npy")), ds, _ecfg(tmp_path))
    from evalkit.data import digits_split

    shuffled = np.roll(digits_split("test")[1], 1)
    np.savez(tmp_path / "wrong-order.npz", features=X, labels=shuffled)
    with pytest.raises(EvalkitError, match=r"'labels' disagree with the dataset's"):
        extract_model(ModelConfig(name="pre", features=str(tmp_path / "wrong-order.npz")), ds, _ecfg(tmp_path))


# --- end to end through the command line ----------------------------------------------------

E2E_MODELS = {
    "tm": ("timm:resnet10t", {"num_classes": 4}, ["layer2", "penultimate"]),
    "tv": ("torchvision:resnet18", {"num_classes": 4}, ["layer3", "penultimate"]),
    "user": (USER, {"width": 8}, ["blocks.1", "penultimate"]),
}


def _write_config(tmp_path, models, *, root=None, name="cfg.yaml") -> Path:
    if root is None:
        root = tmp_path / "images"
        if not root.exists():
            write_image_folder(root, classes=("a", "b", "c", "d"), n_per_class=15, size=(48, 48))
    cfg = {"name": "e2e", "data": {"kind": "imagefolder", "path": str(root)}, "models": models,
           "embed": {"methods": ["pca"], "seeds": [0]},
           "extract": {"cache_dir": str(tmp_path / "cache"), "batch_size": 32, "device": "cpu"}}
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _log(capsys) -> str:
    captured = capsys.readouterr()
    return captured.out + captured.err


def test_report_end_to_end_then_served_from_the_cache(tmp_path, capsys, count_runs):
    models = []
    for name, (source, kwargs, layers) in E2E_MODELS.items():
        ckpt = tmp_path / f"{name}.pt"
        torch.save(create_model(source, kwargs=kwargs, seed=7).state_dict(), ckpt)
        models.append({"name": name, "source": source, "kwargs": kwargs, "checkpoint": str(ckpt), "layers": layers,
                       "preprocess": {"resize": 48, "channels": 3, "mean": [0.5], "std": [0.5]}})
    cfg = _write_config(tmp_path, models)
    assert main(["report", str(cfg), "--out", str(tmp_path / "run1")]) == 0
    first_log = _log(capsys)
    assert main(["report", str(cfg), "--out", str(tmp_path / "run2")]) == 0
    second_log = _log(capsys)
    assert len(count_runs) == 3  # the second run extracted nothing
    for run in ("run1", "run2"):
        assert {"index.html", "metrics.json", "embeddings.npz", "config.yaml"} <= {p.name for p in (tmp_path / run).iterdir()}
    metrics = [json.loads((tmp_path / run / "metrics.json").read_text()) for run in ("run1", "run2")]
    keys = {(r["model"], r["layer"]) for r in metrics[0]["rows"]}
    assert keys == {(m, layer) for m, (_, _, layers) in E2E_MODELS.items() for layer in layers}
    assert metrics[0]["rows"] == metrics[1]["rows"]  # identical features, identical scores
    assert metrics[1]["provenance"]["extract_s"] < metrics[0]["provenance"]["extract_s"]
    assert "from cache" not in first_log and second_log.count("features from cache") == 3
    with np.load(tmp_path / "run1" / "embeddings.npz") as z:
        assert z["tv/layer3/pca"].shape == (60, 2)

    # change one model's weights: only that model is recomputed
    torch.save(create_model(USER, kwargs={"width": 8}, seed=8).state_dict(), tmp_path / "user.pt")
    assert main(["report", str(cfg), "--out", str(tmp_path / "run3")]) == 0
    third_log = _log(capsys)
    assert len(count_runs) == 4 and third_log.count("features from cache") == 2
    assert re.search(r"user: 60 images on cpu at [\d,]+ img/s", third_log)


def test_layers_command_lists_names_and_shapes(capsys):
    assert main(["layers", USER, "--kwargs", "{width: 4}", "--input-size", "3,16,16"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^blocks\.1\s+Sequential\s+\(1, 4, 16, 16\)$", out, re.M)
    assert re.search(r"^penultimate\s+input of classifier\s+\(1, 16\)$", out, re.M)


def _bad_input(tmp_path, capsys, model: dict) -> str:
    cfg = _write_config(tmp_path, [model], name=f"{model['name']}.yaml")
    code = main(["report", str(cfg), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert not (tmp_path / "out").exists()
    return err[-1]


def test_bad_inputs_exit_2_with_one_line(tmp_path, capsys):
    from usermodels import Pickled, make_net

    line = _bad_input(tmp_path, capsys, {"name": "a", "source": USER, "layers": ["blocks.7"]})
    assert line.startswith("evalkit: error: ")
    assert "unknown layer 'blocks.7'; did you mean 'blocks.2', 'blocks.1'" in line
    assert line.endswith(f"`evalkit layers {USER}` lists every name")
    line = _bad_input(tmp_path, capsys, {"name": "b", "source": "timm:resnet10tt"})
    assert "unknown timm model 'resnet10tt'; did you mean 'resnet10t'" in line
    line = _bad_input(tmp_path, capsys, {"name": "c", "source": USER, "checkpoint": str(tmp_path / "nope.pt")})
    assert line.endswith(f"checkpoint {tmp_path / 'nope.pt'} not found")
    torch.save({"state_dict": make_net().state_dict(), "cfg": Pickled()}, tmp_path / "pickled.pt")
    line = _bad_input(tmp_path, capsys, {"name": "d", "source": USER, "checkpoint": str(tmp_path / "pickled.pt")})
    assert "pickled.pt holds pickled Python objects" in line and "'unsafe_pickle: true'" in line
    cfg = _write_config(tmp_path, [{"name": "e", "source": USER, "checkpoint": str(tmp_path / "pickled.pt"),
                                    "unsafe_pickle": True}], name="ok.yaml")
    assert main(["report", str(cfg), "--out", str(tmp_path / "ok")]) == 0
