"""Loading the authors' checkpoints (v1 and v2, both key spellings) and our own, the converter CLI, refusals.

The authors' files are simulated with random weights under their exact keys and shapes (_authors_format.py); the
reference there computes the authors' forward pass from such a file without vil's code.
"""

import os
import shutil
import subprocess
import sys

import pytest
import timm
import torch
from _authors_format import authors_state_dict, reference_forward, save_authors_file, to_standalone
from safetensors import safe_open
from safetensors.torch import save_file

import vil
from vil.convert import main as convert_main
from vil.models.vil import convert_authors_state_dict

SMALL = {"patch_size": 8, "embed_dim": 32, "num_classes": 10}
NAMES = {2: "vil_tiny", 1: "vil1_tiny"}
# odd depth for v1 (like ViL-T+ with 29 sub-blocks): the last sub-block reads forward
DEPTHS = {2: 4, 1: 3}


def small_authors_file(tmp_path, version: int, spelling: str = "training", seed: int = 0):
    sd = authors_state_dict(version, 32, DEPTHS[version], (4, 4), dtype=torch.float64, seed=seed)
    path = tmp_path / f"vil{version}_{spelling}_{seed}.th"
    save_authors_file(path, sd if spelling == "training" else to_standalone(sd, version), dim=32)
    return sd, str(path)


def load_small(version: int, path: str, img_size=32, **kwargs) -> vil.VisionLSTM:
    args = dict(SMALL, depth=DEPTHS[version], img_size=img_size, dtype=torch.float64)
    args.update(kwargs)
    model = timm.create_model(NAMES[version], pretrained=True, pretrained_cfg_overlay={"file": path}, **args)
    return model.eval()


@pytest.mark.parametrize("version", [2, 1])
def test_authors_file_computes_what_the_authors_model_computes(tmp_path, version):
    sd, path = small_authors_file(tmp_path, version)
    model = load_small(version, path)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        ours, ref = model(x), reference_forward(sd, x, version)
    assert ref.abs().max() > 0.1  # the head and everything before it were loaded
    torch.testing.assert_close(ours, ref, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("version", [2, 1])
def test_standalone_spelling_loads_the_same_weights(tmp_path, version):
    sd, training_path = small_authors_file(tmp_path, version)
    _, standalone_path = small_authors_file(tmp_path, version, spelling="standalone")
    assert any(".rowwise_from_bot_right." in k for k in torch.load(standalone_path)["state_dict"]) == (version == 2)
    a = load_small(version, training_path).state_dict()
    b = load_small(version, standalone_path).state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    converted = convert_authors_state_dict(to_standalone(sd, version))
    assert converted.keys() == convert_authors_state_dict(sd).keys()


def test_norm_offsets_become_standard_scales(tmp_path):
    sd, path = small_authors_file(tmp_path, 2)
    model = load_small(2, path)
    p = "xlstm.blocks.1."
    torch.testing.assert_close(model.blocks[1].norm.weight, 1 + sd[p + "xlstm_norm.weight"])
    torch.testing.assert_close(model.blocks[1].norm.bias, sd[p + "xlstm_norm.bias"])
    torch.testing.assert_close(model.blocks[1].layer.mlstm.norm.weight, 1 + sd[p + "xlstm.mlstm_cell.outnorm.weight"])
    torch.testing.assert_close(model.norm.weight, 1 + sd["xlstm.post_blocks_norm.weight"])
    torch.testing.assert_close(model.fc_norm.weight, sd["head.0.weight"])  # a standard LayerNorm: no offset
    torch.testing.assert_close(model.blocks[1].layer.conv.weight, sd[p + "xlstm.conv1d.weight"])


@pytest.mark.parametrize("version", [2, 1])
def test_position_embedding_resampled_to_another_resolution(tmp_path, version):
    sd, path = small_authors_file(tmp_path, version)
    model = load_small(version, path, img_size=(48, 40))
    assert model.pos_embed.shape == (1, 6, 5, 32)
    x = torch.randn(1, 3, 48, 40, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference_forward(sd, x, version), rtol=1e-9, atol=1e-9)


def test_head_dropped_when_num_classes_differs(tmp_path):
    sd, path = small_authors_file(tmp_path, 2)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        ref_features = reference_forward(sd, x, 2, pre_logits=True)
        five = load_small(2, path, num_classes=5)
        assert five.head.weight.shape == (5, 64)
        torch.testing.assert_close(five.forward_head(five.forward_features(x), pre_logits=True), ref_features)
        features = load_small(2, path, num_classes=0)
        torch.testing.assert_close(features(x), ref_features)
    assert not torch.equal(five.head.weight[:5], sd["head.1.weight"][:5])


def test_timm_state_dict_overlay_uses_the_filter(tmp_path):
    sd = authors_state_dict(1, 32, 3, (4, 4), dtype=torch.float64)
    model = timm.create_model(
        "vil1_tiny",
        pretrained=True,
        pretrained_cfg_overlay={"state_dict": to_standalone(sd, 1), "num_classes": 10},
        img_size=32,
        depth=3,
        dtype=torch.float64,
        **{k: v for k, v in SMALL.items()},
    ).eval()
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference_forward(sd, x, 1), rtol=1e-9, atol=1e-9)


def test_in_chans_adapted_from_rgb(tmp_path):
    sd, path = small_authors_file(tmp_path, 2)
    model = load_small(2, path, in_chans=1)
    torch.testing.assert_close(model.patch_embed.proj.weight, sd["patch_embed.proj.weight"].sum(1, keepdim=True))
    assert model(torch.randn(1, 1, 32, 32, dtype=torch.float64)).shape == (1, 10)


def test_features_only_from_authors_file(tmp_path):
    _, path = small_authors_file(tmp_path, 2)
    model = load_small(2, path, features_only=True, out_indices=(1, 3))
    feats = model(torch.randn(1, 3, 32, 32, dtype=torch.float64))
    assert [f.shape for f in feats] == [(1, 32, 4, 4)] * 2


def test_other_models_are_refused_with_the_mismatch(tmp_path):
    _, v1_path = small_authors_file(tmp_path, 1)
    with pytest.raises(ValueError, match="does not match") as err:
        load_small(2, v1_path, depth=3)
    message = str(err.value)
    assert "v1 (causal conv1d)" in message and "v2 (3x3 conv)" in message
    assert "blocks.0.layer.conv.weight: checkpoint (64, 1, 4) vs model (64, 1, 3, 3)" in message
    assert "missing keys" in message and "blocks.0.norm.bias" in message

    _, v2_path = small_authors_file(tmp_path, 2)
    with pytest.raises(ValueError, match="shape mismatches") as err:
        load_small(2, v2_path, embed_dim=48)
    assert "patch_embed.proj.weight: checkpoint (32, 3, 8, 8) vs model (48, 3, 8, 8)" in str(err.value)
    with pytest.raises(ValueError, match=r"unexpected keys: blocks\.3\."):
        load_small(2, v2_path, depth=3)


def test_refusal_names_the_model_that_fits(tmp_path):
    sd = authors_state_dict(1, 192, 24, (14, 14), num_classes=1000, patch=16)
    path = tmp_path / "vil_tiny16_e400_in1k.th"
    save_authors_file(path, sd)
    with pytest.raises(ValueError, match="It fits vil1_tiny"):
        timm.create_model("vil_tiny", pretrained=True, pretrained_cfg_overlay={"file": str(path)})


calls = []


def record_call(*args):
    calls.append(args)
    return args


class Payload:
    """Unpickling this would call record_call: a stand-in for arbitrary code in a pickle."""

    def __reduce__(self):
        return record_call, ("executed",)


def test_pickled_objects_are_refused_without_running_them(tmp_path):
    sd = authors_state_dict(2, 32, 4, (4, 4))
    path = tmp_path / "evil.th"
    torch.save({"state_dict": sd, "ctor": Payload()}, path)
    with pytest.raises(ValueError, match="refusing to load .*evil.th.*pickled Python objects") as err:
        timm.create_model(
            "vil_tiny", pretrained=True, pretrained_cfg_overlay={"file": str(path)}, **SMALL, depth=4, img_size=32
        )
    assert "record_call" in str(err.value) and "weights_only=True" in str(err.value)
    with pytest.raises(ValueError, match="refusing to load"):
        vil.load_checkpoint_file(path)
    assert calls == []
    garbage = tmp_path / "truncated.th"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="could not read"):
        vil.load_checkpoint_file(garbage)
    not_weights = tmp_path / "list.th"
    torch.save({"state_dict": {"a": [1, 2]}}, not_weights)
    with pytest.raises(ValueError, match="not a tensor"):
        vil.load_checkpoint_file(not_weights)


def test_our_own_checkpoints_round_trip(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model("vil_tiny", img_size=32, depth=2, **SMALL).eval()
    for name in ("w.safetensors", "w.pth"):
        path = str(tmp_path / name)
        if name.endswith(".safetensors"):
            save_file(model.state_dict(), path)
        else:
            torch.save({"state_dict": model.state_dict(), "epoch": 3}, path)
        loaded = timm.create_model(
            "vil_tiny", pretrained=True, pretrained_cfg_overlay={"file": path}, img_size=32, depth=2, **SMALL
        )
        x = torch.randn(1, 3, 32, 32)
        with torch.no_grad():
            torch.testing.assert_close(loaded.eval()(x), model(x), rtol=0, atol=0)


@pytest.fixture(scope="module")
def vil_tiny_authors_file(tmp_path_factory):
    """A full-size ViL-T v2 file in the authors' training spelling (random weights)."""
    sd = authors_state_dict(2, 192, 24, (14, 14), num_classes=1000, patch=16, seed=1)
    path = tmp_path_factory.mktemp("authors") / "vil2_tiny16_e800_in1k.th"
    save_authors_file(path, sd, dim=192, depth=12)
    return sd, str(path)


def test_converter_round_trip(tmp_path, vil_tiny_authors_file, capsys):
    _, src = vil_tiny_authors_file
    dst = str(tmp_path / "vil_tiny.safetensors")
    assert convert_main([src, dst, "--model", "vil_tiny"]) == 0
    assert "vil_tiny, " in capsys.readouterr().out
    with safe_open(dst, "pt") as f:
        assert f.metadata()["vil_model"] == "vil_tiny" and f.metadata()["source_layout"] == "authors"
        keys = set(f.keys())
    reference = timm.create_model("vil_tiny").state_dict()
    assert keys == set(reference)
    converted = timm.create_model("vil_tiny", pretrained=True, pretrained_cfg_overlay={"file": dst}).eval()
    direct = timm.create_model("vil_tiny", pretrained=True, pretrained_cfg_overlay={"file": src}).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        out = converted(x)
        torch.testing.assert_close(out, direct(x), rtol=0, atol=0)
    assert out.abs().max() > 0.1

    # model inferred from the weights; another resolution
    dst160 = str(tmp_path / "vil_tiny_160.safetensors")
    assert convert_main([src, dst160, "--img-size", "160"]) == 0
    with safe_open(dst160, "pt") as f:
        assert f.metadata()["vil_model"] == "vil_tiny" and f.get_tensor("pos_embed").shape == (1, 10, 10, 192)


def test_converter_refusals(tmp_path, vil_tiny_authors_file, capsys):
    _, src = vil_tiny_authors_file
    assert convert_main([src, str(tmp_path / "x.safetensors"), "--model", "vil_small"]) == 1
    err = capsys.readouterr().err
    assert "vil-convert: error: checkpoint does not match" in err and "It fits vil_tiny" in err
    with pytest.raises(SystemExit):
        convert_main([src, str(tmp_path / "x.pth")])
    assert not os.path.exists(tmp_path / "x.safetensors")


def test_converter_console_script_refuses_pickles(tmp_path):
    path = tmp_path / "evil.th"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "ctor": Payload()}, path)
    exe = shutil.which("vil-convert")
    cmd = [exe] if exe else [sys.executable, "-m", "vil.convert"]
    result = subprocess.run(
        [*cmd, str(path), str(tmp_path / "out.safetensors")], capture_output=True, text=True, check=False
    )
    assert result.returncode == 1
    assert "refusing to load" in result.stderr and "record_call" in result.stderr
    assert not (tmp_path / "out.safetensors").exists()
