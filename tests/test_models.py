"""Model sources and checkpoints: every source kind, closest-name errors, safe loading."""
from __future__ import annotations

import os
import sys

import pytest
import torch

from evalkit.errors import EvalkitError
from evalkit.models import create_model, file_digest, load_checkpoint, read_checkpoint

CNN = "demo:cnn"


def _cnn(seed=0):
    return create_model(CNN, kwargs={"width": 4, "hidden": 8}, seed=seed)


def _same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# --- sources --------------------------------------------------------------------------------


@pytest.mark.parametrize("source, kwargs, cls", [
    ("demo:mlp", {"hidden": 8}, "MLP"),
    ("timm:resnet10t", {"num_classes": 3}, "ResNet"),
    ("torchvision:mobilenet_v3_small", {"num_classes": 3}, "MobileNetV3"),
    ("python:usermodels:make_net", {"width": 4}, "ControlFlowNet"),
    ("python:usermodels:ControlFlowNet", {"width": 4}, "ControlFlowNet"),
])
def test_every_source_kind_builds_a_module(source, kwargs, cls):
    model = create_model(source, kwargs=kwargs)
    assert type(model).__name__ == cls


def test_seeded_random_init_is_reproducible():
    assert _same_weights(_cnn(seed=3), _cnn(seed=3))
    assert not _same_weights(_cnn(seed=3), _cnn(seed=4))


@pytest.mark.parametrize("source, near", [
    ("timm:resnt10t", "'resnet10t'"),
    ("torchvision:resnet1", "'resnet18'"),
    ("demo:cnm", "'cnn'"),
    ("tim:resnet10t", "'timm'"),
    ("python:usermodels:make_nett", "'make_net'"),
])
def test_unknown_names_list_the_closest(source, near):
    with pytest.raises(EvalkitError) as info:
        create_model(source)
    msg = str(info.value)
    assert "\n" not in msg and "did you mean" in msg and near in msg


def test_a_bare_name_asks_for_a_prefix():
    with pytest.raises(EvalkitError, match=r"expected PREFIX:NAME.*timm:resnet18"):
        create_model("resnet18")


@pytest.mark.parametrize("source, kwargs, key", [
    ("timm:resnet10t", {"pretrained": True}, "pretrained"),
    ("torchvision:resnet18", {"weights": "DEFAULT"}, "weights"),
])
def test_download_arguments_are_refused(source, kwargs, key):
    with pytest.raises(EvalkitError, match=rf"kwargs.{key} would download.*checkpoint"):
        create_model(source, kwargs=kwargs)


def test_python_source_names_the_factory_parameters_on_bad_kwargs():
    with pytest.raises(EvalkitError) as info:
        create_model("python:usermodels:make_net", kwargs={"widht": 3})
    # make_net(**kwargs) accepts anything; the class then refuses: the error still names it
    assert "widht" in str(info.value)
    with pytest.raises(EvalkitError, match=r"do not fit ControlFlowNet\(in_chans, width"):
        create_model("python:usermodels:ControlFlowNet", kwargs={"widht": 3})


def test_python_source_imports_from_the_working_directory(tmp_path, monkeypatch):
    (tmp_path / "my_nets_for_evalkit.py").write_text(
        "import torch\n\ndef build(n=2):\n    return torch.nn.Linear(n, 1)\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(tmp_path))])
    model = create_model("python:my_nets_for_evalkit:build", kwargs={"n": 5})
    assert model.in_features == 5


@pytest.mark.parametrize("source, match", [
    ("python:no_such_module_xyz:f", r"cannot import 'no_such_module_xyz'"),
    ("python:usermodels", r"expected python:package.module:factory"),
    ("python:usermodels:Pickled", r"returned Pickled; expected a torch.nn.Module"),
    ("timm:vit_tiny_patch16_224", r"building the model failed"),
])
def test_python_and_build_failures_are_one_line(source, match):
    kwargs = {"embed_dim": 30, "num_heads": 4, "depth": 1} if source.startswith("timm") else None
    with pytest.raises(EvalkitError, match=match) as info:
        create_model(source, kwargs=kwargs)
    assert "\n" not in str(info.value)


# --- checkpoints ----------------------------------------------------------------------------


def test_plain_state_dict_loads(tmp_path):
    src, dst = _cnn(seed=1), _cnn(seed=2)
    torch.save(src.state_dict(), tmp_path / "w.pth")
    report = load_checkpoint(dst, tmp_path / "w.pth")
    assert _same_weights(src, dst)
    assert report["loaded"] == len(src.state_dict()) and not report["missing"]


def test_safetensors_loads(tmp_path):
    from safetensors.torch import save_file

    src, dst = _cnn(seed=1), _cnn(seed=2)
    save_file(src.state_dict(), str(tmp_path / "w.safetensors"))
    load_checkpoint(dst, tmp_path / "w.safetensors")
    assert _same_weights(src, dst)


def test_lightning_style_checkpoint_loads_with_weights_only(tmp_path):
    src, dst = _cnn(seed=1), _cnn(seed=2)
    ckpt = {
        "epoch": 3, "global_step": 120, "pytorch-lightning_version": "2.4.0",
        "state_dict": {**{f"model.{k}": v for k, v in src.state_dict().items()},
                       "criterion.weight": torch.ones(10)},  # a loss module's buffer, not the model's
        "optimizer_states": [{"state": {0: {"exp_avg": torch.zeros(3)}}, "param_groups": [{"lr": 1e-3}]}],
        "lr_schedulers": [{"last_epoch": 3}], "hyper_parameters": {"width": 4, "name": "cnn"},
    }
    torch.save(ckpt, tmp_path / "last.ckpt")
    torch.load(tmp_path / "last.ckpt", weights_only=True)  # plain containers only: loads safely
    load_checkpoint(dst, tmp_path / "last.ckpt")
    assert _same_weights(src, dst)


@pytest.mark.parametrize("wrap", [
    lambda sd: {"model": {f"module.{k}": v for k, v in sd.items()}, "epoch": 1},  # DDP
    lambda sd: {"model_state_dict": {f"_orig_mod.{k}": v for k, v in sd.items()}},  # torch.compile
    lambda sd: {"ema": sd, "step": 5},
    lambda sd: {"weights": {f"module.model.{k}": v for k, v in sd.items()}, "note": "x"},  # nested prefixes
])
def test_wrapped_and_prefixed_checkpoints_load(tmp_path, wrap):
    src, dst = _cnn(seed=1), _cnn(seed=2)
    torch.save(wrap(src.state_dict()), tmp_path / "w.pt")
    load_checkpoint(dst, tmp_path / "w.pt")
    assert _same_weights(src, dst)


def test_pickled_objects_are_refused_with_the_opt_in_named_then_accepted(tmp_path):
    from usermodels import Pickled, make_net

    src, dst = make_net(width=4), make_net(width=4)
    torch.save({"state_dict": src.state_dict(), "config": Pickled()}, tmp_path / "obj.pt")
    torch.save(src, tmp_path / "whole-model.pt")  # the whole module pickled
    for name in ("obj.pt", "whole-model.pt"):
        with pytest.raises(EvalkitError) as info:
            load_checkpoint(dst, tmp_path / name)
        msg = str(info.value)
        assert "unsafe_pickle: true" in msg and name in msg and "\n" not in msg
        assert "usermodels." in msg  # names the class it would have to import
        load_checkpoint(dst, tmp_path / name, unsafe_pickle=True)
        assert _same_weights(src, dst)


def test_mismatched_checkpoint_names_keys_and_shapes(tmp_path):
    small = create_model(CNN, kwargs={"width": 4, "hidden": 8})
    other = create_model(CNN, kwargs={"width": 4, "hidden": 16})
    torch.save(small.state_dict(), tmp_path / "w.pt")
    with pytest.raises(EvalkitError) as info:
        load_checkpoint(other, tmp_path / "w.pt", source=CNN, kwargs={"width": 4, "hidden": 16})
    msg = str(info.value)
    assert "fc.1.weight (checkpoint (8, 32), model (16, 32))" in msg
    assert "classifier.weight (checkpoint (10, 8), model (10, 16))" in msg
    assert "likely fix: set kwargs to the ones it was trained with" in msg and "this model sets {width: 4, hidden: 16}" in msg
    assert msg.index("likely fix") < msg.index("strict: false") and "\n" not in msg  # kwargs first
    report = load_checkpoint(other, tmp_path / "w.pt", strict=False)  # the rest loads
    assert report["mismatched"] == ["fc.1.weight", "fc.1.bias", "classifier.weight"]
    assert torch.equal(other.state_dict()["features.0.weight"], small.state_dict()["features.0.weight"])


def test_a_mismatch_outside_the_classifier_stays_an_error_naming_key_and_shapes(tmp_path):
    torch.save(create_model("timm:resnet18", kwargs={"in_chans": 1, "num_classes": 3}).state_dict(), tmp_path / "w.pt")
    with pytest.raises(EvalkitError) as info:
        load_checkpoint(create_model("timm:resnet18"), tmp_path / "w.pt", source="timm:resnet18")
    msg = str(info.value)
    assert "conv1.weight (checkpoint (64, 1, 7, 7), model (64, 3, 7, 7))" in msg
    assert "fc.weight (checkpoint (3, 512), model (1000, 512))" in msg  # no width taken when more differs
    assert "this model sets none" in msg and "\n" not in msg


def test_a_classifier_of_another_width_is_taken_from_the_checkpoint_with_a_note(tmp_path):
    trained = create_model(CNN, kwargs={"width": 4, "hidden": 8, "num_classes": 3}, seed=1)
    torch.save(trained.state_dict(), tmp_path / "w.pt")
    model = _cnn()  # built with the default 10 classes
    report = load_checkpoint(model, tmp_path / "w.pt", source=CNN, kwargs={"width": 4, "hidden": 8}, name="m")
    assert report["model"] is model and _same_weights(trained, model)  # the Linear replaced in place
    assert model.classifier.in_features == 8 and not report["mismatched"]
    assert report["notes"] == ["model 'm': classifier width 3 taken from the checkpoint (the source builds 10 by "
                               "default; set kwargs: {num_classes: 3} to silence this)"]
    report = load_checkpoint(_cnn(), tmp_path / "w.pt")  # an in-memory model: no source to name
    assert report["notes"] == ["classifier width 3 taken from the checkpoint (the model had 10)"]


def test_an_explicit_num_classes_that_contradicts_the_checkpoint_is_an_error(tmp_path):
    torch.save(create_model(CNN, kwargs={"width": 4, "hidden": 8, "num_classes": 3}).state_dict(), tmp_path / "w.pt")
    kwargs = {"width": 4, "hidden": 8, "num_classes": 5}
    with pytest.raises(EvalkitError) as info:
        load_checkpoint(create_model(CNN, kwargs=kwargs), tmp_path / "w.pt", source=CNN, kwargs=kwargs)
    msg = str(info.value)
    assert "classifier.weight (checkpoint (3, 8), model (5, 8))" in msg
    assert msg.endswith("likely fix: kwargs has num_classes: 5 but the checkpoint's classifier has 3 outputs; "
                        "set num_classes: 3 in kwargs (or drop it)")


def test_missing_and_unexpected_keys_are_named(tmp_path):
    model = _cnn()
    sd = model.state_dict()
    sd.pop("classifier.bias")
    sd["extra.weight"] = torch.zeros(2, 2)
    sd = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}  # old checkpoints lack these
    torch.save(sd, tmp_path / "w.pt")
    with pytest.raises(EvalkitError) as info:
        load_checkpoint(_cnn(), tmp_path / "w.pt")
    msg = str(info.value)
    assert "missing keys: classifier.bias (10,)" in msg
    assert "unexpected keys: extra.weight (2, 2)" in msg
    assert "num_batches_tracked" not in msg


def test_a_checkpoint_of_another_model_is_refused_even_when_not_strict(tmp_path):
    torch.save({"a.weight": torch.zeros(2)}, tmp_path / "w.pt")
    with pytest.raises(EvalkitError, match="no key matches"):
        load_checkpoint(_cnn(), tmp_path / "w.pt", strict=False)


@pytest.mark.parametrize("content, match", [
    (None, "not found"),
    (b"not a checkpoint at all" * 4, "cannot read"),
    ("truncate", "cannot read"),
])
def test_missing_garbage_and_truncated_files(tmp_path, content, match):
    path = tmp_path / "w.pt"
    if content == "truncate":
        torch.save(_cnn().state_dict(), path)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(EvalkitError, match=match) as info:
        read_checkpoint(path)
    assert "unsafe_pickle" not in str(info.value)  # corrupt is not "needs unpickling"


def test_no_state_dict_inside(tmp_path):
    torch.save({"epoch": 3, "lr": 0.1}, tmp_path / "w.pt")
    with pytest.raises(EvalkitError, match=r"no state dict found \(top level: epoch, lr\)"):
        read_checkpoint(tmp_path / "w.pt")


def test_file_digest_is_remembered_by_path_size_and_mtime(tmp_path):
    path = tmp_path / "w.bin"
    path.write_bytes(b"abc")
    cache = tmp_path / "cache"
    first = file_digest(path, cache_dir=cache)
    assert first == file_digest(path)  # same answer without the index
    index = cache / "file-digests.json"
    assert index.exists()
    # served from the index: a forged entry for the same (path, size, mtime) is returned as is
    index.write_text(index.read_text().replace(first, "f" * 64))
    assert file_digest(path, cache_dir=cache) == "f" * 64
    path.write_bytes(b"abd")  # same size, new content and mtime: hashed again
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    assert file_digest(path, cache_dir=cache) == file_digest(path) != first
